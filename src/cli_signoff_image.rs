//! `nsmatrix signoff-image OLD NEW`: sign off a container image against the one it replaces,
//! on a deployment matrix (built in, or `--deployments FILE`), with the subjects found in the
//! images themselves. It writes a matrix, runs it exactly as `run` does (reports land the same
//! way), and gives `signoff`'s verdict on `image`: old → new.

use std::path::{Path, PathBuf};

use clap::Args;
use toml::{Table, Value};

use crate::exit;
use crate::text::error_chain;

/// The built-in deployment matrix (see the file's own comments).
pub const BUILTIN_DEPLOYMENTS: &str = include_str!("../vm-images/deployments.toml");

/// Top-level keys a deployments file may have.
const DEPLOYMENT_KEYS: &[&str] = &[
    "settings",
    "profile",
    "sysctl-set",
    "environment",
    "exclude",
];

#[derive(Args, Debug, Clone)]
#[command(
    about = "Sign off an image against the one it replaces, on a deployment matrix",
    long_about = "OLD and NEW are image references in the local engine, or Dockerfiles, which \
                  nsmatrix builds here without a registry (`ARG BASE` / `FROM ${BASE}` is its \
                  bookworm base image; the build context is the Dockerfile's directory; cached by \
                  content hash). Both images run on every deployment of the matrix (built in: \
                  Docker's default profile, the holyclaude compose shape with and without \
                  NET_ADMIN, no-new-privileges, as the image's user and as root, and a Docker \
                  engine in a guest of the Synology-like kernel; `--deployments FILE` replaces \
                  it) with the subjects found in the images: their bwrap as installed, their own \
                  Codex (`codex` on PATH or npm's global location) run as the cell's user \
                  through its own sandbox, and nsmatrix's pinned Codex as a reference. A \
                  subject an image lacks fails as missing (`bwrap-missing`, `codex-missing`). \
                  Reports land as for `run`; the verdict is `signoff --axis image --from old \
                  --to new` on that run. Exit codes as `signoff`: 0 SHIP, 1 DO NOT SHIP, 2 bad \
                  input, 3 NO VERDICT (errors), 4 NO VERDICT (lost coverage).",
    after_help = "Examples:\n  nsmatrix signoff-image vm-images/docker/agent-1.1.5.Dockerfile vm-images/docker/agent-1.1.6.Dockerfile\n  nsmatrix signoff-image myorg/agent:1.1.5 myorg/agent:1.1.6 --deployments my-deployments.toml\n  nsmatrix signoff-image old.Dockerfile new.Dockerfile --out reports/release --format json"
)]
pub struct SignoffImageArgs {
    /// The image being replaced: a local image reference or a Dockerfile.
    pub old: String,
    /// The candidate image: a local image reference or a Dockerfile.
    pub new: String,
    /// A deployment matrix replacing the built-in one (`nsmatrix signoff-image --print-deployments`
    /// shows the built-in one to start from).
    #[arg(long, value_name = "FILE")]
    pub deployments: Option<PathBuf>,
    /// Print the built-in deployment matrix and exit.
    #[arg(long, exclusive = true)]
    pub print_deployments: bool,
    /// The scenarios' directory (this checkout's `scenarios/`).
    #[arg(long, default_value = "scenarios", value_name = "DIR")]
    pub scenarios: PathBuf,
    /// Output directory (default: reports/<run name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Batches run at once.
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// One plain line per cell, no progress bars.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[arg(long, value_enum, default_value = "markdown")]
    pub format: crate::cli::Format,
}

/// One side of the sign-off, resolved.
#[derive(Debug, Clone)]
struct Side {
    /// As given on the command line.
    given: String,
    /// The image reference in the engine.
    reference: String,
    user: crate::backend::docker::ImageUser,
}

