#!/usr/bin/env bash
# Runs ci-examples/gitlab/.gitlab-ci.yml on this machine with gitlab-ci-local (from the npm
# registry, pinned, installed once under $NSMATRIX_CACHE/tools/; a missing or broken copy is
# installed again) and its shell executor: every job runs here as the current user, each in an
# isolated copy of the project with artifacts passed between jobs as GitLab does.
#
#   scripts/gitlab-ci-local.sh [PROJECT_DIR] [gitlab-ci-local arguments...]
#
# PROJECT_DIR (default: this checkout) must be a git repository holding .gitlab-ci.yml's
# project; tests/gitlab_ci_local.rs runs it on a throwaway copy with a small matrix.
set -euo pipefail
# 4.62.0: the newest release that runs on Node 18/20 (later ones need Node 22) without a
# native module to build (it uses re2js, not re2).
version=4.62.0
cache=${NSMATRIX_CACHE:-$HOME/.cache/nsmatrix}
prefix="$cache/tools/gitlab-ci-local-$version"
gcl="$prefix/node_modules/.bin/gitlab-ci-local"
if ! "$gcl" --version 2>/dev/null | grep -qx "$version"; then
  echo "== installing gitlab-ci-local $version from the npm registry into $prefix"
  rm -rf "$prefix.partial"
  npm install --silent --no-audit --no-fund --prefix "$prefix.partial" "gitlab-ci-local@$version"
  rm -rf "$prefix"
  mv "$prefix.partial" "$prefix"
fi
"$gcl" --version >/dev/null
project=${1:-$(cd "$(dirname "$0")/.." && pwd)}
shift || true
cd "$project"
mkdir -p .gitlab-ci-local
cp ci-examples/gitlab/.gitlab-ci.yml .gitlab-ci-local-pipeline.yml
exec "$gcl" --file .gitlab-ci-local-pipeline.yml --force-shell-executor --shell-isolation \
  --variable CI_PIPELINE_SOURCE=schedule "$@"
