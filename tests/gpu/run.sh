#!/usr/bin/env bash
# The GPU checks on one machine, in under 10 minutes on one GPU:
#   bash tests/gpu/run.sh [REPORT.json]     (default: $OUT/gpu-report.json, else ./gpu-report.json)
# Writes the doctor's verdicts beside the report (REPORT.doctor.json) and every test's outcome and figures
# (losses, seconds, img/s, MFU) into REPORT.json. Exit status: pytest's.
set -uo pipefail
cd "$(dirname "$0")/../.."
report="${1:-${OUT:-.}/gpu-report.json}"
mkdir -p "$(dirname "$report")"
python="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HPCGAN_GPU_REPORT="$report" MLFLOW_DISABLE_TELEMETRY=true
timeout 60 "$python" -m hpcgan doctor --out "$(mktemp -d)" --json "${report%.json}.doctor.json" || true
timeout 520 "$python" -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" -rfEs "${@:2}"
code=$?
echo "report: $report"
exit $code
