//! The run's timeline: where the time went. The scheduler records when each batch held which
//! job slots and when each of its stages ran; `timeline.svg` draws one lane per job slot with
//! every batch as a bar split into its stages, and lists the slowest batches.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = "timeline.svg";

/// How the run's batches were laid out on the machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Timeline {
    /// Job slots (`--jobs`).
    pub jobs: u32,
    /// Memory the scheduler gave batches, in MiB (available memory at the start minus a
    /// reserve); absent when unknown (no limit was applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget_mb: Option<u64>,
    /// From the run's start to its first batch (planning, images, Codex packages).
    pub dispatch_start_ms: u64,
    /// From the run's start to its last batch's end.
    pub dispatch_end_ms: u64,
    pub spans: Vec<Span>,
}

/// One attempt of one batch (retries and repeats are spans of their own).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Span {
    pub batch: String,
    pub environment: String,
    pub backend: String,
    /// The job slots it held (0-based), as many as its vCPUs.
    pub lanes: Vec<u32>,
    #[serde(default)]
    pub memory_mb: u64,
    pub cells: usize,
    /// From the run's start.
    pub start_ms: u64,
    pub end_ms: u64,
    pub stages: Vec<StageSpan>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub failed: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StageSpan {
    pub stage: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

impl Span {
    pub fn duration_ms(&self) -> u64 {
        self.end_ms.saturating_sub(self.start_ms)
    }

    /// Milliseconds in `stage` (a stage may be reported more than once).
    pub fn stage_ms(&self, stage: &str) -> u64 {
        self.stages
            .iter()
            .filter(|s| s.stage == stage)
            .map(|s| s.end_ms.saturating_sub(s.start_ms))
            .sum()
    }
}

impl Timeline {
    /// Slot-milliseconds the batches held: each batch's time × the slots it held.
    pub fn busy_ms(&self) -> u64 {
        self.spans
            .iter()
            .map(|s| s.duration_ms() * s.lanes.len().max(1) as u64)
            .sum()
    }

    /// From the first batch's start to the last one's end.
    pub fn dispatch_ms(&self) -> u64 {
        self.dispatch_end_ms.saturating_sub(self.dispatch_start_ms)
    }

    /// The dispatch's wall time against a perfect packing of the batches onto the slots
    /// (their slot time ÷ jobs): 1.0 is every slot busy all the time.
    pub fn packing_ratio(&self) -> Option<f64> {
        let ideal = self.busy_ms() as f64 / f64::from(self.jobs.max(1));
        (ideal > 0.0).then(|| self.dispatch_ms() as f64 / ideal)
    }

    /// The `n` longest spans, longest first.
    pub fn slowest(&self, n: usize) -> Vec<&Span> {
        let mut v: Vec<&Span> = self.spans.iter().collect();
        v.sort_by(|a, b| {
            b.duration_ms()
                .cmp(&a.duration_ms())
                .then_with(|| a.batch.cmp(&b.batch))
        });
        v.truncate(n);
        v
    }

    /// Time per backend from its first batch's start to its last batch's end (a part of the
    /// run, as the README's figures name it), in order of first start.
    pub fn parts(&self) -> Vec<(String, u64, u64)> {
        let mut parts: Vec<(String, u64, u64)> = Vec::new();
        for s in &self.spans {
            match parts.iter_mut().find(|p| p.0 == s.backend) {
                Some(p) => {
                    p.1 = p.1.min(s.start_ms);
                    p.2 = p.2.max(s.end_ms);
                }
                None => parts.push((s.backend.clone(), s.start_ms, s.end_ms)),
            }
        }
        parts.sort_by_key(|p| p.1);
        parts
    }
}

/// Stage colours (and the legend's names for them).
const STAGES: &[(&str, &str, &str)] = &[
    ("provision", "provision", "#9aa7b8"),
    ("start", "boot / start", "#f0a040"),
    ("run", "cells", "#4caf6a"),
    ("teardown", "teardown", "#8e6bbf"),
];
const OTHER: &str = "#c8ccd2";

const WIDTH: f64 = 1100.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const LANE: f64 = 26.0;
const TOP: f64 = 48.0;
const SLOWEST: usize = 10;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// A one-line summary of the schedule for `report.md` and the SVG's header.
pub fn summary(t: &Timeline, run_ms: u64) -> String {
    let mut s = format!(
        "{} batches on {} job slot(s){}; run {}, batches {} (from the first's start to the last's end), their slot time {}",
        t.spans.len(),
        t.jobs,
        t.memory_budget_mb
            .map(|m| format!(" and {m} MiB"))
            .unwrap_or_default(),
        secs(run_ms),
        secs(t.dispatch_ms()),
        secs(t.busy_ms()),
    );
    if let Some(r) = t.packing_ratio() {
        let _ = write!(s, "; wall ÷ (slot time ÷ jobs) = {r:.2}");
    }
    s
}

/// The SVG: one lane per job slot, a bar per batch split into its stages, a time axis, the
/// legend and the slowest batches.
pub fn render(t: &Timeline, run_ms: u64) -> String {
    let lanes = t.jobs.max(1);
    let t0 = t.dispatch_start_ms;
    let span_ms = t.dispatch_ms().max(1) as f64;
    let plot = WIDTH - LEFT - RIGHT;
    let x = |ms: u64| LEFT + (ms.saturating_sub(t0) as f64 / span_ms) * plot;
    let lanes_bottom = TOP + f64::from(lanes) * LANE;
    let slowest = t.slowest(SLOWEST);
    let height = lanes_bottom + 80.0 + 16.0 * (slowest.len() as f64 + 1.0);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="18" font-size="13" font-weight="bold" fill="#24292f">Timeline · {}</text>"##,
        esc(&summary(t, run_ms))
            .split("; run")
            .next()
            .unwrap_or_default()
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="34" fill="#57606a">{}</text>"##,
        esc(&format!(
            "run {}, batches {} from {} after the start, slot time {}{}",
            secs(run_ms),
            secs(t.dispatch_ms()),
            secs(t0),
            secs(t.busy_ms()),
            t.packing_ratio()
                .map(|r| format!(", wall ÷ (slot time ÷ jobs) = {r:.2}"))
                .unwrap_or_default()
        ))
    );
    for l in 0..lanes {
        let y = TOP + f64::from(l) * LANE;
        let fill = if l % 2 == 0 { "#f6f8fa" } else { "#eef1f4" };
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{y}" width="{plot}" height="{LANE}" fill="{fill}"/><text x="8" y="{}" fill="#24292f">slot {}</text>"##,
            y + LANE / 2.0 + 4.0,
            l + 1
        );
    }
    // Time axis: about ten ticks at a round step.
    let total_s = span_ms / 1000.0;
    let step = [1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0]
        .into_iter()
        .find(|s| total_s / s <= 12.0)
        .unwrap_or(1200.0);
    let mut tick = 0.0;
    while tick <= total_s + 1e-9 {
        let tx = LEFT + tick / total_s.max(1e-9) * plot;
        let _ = writeln!(
            svg,
            r##"<line x1="{tx:.1}" y1="{TOP}" x2="{tx:.1}" y2="{}" stroke="#d0d7de" stroke-width="0.5"/><text x="{tx:.1}" y="{}" text-anchor="middle" fill="#57606a">{tick:.0} s</text>"##,
            lanes_bottom + 4.0,
            lanes_bottom + 16.0
        );
        tick += step;
    }
    for s in &t.spans {
        let title = esc(&span_title(s));
        for &lane in &s.lanes {
            let y = TOP + f64::from(lane) * LANE + 3.0;
            let h = LANE - 6.0;
            let _ = writeln!(svg, "<g><title>{title}</title>");
            let (bx, bw) = (x(s.start_ms), (x(s.end_ms) - x(s.start_ms)).max(1.0));
            let _ = writeln!(
                svg,
                r#"<rect x="{bx:.1}" y="{y:.1}" width="{bw:.1}" height="{h:.1}" fill="{OTHER}"/>"#
            );
            for st in &s.stages {
                let colour = STAGES
                    .iter()
                    .find(|c| c.0 == st.stage)
                    .map_or(OTHER, |c| c.2);
                let sx = x(st.start_ms.max(s.start_ms));
                let sw = (x(st.end_ms.min(s.end_ms)) - sx).max(0.0);
                let _ = writeln!(
                    svg,
                    r#"<rect x="{sx:.1}" y="{y:.1}" width="{sw:.1}" height="{h:.1}" fill="{colour}"/>"#
                );
            }
            let stroke = if s.failed { "#cf222e" } else { "#57606a" };
            let _ = writeln!(
                svg,
                r#"<rect x="{bx:.1}" y="{y:.1}" width="{bw:.1}" height="{h:.1}" fill="none" stroke="{stroke}" stroke-width="0.6"/>"#
            );
            // A label where it fits (about 6 px per character).
            let fits = ((bw - 4.0) / 6.0).floor() as usize;
            if fits >= 4 {
                let label: String = s.batch.chars().take(fits).collect();
                let _ = writeln!(
                    svg,
                    r##"<text x="{:.1}" y="{:.1}" fill="#0b0f14" font-size="10">{}</text>"##,
                    bx + 2.0,
                    y + h / 2.0 + 3.5,
                    esc(&label)
                );
            }
            let _ = writeln!(svg, "</g>");
        }
    }
    let mut lx = LEFT;
    let ly = lanes_bottom + 30.0;
    for (_, name, colour) in STAGES {
        let _ = writeln!(
            svg,
            r##"<rect x="{lx}" y="{}" width="12" height="12" fill="{colour}"/><text x="{}" y="{}" fill="#24292f">{name}</text>"##,
            ly - 10.0,
            lx + 16.0,
            ly
        );
        lx += 24.0 + 7.0 * name.len() as f64;
    }
    let _ = writeln!(
        svg,
        r##"<text x="{lx}" y="{ly}" fill="#57606a">(red outline: the batch failed; hover a bar for its stages)</text>"##
    );
    let mut y = ly + 24.0;
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="{y}" font-weight="bold" fill="#24292f">Slowest batches</text>"##
    );
    for s in slowest {
        y += 16.0;
        let _ = writeln!(
            svg,
            r##"<text x="{LEFT}" y="{y}" fill="#24292f">{}</text>"##,
            esc(&span_title(s))
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// `batch (backend): 12.3 s = provision 0.1 s + boot / start 8.0 s + ...`
pub fn span_title(s: &Span) -> String {
    let mut parts = Vec::new();
    for (key, name, _) in STAGES {
        let ms = s.stage_ms(key);
        if s.stages.iter().any(|st| st.stage == *key) {
            parts.push(format!("{name} {}", secs(ms)));
        }
    }
    format!(
        "{} ({}, {} cells): {}{}{}",
        s.batch,
        s.backend,
        s.cells,
        secs(s.duration_ms()),
        if parts.is_empty() {
            String::new()
        } else {
            format!(" = {}", parts.join(" + "))
        },
        if s.failed { ", failed" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(batch: &str, lane: u32, start: u64, end: u64) -> Span {
        Span {
            batch: batch.into(),
            environment: batch.into(),
            backend: "qemu".into(),
            lanes: vec![lane],
            memory_mb: 640,
            cells: 3,
            start_ms: start,
            end_ms: end,
            stages: vec![
                StageSpan {
                    stage: "provision".into(),
                    start_ms: start,
                    end_ms: start + 100,
                },
                StageSpan {
                    stage: "start".into(),
                    start_ms: start + 100,
                    end_ms: end - 1000,
                },
                StageSpan {
                    stage: "run".into(),
                    start_ms: end - 1000,
                    end_ms: end,
                },
            ],
            failed: false,
        }
    }

    fn sample() -> Timeline {
        Timeline {
            jobs: 2,
            memory_budget_mb: Some(20_000),
            dispatch_start_ms: 1_000,
            dispatch_end_ms: 11_000,
            spans: vec![
                span("qemu-a", 0, 1_000, 11_000),
                span("qemu-b<&>", 1, 1_000, 6_000),
            ],
        }
    }

    #[test]
    fn packing_ratio_is_wall_over_ideal() {
        let t = sample();
        assert_eq!(t.busy_ms(), 15_000);
        assert_eq!(t.dispatch_ms(), 10_000);
        // Ideal: 15 s of slot time on 2 slots = 7.5 s; wall 10 s.
        let r = t.packing_ratio().unwrap();
        assert!((r - 10.0 / 7.5).abs() < 1e-9, "{r}");
        assert_eq!(t.slowest(1)[0].batch, "qemu-a");
        assert_eq!(t.parts(), vec![("qemu".to_string(), 1_000, 11_000)]);
    }

    #[test]
    fn svg_has_a_lane_per_slot_stage_bars_and_the_slowest() {
        let svg = render(&sample(), 12_000);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(
            svg.contains(">slot 1<") && svg.contains(">slot 2<"),
            "{svg}"
        );
        assert!(!svg.contains(">slot 3<"));
        for (_, _, colour) in STAGES.iter().take(3) {
            assert!(svg.contains(&format!("fill=\"{colour}\"")), "{colour}");
        }
        assert!(svg.contains("Slowest batches"));
        assert!(svg.contains("qemu-b&lt;&amp;&gt;"), "names are escaped");
        assert!(!svg.contains("qemu-b<&>"));
        let title = span_title(&sample().spans[0]);
        assert_eq!(
            title,
            "qemu-a (qemu, 3 cells): 10.0 s = provision 0.1 s + boot / start 8.9 s + cells 1.0 s"
        );
        // The longest batch is listed first.
        let a = svg.rfind("qemu-a (qemu").unwrap();
        let b = svg.rfind("qemu-b&lt;&amp;&gt; (qemu").unwrap();
        assert!(a < b);
    }
}
