#!/usr/bin/env bash
# One-command GPU check for a GPU machine lent for minutes: bench/gpu_check.sh OUTDIR [--dry-run]
#
# Written for the machine as it is (python3 with a CUDA torch, triton, nvcc, pytest-xdist, 16
# cores, no package registry, 10 minutes per command, at most 8 files back): everything finishes
# in about 7 minutes, the most valuable numbers come first and are on disk as soon as measured.
#
#   1. env.txt        versions, GPU, nvcc (seconds)
#   2. build          the extension with its CUDA kernels, sm_90 only, all cores (<= 4 min)
#   3. kernels.json   bench/gpu/roofline.py: ceilings, every kernel vs dense / two_pass / fp32
#      dispatch.json  stack, CUDA-graph replays; JSON rewritten after every measurement,
#                     unbuffered, stopped by SIGINT at its budget (<= 150 s)
#   4. tests.xml      the GPU tests only (tests/backends/test_gpu.py and every test on CUDA tensors; none
#                     needs data absent there), in parallel, --maxfail (<= 150 s)
#   5. bench.json     the whole-network suites at full size, if time is left
#   6. summary.txt    one line per step; logs.tar.gz: every log (build, roofline, tests, bench)
#
# At most 7 files land in OUTDIR. --dry-run runs the same flow on a CPU (no build, the roofline's
# CPU dry run, the tests and suites collected only): CI runs it so the script itself never rots.
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUTDIR [--dry-run]}
DRY=0
[[ "${2:-}" == "--dry-run" ]] && DRY=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TOTAL=${SUPSUP_GPU_CHECK_SECONDS:-420}  # whole run, build included
T0=$(date +%s)
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
# one config per kernel: no autotuning (each config of each specialisation would compile), and
# every launch is safe inside CUDA-graph capture. The roofline says which configs it measured.
export SUPSUP_FAST_AUTOTUNE=${SUPSUP_FAST_AUTOTUNE:-0}
status=0

left() { echo $((TOTAL - ($(date +%s) - T0))); }
step() { echo "== $1 ($(date -u +%H:%M:%S), $(left) s left)"; }
note() { echo "$1" | tee -a "$OUT/summary.txt"; }
cap() { local want=$1 l; l=$(( $(left) - ${2:-0} )); (( l < want )) && want=$l; (( want < 10 )) && want=10; echo "$want"; }
: > "$OUT/summary.txt"
[[ $DRY == 1 ]] && note "DRY RUN on $(uname -m): no GPU, no build; the flow only"

step "environment -> env.txt"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
  (nvcc --version 2>&1 || echo "nvcc not found") | tail -n 2
  "$PY" - <<'EOF'
import os, platform, torch
print("python", platform.python_version(), "cores", os.cpu_count())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
for mod in ("triton", "xdist"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "present"))
    except Exception as e:
        print(mod, "not importable:", e)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ $DRY == 0 ]]; then
  step "build the extension (sm_90, $(nproc) jobs) -> logs/build.log"
  # no registry there: no build isolation, no dependencies; a failed build leaves the Triton and
  # reference backends, so the roofline and tests still run
  if TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) SUPSUP_FAST_STRICT_BUILD=1 \
      timeout -s INT "$(cap 240 150)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . \
      > "$LOGS/build.log" 2>&1; then
    note "build: ok ($(( $(date +%s) - T0 )) s since start)"
  else
    note "build: FAILED (logs/build.log): $(grep -m1 -iE 'error' "$LOGS/build.log" | cut -c1-200)"; status=1
  fi
fi
"$PY" -c "import supsup_fast._native as n, supsup_fast.ops as o; print('extension loaded', n.EXT_LOADED, 'cuda kernels', n.ext_has_cuda()); [print(f'  {b.name:10s} available={b.available} {b.why_unavailable}') for b in o.backends()]" \
  2>&1 | tee -a "$OUT/summary.txt"

step "kernel roofline -> kernels.json, dispatch.json (logs/roofline.log)"
budget=$(cap 150 170)
dry=(); [[ $DRY == 1 ]] && dry=(--dry-run)
timeout -s INT -k 15 "$((budget + 20))" "$PY" -u bench/gpu/roofline.py "${dry[@]}" --budget "$budget" \
  --out "$OUT/kernels.json" --dispatch "$OUT/dispatch.json" 2>&1 | tee "$LOGS/roofline.log"
rc=${PIPESTATUS[0]}
if [[ $rc == 0 ]]; then note "roofline: ok"; else note "roofline: rc=$rc (partial JSON kept; see logs/roofline.log)"; status=1; fi

step "GPU tests -> tests.xml (logs/tests.log)"
par=(); "$PY" -c "import xdist" 2>/dev/null && par=(-n 8)
# dry run: collect only (on a CPU every one of them skips; collecting checks the selection)
co=(); [[ $DRY == 1 ]] && co=(--collect-only) && par=()
# the GPU tests: tests/backends/test_gpu.py, every op's case table and NaN/Inf semantics on the CUDA
# backends, and the CUDA cases of the module / checkpoint / autocast tests
timeout -s INT -k 15 "$(cap 150 40)" "$PY" -m pytest "${par[@]}" "${co[@]}" --maxfail=30 -p no:cacheprovider -q -rfE \
  --junitxml="$OUT/tests.xml" tests/backends/test_gpu.py tests/ops/test_cases.py tests/ops/test_nonfinite.py \
  tests/ops/test_autocast.py tests/nn/test_modules.py tests/checkpoint/test_checkpoint.py \
  -k "test_gpu or cuda" > "$LOGS/tests.log" 2>&1
rc=$?
note "tests: rc=$rc: $(tail -n 1 "$LOGS/tests.log")"
[[ $rc == 0 ]] || status=1

if (( $(left) > 60 )); then
  step "whole-network suites (full size) -> bench.json (logs/bench.log)"
  dev=cuda; [[ $DRY == 1 ]] && dev=cpu
  size=full; [[ $DRY == 1 ]] && size=tiny
  timeout -s INT -k 15 "$(cap 120 20)" "$PY" -m pytest bench/test_bench_models.py "${co[@]}" -q -p no:cacheprovider \
    --bench-size "$size" --bench-device "$dev" --benchmark-json "$OUT/bench.json" -k task_inference \
    > "$LOGS/bench.log" 2>&1
  rc=$?
  note "bench: rc=$rc: $(tail -n 1 "$LOGS/bench.log")"
else
  note "bench: skipped ($(left) s left)"
fi

step "done (status $status, $(( $(date +%s) - T0 )) s)"
note "total: $(( $(date +%s) - T0 )) s, status $status"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
ls -la "$OUT"
cat "$OUT/summary.txt"
exit $status
