#!/usr/bin/env bash
# Full CPU throughput run: every suite at full size, results saved as
#   bench/results/<device-slug>/<UTC date>.json   (+ a PNG plot beside it)
# and the markdown tables printed. With SUPSUP_BENCH_README=README.md the tables are also
# spliced into that file between its <!-- bench:cpu:begin --> / <!-- bench:cpu:end --> markers.
#
#   bench/run_cpu.sh [extra pytest args, e.g. -k task_inference]
#
# Run it on a quiet machine: other processes on the same cores make every number worse and
# noisier. SUPSUP_BENCH_THREADS sets the thread count (default: torch's, i.e. all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if [[ -n "${SUPSUP_BENCH_THREADS:-}" ]]; then
  export OMP_NUM_THREADS="$SUPSUP_BENCH_THREADS" MKL_NUM_THREADS="$SUPSUP_BENCH_THREADS"
fi

slug=$("$PY" - <<'PY'
import sys
sys.path.insert(0, "bench")
from harness import device_slug
print(device_slug("cpu"))
PY
)
stamp=$(date -u +%Y-%m-%dT%H%MZ)
out="bench/results/$slug/$stamp.json"
mkdir -p "$(dirname "$out")"

"$PY" -m pytest bench --bench-size full --bench-device cpu -p no:cacheprovider -q \
  --benchmark-json "$out" --benchmark-columns=median,iqr,rounds --benchmark-sort=name \
  --benchmark-warmup=on --benchmark-min-rounds=5 "$@"

readme=()
[[ -n "${SUPSUP_BENCH_README:-}" ]] && readme=(--readme "$SUPSUP_BENCH_README")
"$PY" bench/report.py --compact "$out" "${readme[@]}"
echo "results: $out"