/// `nsmatrix signoff-image`.
pub fn signoff_image(a: SignoffImageArgs) -> u8 {
    if a.print_deployments {
        print!("{BUILTIN_DEPLOYMENTS}");
        return exit::OK;
    }
    let (deploy_name, deploy_text) = match &a.deployments {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => (p.display().to_string(), t),
            Err(e) => {
                eprintln!("nsmatrix signoff-image: --deployments {}: {e}", p.display());
                return exit::BAD_INPUT;
            }
        },
        None => (
            "the built-in deployment matrix".to_string(),
            BUILTIN_DEPLOYMENTS.to_string(),
        ),
    };
    let deployments = match parse_deployments(&deploy_name, &deploy_text) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{e}");
            return exit::BAD_INPUT;
        }
    };
    let scenarios = match std::fs::canonicalize(&a.scenarios) {
        Ok(p) if p.is_dir() => p,
        _ => {
            eprintln!(
                "nsmatrix signoff-image: the scenarios directory {} does not exist: run from the nsmatrix checkout or pass --scenarios DIR",
                a.scenarios.display()
            );
            return exit::BAD_INPUT;
        }
    };
    let Some(rt) = crate::run::runtime() else {
        return exit::ERRORS;
    };
    let sides = match rt.block_on(resolve_sides(&a.old, &a.new)) {
        Ok(s) => s,
        Err((code, e)) => {
            eprintln!("nsmatrix signoff-image: {e}");
            return code;
        }
    };
    for (label, s) in ["old", "new"].iter().zip(&sides) {
        eprintln!(
            "nsmatrix: {label} = {} ({}; runs as {})",
            s.given,
            s.reference,
            if s.user.name.is_empty() {
                "root: no USER".to_string()
            } else {
                format!("USER {} = uid {}", s.user.name, s.user.uid)
            }
        );
    }
    let matrix = match build_matrix(&deployments, &sides, &scenarios) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("nsmatrix signoff-image: {deploy_name}: {e}");
            return exit::BAD_INPUT;
        }
    };
    let run_name = crate::report::run_name_now();
    let out_dir = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("reports").join(&run_name));
    if let Err(e) = std::fs::create_dir_all(&out_dir) {
        eprintln!("nsmatrix signoff-image: {}: {e}", out_dir.display());
        return exit::BAD_INPUT;
    }
    let matrix_path = out_dir.join("signoff-matrix.toml");
    if let Err(e) = std::fs::write(&matrix_path, &matrix) {
        eprintln!("nsmatrix signoff-image: {}: {e}", matrix_path.display());
        return exit::ERRORS;
    }
    eprintln!(
        "nsmatrix: the matrix of this sign-off is {} (`nsmatrix run --matrix` runs it again)",
        matrix_path.display()
    );
    let code = crate::cli::run(crate::cli::RunArgs {
        matrix: matrix_path.clone(),
        filters: Vec::new(),
        jobs: a.jobs,
        out: Some(out_dir.clone()),
        fail_fast: false,
        quiet: a.quiet,
        baseline: None,
        shard: None,
        repeat: 1,
        require: Some("none".into()),
        allow_unused_rules: true,
    });
    if code == exit::BAD_INPUT {
        eprintln!(
            "nsmatrix signoff-image: the generated matrix {} was refused (see above): fix {deploy_name}",
            matrix_path.display()
        );
        return code;
    }
    let run = match crate::report::load::load(&out_dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nsmatrix signoff-image: no results: {}", error_chain(&e));
            return exit::ERRORS;
        }
    };
    let s = match crate::report::signoff::signoff(&run, "image", "old", "new") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nsmatrix signoff-image: {}", error_chain(&e));
            return exit::ERRORS;
        }
    };
    let subjects = subjects_found(&run, &sides);
    let md = format!("{}\n{}\n{}", header(&sides), subjects, s.render_markdown());
    let json = serde_json::to_string_pretty(&s).expect("signoff serialises");
    let _ = std::fs::write(out_dir.join("signoff.md"), &md);
    let _ = std::fs::write(out_dir.join("signoff.json"), &json);
    match a.format {
        crate::cli::Format::Markdown => print!("{md}"),
        crate::cli::Format::Json => println!("{json}"),
    }
    eprintln!(
        "nsmatrix: {} (signoff.md and signoff.json in {}/)",
        s.verdict_line,
        out_dir.display()
    );
    s.exit_code()
}

