//! `matrix.toml` → [`Matrix`]: parse, validate (collecting every problem with its place),
//! expand the axes, apply exclude/include and expect rules, and give every cell its id.
//!
//! Past 600 lines on purpose: the validator's core, one pass over the file collecting every
//! problem; environment and subject axes live in `axes.rs`, selectors in `select.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::Glob;
use toml::Spanned;

use super::check::LoadOptions;
use super::diag::{Diagnostic, MatrixError};
use super::model::*;
use super::raw::*;
use super::select::selector_matches;
use crate::sandbox::{restrict, signature};

/// Axis values with where each was written.
pub(super) type Values = Vec<(String, Option<Range<usize>>)>;

/// One combination of axis values, with where each value was written.
type Combo = BTreeMap<String, (String, Option<Range<usize>>)>;

/// Load, validate and expand a matrix file.
pub fn load(path: &Path) -> Result<Matrix, MatrixError> {
    load_with(path, LoadOptions::default())
}

/// As [`load`], with options (`--allow-unused-rules`).
pub fn load_with(path: &Path, opts: LoadOptions) -> Result<Matrix, MatrixError> {
    let text = std::fs::read_to_string(path).map_err(|source| MatrixError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_str_with(path, &text, opts)
}

/// As [`load`], from text (`path` names the file in messages and anchors relative paths).
#[cfg(test)]
pub(crate) fn load_str(path: &Path, text: &str) -> Result<Matrix, MatrixError> {
    load_str_with(path, text, LoadOptions::default())
}

/// As [`load_str`], with options.
pub fn load_str_with(path: &Path, text: &str, opts: LoadOptions) -> Result<Matrix, MatrixError> {
    let invalid = |diagnostics| MatrixError::Invalid {
        path: path.to_path_buf(),
        text: text.to_string(),
        diagnostics,
    };
    let raw: RawMatrix = toml::from_str(text).map_err(|e| {
        let unknown = e.message().contains("unknown field");
        let help =
            unknown.then_some("check the spelling against the keys documented in docs/matrix.md");
        let code = if unknown { "unknown-key" } else { "syntax" };
        let mut d = Diagnostic::new(code, e.span(), e.message().trim().to_string());
        if let Some(h) = help {
            d.help(h);
        }
        invalid(vec![d])
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    let mut v = Validator {
        diags: Vec::new(),
        raw: &raw,
        base,
    };
    let matrix = v.build(path);
    if v.diags.is_empty() {
        // The rules against the cells they select: values, unused rules, signatures.
        let (errors, warnings) = super::check::rules(&raw, &matrix, opts);
        if !warnings.is_empty() {
            let shown = super::diag::render(path, text, &warnings)
                .replace(": error[", ": warning[")
                .replace("; nothing was run", "; allowed by --allow-unused-rules");
            eprintln!("{shown}");
        }
        v.diags.extend(errors);
    }
    {
        // Codex versions against the registry's list, only when one is not cached.
        v.diags.extend(super::codex_versions::check(
            &raw,
            &crate::artifacts::npm::is_cached,
            &mut || crate::artifacts::npm::linux_x64_versions().map_err(|e| format!("{e:#}")),
        ));
    }
    if v.diags.is_empty() {
        Ok(matrix)
    } else {
        Err(invalid(v.diags))
    }
}

/// Only the `[profile.NAME]`s of a matrix file, validated, without expanding it.
pub(super) fn load_profiles(path: &Path) -> anyhow::Result<Vec<Profile>> {
    let text = std::fs::read_to_string(path)?;
    let raw: RawMatrix = toml::from_str(&text)?;
    let mut v = Validator {
        diags: Vec::new(),
        raw: &raw,
        base: PathBuf::from("."),
    };
    let profiles = v.profiles();
    if let Some(d) = v.diags.first() {
        anyhow::bail!("{}: {d:?}", path.display());
    }
    Ok(profiles.into_values().map(|(p, _)| p).collect())
}

pub(super) struct Validator<'a> {
    pub(super) diags: Vec<Diagnostic>,
    pub(super) raw: &'a RawMatrix,
    pub(super) base: PathBuf,
}

/// `90s`, `10m`, `1h`, `500ms`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1000.0,
        "m" | "min" | "mins" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

impl Validator<'_> {
    pub(super) fn err(
        &mut self,
        code: &'static str,
        span: Option<Range<usize>>,
        msg: impl Into<String>,
    ) -> &mut Diagnostic {
        self.diags.push(Diagnostic::new(code, span, msg));
        self.diags.last_mut().expect("just pushed")
    }

    /// A scalar or an array of scalars → values with their spans.
    pub(super) fn values(&mut self, key: &str, v: &SValue) -> Vec<(String, Option<Range<usize>>)> {
        let out: Vec<_> = match v.get_ref() {
            toml::Value::Array(items) => items
                .iter()
                .filter_map(|i| scalar_text(i).map(|t| (t, span(v))))
                .collect(),
            other => scalar_text(other)
                .map(|t| vec![(t, span(v))])
                .unwrap_or_default(),
        };
        let bad_type = match v.get_ref() {
            toml::Value::Array(items) => items.iter().any(|i| scalar_text(i).is_none()),
            other => scalar_text(other).is_none(),
        };
        if bad_type {
            self.err(
                "bad-axis-value",
                span(v),
                format!("`{key}` takes a string, number or boolean, or a list of them"),
            );
        } else if out.is_empty() {
            self.err(
                "empty-product",
                span(v),
                format!("`{key}` is an empty list: the product would be empty"),
            )
            .help("give at least one value or remove the key");
        }
        out
    }

    fn build(&mut self, path: &Path) -> Matrix {
        let settings = self.settings();
        let profiles = self.profiles();
        let sysctl_sets = self.sysctl_sets();
        let scenario_sets = self.scenario_sets();
        let mut envs = Vec::new();
        for e in &self.raw.environment {
            envs.extend(self.environment(e, &profiles, &sysctl_sets));
        }
        let mut subjects = Vec::new();
        for s in &self.raw.subject {
            subjects.extend(self.subject(s));
        }
        if self.raw.environment.is_empty() {
            self.err("empty-product", None, "the matrix has no [[environment]]");
        }
        if self.raw.subject.is_empty() {
            self.err("empty-product", None, "the matrix has no [[subject]]");
        }
        if self.raw.scenarios.is_empty() {
            self.err("empty-product", None, "the matrix has no [[scenarios]] set");
        }
        let cells = self.cells(&envs, &subjects, &scenario_sets);
        Matrix {
            path: path.to_path_buf(),
            settings,
            cells,
        }
    }

    pub(super) fn settings(&mut self) -> Settings {
        let mut s = Settings::default();
        let Some(r) = &self.raw.settings else {
            return s;
        };
        for (field, dst) in [
            (&r.cell_timeout, &mut s.cell_timeout),
            (&r.batch_timeout, &mut s.batch_timeout),
        ] {
            if let Some(v) = field {
                match parse_duration(v.get_ref()) {
                    Some(d) => *dst = d,
                    None => {
                        self.err(
                            "bad-duration",
                            span(v),
                            format!("`{}` is not a duration", v.get_ref()),
                        )
                        .help("write e.g. \"90s\", \"10m\", \"500ms\"");
                    }
                }
            }
        }
        if let Some(n) = r.retries {
            s.retries = n;
        }
        if let Some(d) = &r.host_work_dir {
            s.host_work_dir = PathBuf::from(d);
        }
        for b in &r.require {
            match parse_require(b.get_ref()) {
                Ok(name) => {
                    if !s.require.contains(&name) {
                        s.require.push(name);
                    }
                }
                Err(e) => {
                    self.err("bad-require", span(b), e)
                        .help("name backends: require = [\"host\", \"docker\", \"qemu\"]");
                }
            }
        }
        s
    }

    fn profiles(&mut self) -> BTreeMap<String, (Profile, Range<usize>)> {
        let mut out = BTreeMap::new();
        for (name, rp) in &self.raw.profile {
            let r = rp.get_ref();
            let bounding_set = match &r.bounding_set {
                None => None,
                Some(v) => match v.get_ref() {
                    toml::Value::String(s) if s == "docker-default" => Some(
                        restrict::DOCKER_DEFAULT_CAPS
                            .iter()
                            .map(|c| c.to_string())
                            .collect(),
                    ),
                    toml::Value::Array(_) => {
                        let caps: Vec<String> = self
                            .values("bounding-set", v)
                            .into_iter()
                            .map(|(c, _)| c)
                            .collect();
                        for c in &caps {
                            if restrict::cap_number(c).is_none() {
                                self.err(
                                    "bad-capability",
                                    span(v),
                                    format!("unknown capability `{c}`"),
                                );
                            }
                        }
                        Some(caps)
                    }
                    _ => {
                        self.err(
                            "bad-value",
                            span(v),
                            "`bounding-set` is \"docker-default\" or a list of capabilities",
                        );
                        None
                    }
                },
            };
            for c in r.cap_add.iter().chain(&r.cap_drop) {
                if c != "ALL" && restrict::cap_number(c).is_none() {
                    self.err(
                        "bad-capability",
                        span(rp),
                        format!("profile `{name}`: unknown capability `{c}`"),
                    );
                }
            }
            let p = Profile {
                name: name.clone(),
                seccomp: r.seccomp.as_ref().map(|s| s.get_ref().clone()),
                cap_add: r.cap_add.clone(),
                cap_drop: r.cap_drop.clone(),
                no_new_privileges: r.no_new_privileges,
                privileged: r.privileged,
                systempaths_unconfined: r.systempaths_unconfined,
                bounding_set,
                userns_limit: r.userns_limit,
                outer_sandbox: r.outer_sandbox.as_ref().map(|s| s.get_ref().clone()),
                outer_disable_userns: r
                    .outer_disable_userns
                    .as_ref()
                    .is_some_and(|b| *b.get_ref()),
                userns_depth: r
                    .userns_depth
                    .as_ref()
                    .and_then(|d| u32::try_from(*d.get_ref()).ok()),
                protect_kernel_tunables: r.protect_kernel_tunables,
                protect_proc: r.protect_proc.as_ref().map(|s| s.get_ref().clone()),
                proc_subset: r.proc_subset.as_ref().map(|s| s.get_ref().clone()),
                security_opt: r
                    .security_opt
                    .iter()
                    .cloned()
                    .chain(r.apparmor.iter().map(|a| format!("apparmor={a}")))
                    .collect(),
                description: r.description.clone(),
            };
            self.check_nesting_and_hardening(name, r);
            if let Some(sc) = &r.seccomp {
                let v = sc.get_ref();
                let ok = matches!(
                    v.as_str(),
                    "none" | "deny-userns" | "default" | "unconfined"
                ) || v.ends_with(".json");
                if !ok {
                    self.err("bad-value", span(sc), format!("seccomp `{v}` is not none, deny-userns, default, unconfined or a .json file"));
                } else if v.ends_with(".json") {
                    let p = self.base.join(v);
                    if !p.is_file() {
                        self.err(
                            "missing-file",
                            span(sc),
                            format!("seccomp profile {} does not exist", p.display()),
                        );
                    }
                }
            }
            out.insert(name.clone(), (p, rp.span()));
        }
        out
    }

    /// The nesting and systemd-hardening keys of a profile: known values, consistent
    /// combinations (see docs/matrix.md).
    fn check_nesting_and_hardening(&mut self, name: &str, r: &RawProfile) {
        if let Some(o) = &r.outer_sandbox
            && o.get_ref() != "bwrap"
        {
            self.err(
                "bad-value",
                span(o),
                format!(
                    "profile `{name}`: outer-sandbox `{}` is not \"bwrap\"",
                    o.get_ref()
                ),
            )
            .help("outer-sandbox = \"bwrap\" runs the cell inside the system's bwrap");
        }
        if let Some(d) = &r.outer_disable_userns
            && *d.get_ref()
            && r.outer_sandbox.is_none()
        {
            self.err(
                "bad-value",
                span(d),
                format!("profile `{name}`: outer-disable-userns needs an outer sandbox"),
            )
            .help("add outer-sandbox = \"bwrap\" to the profile");
        }
        if let Some(d) = &r.userns_depth {
            let v = *d.get_ref();
            if !(1..=restrict::MAX_USERNS_DEPTH as i64).contains(&v) {
                self.err(
                    "bad-value",
                    span(d),
                    format!(
                        "profile `{name}`: userns-depth {v} is not between 1 and {}",
                        restrict::MAX_USERNS_DEPTH
                    ),
                )
                .help(format!(
                    "the kernel refuses a user namespace deeper than {}: a cell cannot start deeper",
                    restrict::MAX_USERNS_DEPTH
                ));
            } else if r.userns_limit.is_some() || r.outer_sandbox.is_some() {
                self.err(
                    "bad-value",
                    span(d),
                    format!(
                        "profile `{name}`: userns-depth cannot combine with userns-limit or outer-sandbox"
                    ),
                )
                .help("give the nesting one way per profile");
            }
        }
        // The agent builds the nesting itself: a filter or limit that denies it user
        // namespaces would fail the construction, not the cell's sandbox.
        // (userns-depth with userns-limit is refused above.)
        let deny_filter = r
            .seccomp
            .as_ref()
            .is_some_and(|s| s.get_ref() == "deny-userns");
        if (deny_filter && (r.outer_sandbox.is_some() || r.userns_depth.is_some()))
            || (r.userns_limit.is_some() && r.outer_sandbox.is_some())
        {
            let at = r
                .outer_sandbox
                .as_ref()
                .map(span)
                .or_else(|| r.userns_depth.as_ref().map(span));
            self.err(
                "bad-value",
                at.flatten(),
                format!(
                    "profile `{name}`: outer-sandbox and userns-depth cannot combine with seccomp deny-userns or userns-limit"
                ),
            )
            .help("the nesting needs user namespaces of its own; give the denial its own profile");
        }
        if let Some(p) = &r.protect_proc
            && !matches!(
                p.get_ref().as_str(),
                "invisible" | "noaccess" | "ptraceable"
            )
        {
            self.err(
                "bad-value",
                span(p),
                format!(
                    "profile `{name}`: protect-proc `{}` is not invisible, noaccess or ptraceable",
                    p.get_ref()
                ),
            )
            .help("these are systemd's ProtectProc= values that mount /proc with hidepid=");
        }
        if let Some(p) = &r.proc_subset
            && !matches!(p.get_ref().as_str(), "pid" | "all")
        {
            self.err(
                "bad-value",
                span(p),
                format!(
                    "profile `{name}`: proc-subset `{}` is not pid or all",
                    p.get_ref()
                ),
            )
            .help("systemd's ProcSubset= takes pid (procfs subset=pid) or all");
        }
    }

    fn sysctl_sets(&mut self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        out.insert("default".to_string(), BTreeMap::new());
        for (name, set) in &self.raw.sysctl_set {
            let mut vals = BTreeMap::new();
            for (k, v) in set.get_ref() {
                if k.starts_with('/') || !k.contains('.') {
                    self.err(
                        "bad-sysctl",
                        span(v),
                        format!("sysctl `{k}` should be dotted, like user.max_user_namespaces"),
                    );
                }
                match scalar_text(v.get_ref()) {
                    Some(t) => {
                        vals.insert(k.clone(), t);
                    }
                    None => {
                        self.err(
                            "bad-sysctl",
                            span(v),
                            format!("sysctl `{k}` needs a scalar value"),
                        );
                    }
                }
            }
            out.insert(name.clone(), vals);
        }
        out
    }

    fn scenario_sets(&mut self) -> Vec<(String, Vec<ScenarioRef>)> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for s in &self.raw.scenarios {
            let r = s.get_ref();
            let name = r.name.get_ref().clone();
            if !seen.insert(name.clone()) {
                self.err(
                    "duplicate-name",
                    span(&r.name),
                    format!("scenario set `{name}` is defined twice"),
                );
            }
            let dir = self.base.join(r.dir.get_ref());
            let loaded = match crate::scenario::load_set(&dir) {
                Ok(l) => l,
                Err(e) => {
                    self.err(
                        "bad-scenarios",
                        span(&r.dir),
                        format!("failed to load scenarios from {}: {e}", dir.display()),
                    );
                    continue;
                }
            };
            let globs: Vec<_> = r
                .only
                .iter()
                .flatten()
                .filter_map(|g| Glob::new(g).ok().map(|g| g.compile_matcher()))
                .collect();
            let refs: Vec<ScenarioRef> = loaded
                .into_iter()
                .filter(|sc| globs.is_empty() || globs.iter().any(|g| g.is_match(&sc.name)))
                .map(|sc| ScenarioRef {
                    set: name.clone(),
                    name: sc.name,
                    dir: std::path::absolute(&sc.dir).unwrap_or(sc.dir),
                })
                .collect();
            if refs.is_empty() {
                self.err(
                    "empty-product",
                    span(s),
                    format!(
                        "scenario set `{name}` selects no scenario in {}",
                        dir.display()
                    ),
                );
            }
            out.push((name, refs));
        }
        out
    }

    /// Cartesian product of the given axes, then the entry's exclude and include.
    pub(super) fn expand(
        &mut self,
        what: &str,
        axes: Vec<(&'static str, Values)>,
        exclude: &[Spanned<Selector>],
        include: &[Spanned<Selector>],
    ) -> Vec<Combo> {
        let allowed: BTreeSet<&str> = axes.iter().map(|(k, _)| *k).collect();
        let mut combos: Vec<Combo> = vec![Combo::new()];
        for (k, vals) in &axes {
            let mut next = Vec::new();
            for c in &combos {
                for (v, sp) in vals {
                    let mut c2 = c.clone();
                    c2.insert(k.to_string(), (v.clone(), sp.clone()));
                    next.push(c2);
                }
            }
            combos = next;
        }
        for sel in exclude.iter().chain(include) {
            for (k, v) in sel.get_ref() {
                if !allowed.contains(k.as_str()) {
                    self.err("unknown-axis", span(v), format!("{what} has no axis `{k}`"))
                        .help(format!(
                            "its axes are: {}",
                            allowed.iter().copied().collect::<Vec<_>>().join(", ")
                        ));
                }
            }
        }
        combos.retain(|c| {
            !exclude
                .iter()
                .any(|e| selector_matches(e.get_ref(), &|k| c.get(k).map(|v| v.0.clone())))
        });
        // GitHub Actions' include: an entry that matches an existing combination on all of
        // its keys adds nothing new; otherwise it adds a combination of its own, whose axes
        // not named take the single value the axis has (naming them is required otherwise).
        for inc in include {
            let sel = inc.get_ref();
            let matches_existing = combos.iter().any(|c| {
                sel.iter().all(|(k, v)| {
                    c.get(k)
                        .map(|x| Some(&x.0) == scalar_text(v.get_ref()).as_ref())
                        .unwrap_or(false)
                })
            });
            if matches_existing {
                continue;
            }
            let mut c = Combo::new();
            for (k, vals) in &axes {
                if let Some(v) = sel.get(*k) {
                    match scalar_text(v.get_ref()) {
                        Some(t) => {
                            c.insert(k.to_string(), (t, span(v)));
                        }
                        None => {
                            self.err(
                                "bad-axis-value",
                                span(v),
                                format!("include value for `{k}` must be a scalar"),
                            );
                        }
                    }
                } else if vals.len() == 1 {
                    c.insert(k.to_string(), vals[0].clone());
                } else {
                    self.err(
                        "incomplete-include",
                        span(inc),
                        format!(
                            "this include adds a new {what} combination but does not say its `{k}`"
                        ),
                    )
                    .help(format!("`{k}` has several values; name one"));
                }
            }
            if c.len() == axes.len() {
                combos.push(c);
            }
        }
        combos
    }

    fn cells(
        &mut self,
        envs: &[Environment],
        subjects: &[Subject],
        sets: &[(String, Vec<ScenarioRef>)],
    ) -> Vec<Cell> {
        let known = all_axes();
        for ex in &self.raw.exclude {
            for (k, v) in ex.get_ref() {
                if !known.contains(k.as_str()) {
                    self.err("unknown-axis", span(v), format!("no axis `{k}`"))
                        .help(format!(
                            "axes are: {}",
                            known.iter().copied().collect::<Vec<_>>().join(", ")
                        ));
                }
            }
        }
        let mut rules = Vec::new();
        for ex in &self.raw.expect {
            let r = ex.get_ref();
            for (k, v) in r.when.get_ref() {
                if !known.contains(k.as_str()) {
                    self.err("unknown-axis", span(v), format!("no axis `{k}`"));
                }
            }
            let expect = match (&r.fail, r.pass) {
                (Some(sig), None) | (Some(sig), Some(false)) => {
                    if signature::by_name(sig.get_ref()).is_none() {
                        self.err(
                            "unknown-signature",
                            span(sig),
                            format!("no signature named `{}`", sig.get_ref()),
                        )
                        .help(format!(
                            "known: {}",
                            signature::names().collect::<Vec<_>>().join(", ")
                        ));
                    }
                    Expectation::Fail {
                        signature: sig.get_ref().clone(),
                        reason: r.reason.clone(),
                    }
                }
                (None, Some(true)) => Expectation::Pass,
                _ => {
                    self.err("bad-expect", span(ex), "an expect rule needs exactly one of `fail = \"signature\"` or `pass = true`");
                    continue;
                }
            };
            rules.push((r.when.get_ref(), expect));
        }
        let mut cells = Vec::new();
        let mut ids: BTreeMap<String, usize> = BTreeMap::new();
        for env in envs {
            for subj in subjects {
                for (_, refs) in sets {
                    for sc in refs {
                        let id = format!("{}/{}/{}/{}", env.id, subj.id, sc.set, sc.name);
                        let mut axes = env.axes.clone();
                        axes.extend(subj.axes.clone());
                        axes.insert("set".into(), sc.set.clone());
                        axes.insert("scenario".into(), sc.name.clone());
                        axes.insert("id".into(), id.clone());
                        let get = |k: &str| axes.get(k).cloned();
                        if self
                            .raw
                            .exclude
                            .iter()
                            .any(|e| selector_matches(e.get_ref(), &get))
                        {
                            continue;
                        }
                        let expect = rules
                            .iter()
                            .rev()
                            .find(|(sel, _)| selector_matches(sel, &get))
                            .map(|(_, e)| e.clone())
                            .unwrap_or(Expectation::Pass);
                        axes.remove("id");
                        *ids.entry(id.clone()).or_default() += 1;
                        cells.push(Cell {
                            id,
                            env: env.clone(),
                            subject: subj.clone(),
                            scenario: sc.clone(),
                            expect,
                            axes,
                            skip: None,
                        });
                    }
                }
            }
        }
        for (id, n) in ids {
            if n > 1 {
                self.err(
                    "duplicate-id",
                    None,
                    format!("{n} cells have the id `{id}`"),
                )
                .help("give the environments or subjects distinct names");
            }
        }
        let env_names: Vec<_> = self
            .raw
            .environment
            .iter()
            .map(|e| e.get_ref().name.clone())
            .collect();
        let mut seen = BTreeSet::new();
        for n in env_names {
            if !seen.insert(n.get_ref().clone()) {
                self.err(
                    "duplicate-id",
                    span(&n),
                    format!("environment name `{}` is used twice", n.get_ref()),
                );
            }
        }
        let subj_names: Vec<_> = self
            .raw
            .subject
            .iter()
            .map(|s| s.get_ref().name.clone())
            .collect();
        let mut seen = BTreeSet::new();
        for n in subj_names {
            if !seen.insert(n.get_ref().clone()) {
                self.err(
                    "duplicate-id",
                    span(&n),
                    format!("subject name `{}` is used twice", n.get_ref()),
                );
            }
        }
        if cells.is_empty() && self.diags.is_empty() {
            self.err("empty-product", None, "the matrix expands to no cell");
        }
        cells
    }
}

/// A backend named in `[settings] require` or `run --require`.
pub fn parse_require(name: &str) -> Result<String, String> {
    let n = name.trim();
    match n {
        "host" | "docker" | "qemu" | "guest-docker" => Ok(n.to_string()),
        _ => Err(format!(
            "`{n}` is not a backend: require names host, docker, qemu or guest-docker"
        )),
    }
}

/// Axes whose value differs between combinations: they go into ids.
pub(super) fn varying_axes(combos: &[Combo]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(first) = combos.first() {
        for k in first.keys() {
            if combos
                .iter()
                .any(|c| c.get(k).map(|v| &v.0) != first.get(k).map(|v| &v.0))
            {
                out.insert(k.clone());
            }
        }
    }
    out
}

pub(super) fn axis_label(k: &str, v: &str) -> String {
    match k {
        "uid" => format!("uid{v}"),
        "apparmor" => format!("aa-{}", sanitize(v)),
        "vcpus" => format!("{v}cpu"),
        "read-only" => {
            if v == "true" {
                "ro".into()
            } else {
                "rw".into()
            }
        }
        _ => sanitize(v),
    }
}

pub(super) fn sanitize(s: &str) -> String {
    s.trim_matches('/').replace(['/', ' ', ':'], "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nesting and systemd-hardening keys: bad values and combinations are errors at
    /// their own line, and a docker or qemu environment gets what its backend allows.
    #[test]
    fn nesting_and_hardening_keys_are_checked_where_written() {
        let text = &(r#"
[profile.a]
outer-sandbox = "firejail"

[profile.b]
outer-disable-userns = true

[profile.c]
userns-depth = 34

[profile.d]
userns-depth = 3
userns-limit = 5

[profile.e]
protect-proc = "hidden"

[profile.f]
proc-subset = "sys"

[profile.g]
seccomp = "deny-userns"
outer-sandbox = "bwrap"

[profile.good]
outer-sandbox = "bwrap"
outer-disable-userns = true
protect-kernel-tunables = true
protect-proc = "invisible"
proc-subset = "pid"

[[environment]]
name = "host"
backend = "host"
profile = ["good"]

[[environment]]
name = "c"
backend = "docker"
image = "busybox"
profile = "good"

[image.busybox]
reference = "busybox:latest"

"#
        .to_string()
            + ONE_BWRAP_CELL);
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("m.toml");
        let err = load_str(&base, text).expect_err("bad input").to_string();
        for (line, what) in [
            (3, "outer-sandbox `firejail` is not \"bwrap\""),
            (6, "outer-disable-userns needs an outer sandbox"),
            (9, "userns-depth 34 is not between 1 and 33"),
            (12, "userns-depth cannot combine with userns-limit"),
            (16, "protect-proc `hidden` is not invisible"),
            (19, "proc-subset `sys` is not pid or all"),
            (
                23,
                "outer-sandbox and userns-depth cannot combine with seccomp deny-userns",
            ),
            (41, "profile `good` uses settings only the host backend has"),
        ] {
            let at = format!("m.toml:{line}:");
            assert!(
                err.lines().any(|l| l.contains(&at) && l.contains(what)),
                "expected `{what}` at line {line} in:\n{err}"
            );
        }
        assert_eq!(err.matches("error[").count(), 8, "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("0s"), None);
    }

    /// One bwrap subject and one scenario, after a test's environments.
    const ONE_BWRAP_CELL: &str = r#"
[[subject]]
name = "bwrap"
kind = "bwrap"

[[scenarios]]
name = "core"
dir = "scenarios"
only = ["add_file"]
"#;

    const APPARMOR_MATRIX: &str = r#"
[profile.unconfined-aa]
seccomp = "unconfined"
apparmor = "unconfined"

[image.bookworm]
recipe = "bookworm"

[[environment]]
name = "gd"
backend = "guest-docker"
kernel = "debian-6.1"
apparmor = APPARMOR
image = "bookworm"
profile = ["default", "unconfined-aa"]

"#;

    #[test]
    fn apparmor_on_gives_its_own_engine_guest_and_a_profile_names_the_container_s_profile() {
        let text =
            format!("{APPARMOR_MATRIX}{ONE_BWRAP_CELL}").replace("APPARMOR", r#"["off", "on"]"#);
        let m = load_str(Path::new("m.toml"), &text).expect("valid");
        let gds: Vec<_> = m
            .cells
            .iter()
            .filter_map(|c| c.env.guest_docker())
            .collect();
        assert_eq!(gds.len(), 4);
        let on: Vec<_> = gds.iter().filter(|g| g.apparmor).collect();
        assert_eq!(on.len(), 2);
        assert_ne!(
            on[0].guest_key(),
            gds.iter().find(|g| !g.apparmor).unwrap().guest_key()
        );
        let p = m
            .cells
            .iter()
            .filter_map(|c| c.env.guest_docker())
            .find_map(|g| {
                g.container
                    .profile
                    .clone()
                    .filter(|p| p.name == "unconfined-aa")
            })
            .unwrap();
        assert_eq!(p.security_opt, ["apparmor=unconfined"]);
    }

    #[test]
    fn an_apparmor_value_that_is_not_on_or_off_names_its_line() {
        let text = format!("{APPARMOR_MATRIX}{ONE_BWRAP_CELL}").replace("APPARMOR", r#""yes""#);
        let err = load_str(Path::new("m.toml"), &text).expect_err("bad value");
        let msg = err.to_string();
        assert!(msg.contains("m.toml:13:12:"), "{msg}");
        assert_eq!(msg.matches("is not on or off").count(), 1, "{msg}");
        assert!(msg.contains("apparmor `yes` is not on or off"), "{msg}");
    }

    const VCPUS_MATRIX: &str = r#"
[[environment]]
name = "q"
backend = "qemu"
kernel = "debian-6.1"
vcpus = VCPUS

"#;

    #[test]
    fn vcpus_default_to_one_and_a_list_names_each_guest() {
        let text = format!("{VCPUS_MATRIX}{ONE_BWRAP_CELL}").replace("vcpus = VCPUS\n", "");
        let m = load_str(Path::new("m.toml"), &text).expect("valid");
        let q = m.cells[0].env.qemu().unwrap();
        assert_eq!(q.vcpus, 1);
        assert_eq!(m.cells[0].env.id, "q");

        let text = format!("{VCPUS_MATRIX}{ONE_BWRAP_CELL}").replace("VCPUS", "[1, 2]");
        let m = load_str(Path::new("m.toml"), &text).expect("valid");
        let ids: Vec<(&str, u32)> = m
            .cells
            .iter()
            .map(|c| (c.env.id.as_str(), c.env.qemu().unwrap().vcpus))
            .collect();
        assert_eq!(ids, [("q-1cpu", 1), ("q-2cpu", 2)]);
    }

    #[test]
    fn a_vcpus_value_out_of_range_names_its_line() {
        for bad in ["0", "17", r#""two""#] {
            let text = format!("{VCPUS_MATRIX}{ONE_BWRAP_CELL}").replace("VCPUS", bad);
            let err = load_str(Path::new("m.toml"), &text).expect_err("bad value");
            let msg = err.to_string();
            assert!(msg.contains("m.toml:6:9:"), "{bad}: {msg}");
            assert!(msg.contains("is not a number from 1 to 16"), "{bad}: {msg}");
        }
    }
}
