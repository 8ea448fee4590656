#!/usr/bin/env bash
# One-command GPU check: bench/gpu_check.sh OUTDIR
#
# On a machine with an NVIDIA GPU and a CUDA build of torch (+ triton, nvcc): records versions,
# builds the extension with its CUDA kernels (strict: a failed build is an error), runs the test
# suite with CUDA available, the pytest-benchmark suites, and the kernel roofline script.
# Everything lands in OUTDIR: env.txt, build.log, tests.log, bench.log + bench.json,
# roofline.log + kernels.json, summary.txt. Takes under ten minutes on an H100.
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
status=0
step() { echo "== $1 ($(date -u +%H:%M:%S))"; }
note() { echo "$1" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

step "environment -> $OUT/env.txt"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
  (nvcc --version 2>&1 || echo "nvcc not found") | tail -n 2
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton not importable:", e)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step "build the extension -> $OUT/build.log"
if SUPSUP_FAST_STRICT_BUILD=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1; then
  note "build: ok"
else
  note "build: FAILED (see build.log)"; status=1
fi
"$PY" -c "import supsup_fast._native as n, supsup_fast.ops as o; print('extension loaded', n.EXT_LOADED, 'cuda kernels', n.ext_has_cuda()); [print(f'  {b.name:10s} available={b.available} {b.why_unavailable}') for b in o.backends()]" \
  2>&1 | tee -a "$OUT/summary.txt"

step "tests -> $OUT/tests.log"
if timeout 300 "$PY" -m pytest tests -q -x -p no:cacheprovider --durations=15 > "$OUT/tests.log" 2>&1; then
  note "tests: $(tail -n 1 "$OUT/tests.log")"
else
  note "tests: FAILED: $(tail -n 1 "$OUT/tests.log")"; status=1
fi

if ls bench/test_*.py > /dev/null 2>&1; then
  step "benchmark suites -> $OUT/bench.json"
  if timeout 180 "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-json "$OUT/bench.json" > "$OUT/bench.log" 2>&1; then
    note "bench: $(tail -n 1 "$OUT/bench.log")"
    "$PY" bench/report.py --compact --no-plot "$OUT/bench.json" > "$OUT/bench_report.md" 2>&1 || true
  else
    note "bench: FAILED: $(tail -n 1 "$OUT/bench.log")"; status=1
  fi
fi

step "kernel roofline -> $OUT/kernels.json"
if timeout 150 "$PY" bench/gpu/roofline.py "$OUT/kernels.json" > "$OUT/roofline.log" 2>&1; then
  note "roofline: ok"
else
  note "roofline: FAILED or partial (see roofline.log)"; status=1
fi
cat "$OUT/roofline.log"

step "done (status $status)"
cat "$OUT/summary.txt"
exit $status
