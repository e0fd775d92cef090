//! `heatmap.svg`: the shape of a run at a glance. One row per environment, one column per
//! subject; a tile is split by the statuses of its cells (worst first, widths proportional to
//! counts) and outlined, with a corner mark, where something changed against the baseline.
//!
//! Plain SVG 1.1 with no scripts or external fonts, so GitHub, browsers and `rsvg-convert`
//! all draw it. Each tile carries `data-environment`, `data-subject` and `data-status` (its
//! worst status) so tests can find it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use super::model::{RunResults, Status};

pub const FILE_NAME: &str = "heatmap.svg";

pub const TILE_W: u32 = 44;
pub const TILE_H: u32 = 20;
const GAP: u32 = 2;
const CHAR_W: f64 = 7.2;
const PAD: u32 = 10;

/// The fill of each status (also the legend).
pub fn colour(s: Status) -> &'static str {
    match s {
        Status::Pass => "#2da44e",
        Status::Xfail => "#e3b341",
        Status::Fail => "#cf222e",
        Status::Xpass => "#bf3989",
        Status::Error => "#6e40c9",
        Status::Skip => "#afb8c1",
    }
}

fn legend_text(s: Status) -> &'static str {
    match s {
        Status::Pass => "PASS",
        Status::Xfail => "XFAIL (expected failure)",
        Status::Fail => "FAIL",
        Status::Xpass => "XPASS",
        Status::Error => "ERROR (harness)",
        Status::Skip => "SKIP",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Render the heat map; `changed` holds the (environment, subject) pairs to mark.
pub fn render(run: &RunResults, changed: &BTreeSet<(String, String)>) -> String {
    let mut envs: Vec<&str> = Vec::new();
    let mut subjects: Vec<&str> = Vec::new();
    let mut tiles: BTreeMap<(&str, &str), BTreeMap<Status, usize>> = BTreeMap::new();
    let mut sigs: BTreeMap<(&str, &str), BTreeMap<&str, usize>> = BTreeMap::new();
    for c in &run.cells {
        if !envs.contains(&c.environment.as_str()) {
            envs.push(&c.environment);
        }
        if !subjects.contains(&c.subject.as_str()) {
            subjects.push(&c.subject);
        }
        let key = (c.environment.as_str(), c.subject.as_str());
        *tiles.entry(key).or_default().entry(c.status).or_default() += 1;
        if let Some(s) = &c.signature {
            *sigs.entry(key).or_default().entry(s.as_str()).or_default() += 1;
        }
    }
    let label_w =
        (envs.iter().map(|e| e.chars().count()).max().unwrap_or(4) as f64 * CHAR_W) as u32 + PAD;
    // Subject labels are rotated by -45°: their height is their length × sin 45°.
    let head_h = (subjects
        .iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(4) as f64
        * CHAR_W
        * std::f64::consts::FRAC_1_SQRT_2) as u32
        + 2 * PAD
        + 16;
    let grid_x = PAD + label_w;
    let grid_y = head_h;
    let grid_w = subjects.len() as u32 * (TILE_W + GAP);
    let grid_h = envs.len() as u32 * (TILE_H + GAP);
    let legend_y = grid_y + grid_h + PAD;
    let legend_h = 2 * (TILE_H + GAP) + 2 * PAD;
    // Room for the rotated labels of the last columns to the right.
    let width = (grid_x + grid_w + head_h).max(grid_x + 4 * 150);
    let height = legend_y + legend_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="DejaVu Sans Mono, monospace" font-size="12">"#
    );
    let _ = writeln!(
        s,
        "<title>nsmatrix {}: {} cells, environments × subjects</title>",
        esc(&run.run_name),
        run.cells.len()
    );
    let _ = writeln!(
        s,
        r##"<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="{PAD}" y="{}" font-size="13" font-weight="bold" fill="#24292f">{} · {} cells</text>"##,
        PAD + 10,
        esc(&run.run_name),
        run.cells.len()
    );
    for (j, subj) in subjects.iter().enumerate() {
        let x = grid_x + j as u32 * (TILE_W + GAP) + TILE_W / 2;
        let y = grid_y - 6;
        let _ = writeln!(
            s,
            r##"<text x="{x}" y="{y}" transform="rotate(-45 {x} {y})" fill="#24292f">{}</text>"##,
            esc(subj)
        );
    }
    for (i, env) in envs.iter().enumerate() {
        let y = grid_y + i as u32 * (TILE_H + GAP);
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end" fill="#24292f">{}</text>"##,
            grid_x - 6,
            y + TILE_H - 6,
            esc(env)
        );
        for (j, subj) in subjects.iter().enumerate() {
            let x = grid_x + j as u32 * (TILE_W + GAP);
            let Some(counts) = tiles.get(&(*env, *subj)) else {
                let _ = writeln!(
                    s,
                    r##"<rect x="{x}" y="{y}" width="{TILE_W}" height="{TILE_H}" fill="#ffffff" stroke="#d0d7de"/>"##
                );
                continue;
            };
            let total: usize = counts.values().sum();
            let mut order: Vec<(Status, usize)> = counts.iter().map(|(k, v)| (*k, *v)).collect();
            order.sort_by_key(|(st, n)| (std::cmp::Reverse(st.severity()), *st, *n));
            let worst = order[0].0;
            let sig = sigs
                .get(&(*env, *subj))
                .and_then(|m| m.iter().max_by_key(|(_, n)| **n))
                .map(|(s, _)| format!(", mostly {s}"))
                .unwrap_or_default();
            let summary: Vec<String> = order
                .iter()
                .map(|(st, n)| format!("{n} {}", st.as_str()))
                .collect();
            let is_changed = changed.contains(&(env.to_string(), subj.to_string()));
            let _ = writeln!(
                s,
                r#"<g data-environment="{}" data-subject="{}" data-status="{}" data-changed="{is_changed}"><title>{} × {}: {}{}{}</title>"#,
                esc(env),
                esc(subj),
                worst.as_str(),
                esc(env),
                esc(subj),
                summary.join(", "),
                esc(&sig),
                if is_changed {
                    " (changed against the baseline)"
                } else {
                    ""
                }
            );
            let mut off = 0u32;
            for (k, (st, n)) in order.iter().enumerate() {
                let w = if k + 1 == order.len() {
                    TILE_W - off
                } else {
                    ((*n as f64 / total as f64) * TILE_W as f64)
                        .round()
                        .max(1.0) as u32
                };
                let _ = writeln!(
                    s,
                    r#"<rect x="{}" y="{y}" width="{w}" height="{TILE_H}" fill="{}"/>"#,
                    x + off,
                    colour(*st)
                );
                off += w;
            }
            if is_changed {
                let _ = writeln!(
                    s,
                    r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#000000" stroke-width="3"/>"##,
                    x + 1,
                    y + 1,
                    TILE_W - 2,
                    TILE_H - 2
                );
                let _ = writeln!(
                    s,
                    r##"<path d="M{} {y} L{} {y} L{} {} Z" fill="#000000"/>"##,
                    x + TILE_W - 10,
                    x + TILE_W,
                    x + TILE_W,
                    y + 10
                );
            }
            let _ = writeln!(s, "</g>");
        }
    }
    // Legend: two rows of three.
    for (k, st) in Status::ALL.iter().enumerate() {
        let x = PAD + (k as u32 % 3) * 200;
        let y = legend_y + PAD + (k as u32 / 3) * (TILE_H + GAP);
        let _ = writeln!(
            s,
            r##"<rect x="{x}" y="{y}" width="{}" height="{}" fill="{}"/><text x="{}" y="{}" fill="#24292f">{}</text>"##,
            TILE_H,
            TILE_H - 4,
            colour(*st),
            x + TILE_H + 6,
            y + TILE_H - 7,
            legend_text(*st)
        );
    }
    if !changed.is_empty() {
        let x = PAD + 3 * 200;
        let y = legend_y + PAD;
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="#ffffff" stroke="#000000" stroke-width="3"/><text x="{}" y="{}" fill="#24292f">changed vs baseline</text>"##,
            x + 1,
            y + 1,
            TILE_H - 2,
            TILE_H - 6,
            x + TILE_H + 6,
            y + TILE_H - 7
        );
    }
    s.push_str("</svg>\n");
    s
}
