#!/usr/bin/env bash
# Install everything into .venv/ and run the whole test suite (slow and SLURM tests included).
# Used as-is by CI (.ci/run) and by the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to the CPU build that lies on this machine's disk; clusters bring their own CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test,dali]"
# tests/test_report.py opens the HTML run report in a real headless browser.
command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null)
if [ -x slurm/local/start.sh ]; then
  bash slurm/local/start.sh
fi
if [ -n "${CI:-}" ]; then
  # The quick benchmark prints its ratios in every CI run (numbers, not a pass/fail gate).
  .venv/bin/hpcgan bench --quick --json "${TMPDIR:-/tmp}/hpcgan-bench-quick.json"
  # Time to quality, quick form: the classic loop and the quickstart preset, 60 s each, scored.
  .venv/bin/hpcgan bench --quick --quality --json "${TMPDIR:-/tmp}/hpcgan-bench-quality.json"
fi
exec .venv/bin/python -m pytest "$@"
