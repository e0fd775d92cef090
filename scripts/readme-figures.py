#!/usr/bin/env python3
"""Print the README's measured figures from a run, so they are regenerated, not hand-written.

Usage: scripts/readme-figures.py RUN_DIR_OR_RESULTS_JSON [BENCH_OUTPUT]

From the run's results.json: cells per backend and status, the run's duration, the host
table (profile x subject: what was observed, most common first) and the Docker table
(profile x image, uid 1000, bwrap subjects), and the AppArmor table (policy set x subject). From a bench's output (`cargo bench` text), the
lines that report medians, as printed. Paste what changed into README.md;
tests/readme_figures.rs fails when the README's cell counts and `nsmatrix list` disagree.
"""
import collections
import json
import os
import sys


def load(path):
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path) as f:
        return json.load(f)


def seen(cells):
    c = collections.Counter(
        "pass" if x["observed"] == "pass" else "`%s`" % x["observed"] for x in cells
    )
    return ", ".join(k if len(c) == 1 else "%s ×%d" % (k, n) for k, n in c.most_common())


def table(cells, row_axis, col_of, cols, title):
    rows = collections.OrderedDict()
    for c in cells:
        rows.setdefault(c["axes"].get(row_axis, "?"), []).append(c)
    print("\n" + title + "\n")
    print("| %s | %s |" % (row_axis, " | ".join(cols)))
    print("|---|%s|" % "|".join("---" for _ in cols))
    for r, cs in rows.items():
        out = []
        for col in cols:
            sel = [c for c in cs if col_of(c) == col]
            out.append(seen(sel) if sel else "—")
        print("| %s | %s |" % (r, " | ".join(out)))


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    run = load(sys.argv[1])
    cells = run["cells"]
    by_backend = collections.Counter(c["backend"] for c in cells)
    print("run %s: %d cells in %.1f s" % (run["run-name"], len(cells), run["duration-ms"] / 1000))
    for b in ("host", "docker", "qemu"):
        st = collections.Counter(c["status"] for c in cells if c["backend"] == b)
        print("  %-6s %5d cells: %s" % (b, by_backend[b], ", ".join("%d %s" % (n, s) for s, n in sorted(st.items()))))
    envs = {c["environment"] for c in cells if c["backend"] == "docker"}
    print("  docker environments (containers): %d" % len(envs))

    def host_col(c):
        if c["axes"].get("kind") == "codex":
            return None
        if c["axes"].get("setuid") != "true":
            return "plain bwrap"
        return "setuid bwrap, Codex argv" if c["axes"].get("argv") == "codex" else "setuid bwrap, legacy argv"

    table(
        [c for c in cells if c["backend"] == "host"],
        "profile",
        host_col,
        ["plain bwrap", "setuid bwrap, Codex argv", "setuid bwrap, legacy argv"],
        "Host:",
    )
    docker = [
        c for c in cells
        if c["backend"] == "docker" and c["axes"].get("uid") == "1000" and c["axes"].get("kind") != "codex"
    ]
    images = sorted({c["axes"].get("image") for c in docker})
    table(docker, "profile", lambda c: c["axes"].get("image"), images, "Docker, uid 1000:")

    def apparmor_col(c):
        a = c["axes"]
        if a.get("kind") == "codex":
            return "Codex, bundled bwrap" if a.get("system-bwrap") == "hidden" else "Codex, `/usr/bin/bwrap`"
        return "setuid bwrap copy" if a.get("setuid") == "true" else "plain bwrap copy"

    # Guests whose environment varies the policy set (their ids carry `-aa-<set>`).
    apparmor = [c for c in cells if c["backend"] == "qemu" and "-aa-" in c["environment"]]
    if apparmor:
        table(
            apparmor,
            "apparmor",
            apparmor_col,
            ["plain bwrap copy", "setuid bwrap copy", "Codex, `/usr/bin/bwrap`", "Codex, bundled bwrap"],
            "AppArmor in guests (policy set x subject):",
        )
    if len(sys.argv) > 2:
        print("\nBench medians (%s):\n" % sys.argv[2])
        with open(sys.argv[2]) as f:
            for line in f:
                if "median" in line or "ms/cell" in line or "ratio" in line:
                    print("  " + line.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