/// Build or find both images and the users they run as. Errors carry their exit code.
async fn resolve_sides(old: &str, new: &str) -> Result<Vec<Side>, (u8, String)> {
    let docker = crate::backend::docker::connect()
        .await
        .map_err(|u| (exit::ERRORS, format!("{} (fix: {})", u.reason, u.fix)))?;
    let mut sides = Vec::new();
    for given in [old, new] {
        let path = Path::new(given);
        let reference = if path.is_file() {
            let mut say = |m: &str| eprintln!("nsmatrix: {m}");
            docker
                .build_user_dockerfile(path, &mut say)
                .await
                .map_err(|e| (exit::ERRORS, format!("{e:#}")))?
        } else if given.ends_with("Dockerfile") || given.contains(".Dockerfile") {
            return Err((
                exit::BAD_INPUT,
                format!("{given}: no such Dockerfile (an image reference does not look like this)"),
            ));
        } else {
            docker
                .ensure_local_image(given)
                .await
                .map_err(|e| (exit::BAD_INPUT, format!("{e:#}")))?
        };
        let user = docker
            .image_user(&reference)
            .await
            .map_err(|e| (exit::BAD_INPUT, format!("{e:#}")))?;
        sides.push(Side {
            given: given.to_string(),
            reference,
            user,
        });
    }
    Ok(sides)
}

/// The 1-based line of the first occurrence of `needle` in `text` (for error messages).
fn line_of(text: &str, needle: &str) -> usize {
    text.find(needle)
        .map(|i| text[..i].lines().count().max(1))
        .unwrap_or(1)
}

/// Parse and check a deployments file: its keys, and environments that name no image and are
/// container environments.
fn parse_deployments(name: &str, text: &str) -> Result<Table, String> {
    let t: Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| text[..s.start].lines().count().max(1))
            .unwrap_or(1);
        format!("{name}:{line}: error: {}", e.message())
    })?;
    for k in t.keys() {
        if !DEPLOYMENT_KEYS.contains(&k.as_str()) {
            return Err(format!(
                "{name}:{}: error: `{k}` does not belong in a deployment matrix\n  help: a deployment matrix has {}; the images and subjects are signoff-image's own",
                line_of(text, k),
                DEPLOYMENT_KEYS.join(", ")
            ));
        }
    }
    let envs = t
        .get("environment")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if envs.is_empty() {
        return Err(format!(
            "{name}:1: error: no [[environment]]: a deployment matrix needs at least one docker or guest-docker environment"
        ));
    }
    for e in &envs {
        let env_name = e.get("name").and_then(Value::as_str).unwrap_or("?");
        let at = line_of(text, &format!("\"{env_name}\""));
        if e.get("image").is_some() {
            return Err(format!(
                "{name}:{at}: error: environment `{env_name}` names an `image`\n  help: leave it out: signoff-image runs both images in every environment"
            ));
        }
        match e.get("backend").and_then(Value::as_str) {
            Some("docker" | "guest-docker") => {}
            other => {
                return Err(format!(
                    "{name}:{at}: error: environment `{env_name}` has backend {other:?}\n  help: an image runs in `docker` or `guest-docker` environments"
                ));
            }
        }
    }
    Ok(t)
}

