#!/usr/bin/env bash
# The test command of the README: installs the system packages the tests need (Debian/Ubuntu,
# as root), starts a Docker engine if none is running (and leaves it running for `nsmatrix run`),
# then checks formatting and lints and runs every test against the real backends.
#
# Downloads and builds (kernels, root filesystems, images, Codex) are cached under
# $NSMATRIX_CACHE (default ~/.cache/nsmatrix), so a rerun is fast; nothing depends on the
# cache being there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: run as root (sudo): the tests install packages, start dockerd and create setuid copies" >&2
  exit 2
fi

./scripts/install-packages.sh

# The engine is left running when this script started it, so that the README's second command
# (`nsmatrix run`) has its Docker part; .ci/run starts and stops its own engine around this script.
if ! docker info >/dev/null 2>&1; then
  echo "== starting dockerd (left running for \`nsmatrix run\`; log: target/dockerd.log)"
  mkdir -p target
  setsid dockerd >target/dockerd.log 2>&1 </dev/null &
  dockerd_pid=$!
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see target/dockerd.log" >&2; exit 1; }
  echo "== dockerd is running as pid $dockerd_pid (stop it with: kill $dockerd_pid)"
fi

# A real JUnit consumer's parser (junitparser) and the CI engines' schemas (check-jsonschema
# vendors GitHub's and GitLab's) for the regression tests, in a venv of their own.
venv=target/pyvenv
if ! "$venv/bin/python3" -c "import junitparser" 2>/dev/null || [ ! -x "$venv/bin/check-jsonschema" ]; then
  echo "== installing junitparser and check-jsonschema into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q junitparser check-jsonschema
fi
export PATH="$PWD/$venv/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo test"
mkdir -p target
set +e
cargo test --no-fail-fast 2>&1 | tee target/test-output.log
rc=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo's last "test result" line is the doc tests').
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "total: %d passed, %d failed\n", p, f }' target/test-output.log
exit "$rc"