/// The matrix of a sign-off: the deployments with both images filled in and `uid = "image"`
/// resolved, the subjects found in the images, and the smoke scenarios.
fn build_matrix(deployments: &Table, sides: &[Side], scenarios: &Path) -> Result<String, String> {
    let mut m = deployments.clone();
    let mut image_uids: Vec<i64> = sides.iter().map(|s| i64::from(s.user.uid)).collect();
    image_uids.dedup();
    let mut images = Table::new();
    for (label, s) in ["old", "new"].iter().zip(sides) {
        let mut t = Table::new();
        t.insert("reference".into(), Value::String(s.reference.clone()));
        t.insert(
            "description".into(),
            Value::String(format!("{} (signoff-image's {label} side)", s.given)),
        );
        images.insert((*label).into(), Value::Table(t));
    }
    m.insert("image".into(), Value::Table(images));
    let mut guest = false;
    if let Some(Value::Array(envs)) = m.get_mut("environment") {
        for e in envs.iter_mut() {
            let Some(t) = e.as_table_mut() else {
                return Err("[[environment]] entries must be tables".into());
            };
            guest |= t.get("backend").and_then(Value::as_str) == Some("guest-docker");
            t.insert(
                "image".into(),
                Value::Array(vec![
                    Value::String("old".into()),
                    Value::String("new".into()),
                ]),
            );
            let uids: Vec<Value> = match t.get("uid") {
                None => vec![Value::String("image".into())],
                Some(Value::Array(a)) => a.clone(),
                Some(v) => vec![v.clone()],
            };
            let mut out: Vec<i64> = Vec::new();
            for u in uids {
                match u {
                    Value::String(s) if s == "image" => out.extend(&image_uids),
                    Value::Integer(i) => out.push(i),
                    other => {
                        return Err(format!(
                            "uid {other} is neither a number nor \"image\" (the image's own user)"
                        ));
                    }
                }
            }
            let mut seen = Vec::new();
            out.retain(|u| {
                let new = !seen.contains(u);
                seen.push(*u);
                new
            });
            t.insert(
                "uid".into(),
                Value::Array(out.into_iter().map(Value::Integer).collect()),
            );
        }
    }
    let subject = |pairs: &[(&str, Value)]| {
        Value::Table(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    };
    let s = |x: &str| Value::String(x.into());
    m.insert(
        "subject".into(),
        Value::Array(vec![
            subject(&[
                ("name", s("bwrap")),
                ("kind", s("bwrap")),
                (
                    "description",
                    s("the image's own bwrap as installed (setuid or not), with Codex's argv"),
                ),
                ("build", s("system")),
                ("setuid", s("as-is")),
                ("argv", s("codex")),
            ]),
            subject(&[
                ("name", s("image-codex")),
                ("kind", s("image-codex")),
                (
                    "description",
                    s("the image's own Codex CLI, run as the cell's user through its own sandbox"),
                ),
            ]),
            subject(&[
                ("name", s("codex")),
                ("kind", s("codex")),
                (
                    "description",
                    s("nsmatrix's pinned Codex CLI (from npm), carried in as a reference"),
                ),
                ("version", s(crate::agent::PINNED_CODEX)),
            ]),
        ]),
    );
    m.insert(
        "scenarios".into(),
        Value::Array(vec![subject(&[
            ("name", s("smoke")),
            ("dir", s(&scenarios.display().to_string())),
            (
                "only",
                Value::Array(vec![s("add_file"), s("confine_dotdot_add")]),
            ),
        ])]),
    );
    // Engine guests run under TCG: whether the sandbox starts is what they add.
    if guest {
        let ex = m
            .entry("exclude")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = ex {
            a.push(subject(&[
                ("backend", s("guest-docker")),
                ("scenario", s("confine_dotdot_add")),
            ]));
        }
    }
    let body = toml::to_string(&m).map_err(|e| e.to_string())?;
    Ok(format!(
        "# Written by `nsmatrix signoff-image` for this run: the deployment matrix with both\n# images filled in and the subjects found in them. No expectations: the sign-off judges\n# what was observed, old against new.\n\n{body}"
    ))
}

fn header(sides: &[Side]) -> String {
    let mut md =
        String::from("# Image sign-off\n\n| side | given | image | runs as |\n|---|---|---|---|\n");
    for (label, s) in ["old", "new"].iter().zip(sides) {
        md.push_str(&format!(
            "| {label} | `{}` | `{}` | {} |\n",
            s.given,
            s.reference,
            if s.user.name.is_empty() {
                "root (no USER)".to_string()
            } else {
                format!("`{}` (uid {})", s.user.name, s.user.uid)
            }
        ));
    }
    md
}

/// What each image holds, read from the run's own cells: its bwrap (path, version, setuid
/// bit) and its Codex (version, path, the bwrap it was seen using), or that it has none.
fn subjects_found(run: &crate::report::model::RunResults, sides: &[Side]) -> String {
    let mut md = String::from(
        "## Subjects found in the images\n\n| side | bwrap as installed | its own Codex | bwrap its Codex used (a passing cell's, else the first seen) |\n|---|---|---|---|\n",
    );
    for (label, s) in ["old", "new"].iter().zip(sides) {
        let cells: Vec<&crate::report::model::CellResult> = run
            .cells
            .iter()
            .filter(|c| c.axes.get("image").map(String::as_str) == Some(label))
            .collect();
        let d = |subject: &str, key: &str| -> Option<&str> {
            cells
                .iter()
                .filter(|c| c.axes.get("subject").map(String::as_str) == Some(subject))
                .find_map(|c| c.details.get(key).map(String::as_str))
        };
        let bwrap = match (d("bwrap", "bwrap.path"), d("bwrap", "bwrap.version")) {
            (Some(p), v) => format!(
                "`{p}` {}{}",
                v.unwrap_or("?"),
                if d("bwrap", "bwrap.setuid-bit") == Some("true") {
                    ", setuid root"
                } else {
                    ", not setuid"
                }
            ),
            (None, _) => cells
                .iter()
                .find(|c| {
                    c.axes.get("subject").map(String::as_str) == Some("bwrap")
                        && c.observed == "bwrap-missing"
                })
                .map(|_| "**missing** (`bwrap-missing`)".to_string())
                .unwrap_or_else(|| "not observed (no bwrap cell ran)".into()),
        };
        let codex = match (
            d("image-codex", "codex.path"),
            d("image-codex", "codex.version"),
        ) {
            (Some(p), v) => format!("`{p}` {}", v.unwrap_or("?")),
            (None, _) => cells
                .iter()
                .find(|c| {
                    c.axes.get("subject").map(String::as_str) == Some("image-codex")
                        && c.observed == "codex-missing"
                })
                .map(|c| format!("**missing** (`codex-missing`: {})", c.message))
                .unwrap_or_else(|| "not observed (no image-codex cell ran)".into()),
        };
        // Where the image's Codex passed, what it ran (else the first cell that saw anything).
        let used = cells
            .iter()
            .filter(|c| c.axes.get("subject").map(String::as_str) == Some("image-codex"))
            .filter(|c| c.observed == "pass")
            .find_map(|c| {
                c.details
                    .get("codex.bwrap")
                    .map(|u| format!("{u} (in `{}`)", c.environment))
            })
            .or_else(|| d("image-codex", "codex.bwrap").map(str::to_string))
            .unwrap_or_else(|| "—".into());
        md.push_str(&format!(
            "| {label} (`{}`) | {bwrap} | {codex} | {} |\n",
            s.given,
            used.replace('|', "\\|")
        ));
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::docker::ImageUser;

    fn sides() -> Vec<Side> {
        ["a:1", "a:2"]
            .iter()
            .map(|r| Side {
                given: r.to_string(),
                reference: r.to_string(),
                user: ImageUser {
                    name: "user".into(),
                    uid: 1000,
                },
            })
            .collect()
    }

    #[test]
    fn the_builtin_deployments_expand_to_a_valid_matrix() {
        let d = parse_deployments("builtin", BUILTIN_DEPLOYMENTS).unwrap();
        let text = build_matrix(&d, &sides(), Path::new("/nonexistent/scenarios")).unwrap();
        let t: Table = text.parse().unwrap();
        let envs = t["environment"].as_array().unwrap();
        for e in envs {
            assert_eq!(e["image"].as_array().unwrap().len(), 2);
            let uids: Vec<i64> = e["uid"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_integer().unwrap())
                .collect();
            assert!(uids.contains(&1000), "{uids:?}");
        }
        assert_eq!(t["image"]["old"]["reference"].as_str(), Some("a:1"));
        assert_eq!(t["subject"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn bad_deployments_name_the_file_and_line() {
        let e = parse_deployments(
            "d.toml",
            "[[environment]]\nname = \"x\"\nbackend = \"host\"\n",
        )
        .unwrap_err();
        assert!(e.starts_with("d.toml:2: error:"), "{e}");
        let e = parse_deployments(
            "d.toml",
            "[[environment]]\nname = \"x\"\nbackend = \"docker\"\nimage = \"busybox\"\n",
        )
        .unwrap_err();
        assert!(e.contains("names an `image`"), "{e}");
        let e = parse_deployments("d.toml", "[[subject]]\nname = \"x\"\n").unwrap_err();
        assert!(e.contains("`subject` does not belong"), "{e}");
        let e = parse_deployments("d.toml", "[x\n").unwrap_err();
        assert!(e.starts_with("d.toml:1: error:"), "{e}");
    }

    #[test]
    fn uid_image_is_the_images_user() {
        let d = parse_deployments(
            "d",
            "[[environment]]\nname = \"d\"\nbackend = \"docker\"\nuid = [\"image\", 0, 1000]\n",
        )
        .unwrap();
        let text = build_matrix(&d, &sides(), Path::new("/s")).unwrap();
        let t: Table = text.parse().unwrap();
        let uids = t["environment"][0]["uid"].as_array().unwrap().clone();
        assert_eq!(uids, vec![Value::Integer(1000), Value::Integer(0)]);
        let bad = parse_deployments(
            "d",
            "[[environment]]\nname = \"d\"\nbackend = \"docker\"\nuid = \"root\"\n",
        )
        .unwrap();
        assert!(build_matrix(&bad, &sides(), Path::new("/s")).is_err());
    }
}
