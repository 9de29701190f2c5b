#!/usr/bin/env bash
# The checks to run on one GPU (sized for an H200, under 8 minutes in all), from the
# repository root:
#
#   bash experiments/gpu_check.sh                    # writes results/gpu_check
#   OUT_DIR=/tmp/gpu_check bash experiments/gpu_check.sh
#   GPU_CHECK_QUICK=1 OUT_DIR=/tmp/gpu_check_quick bash experiments/gpu_check.sh   # tiny, any CPU
#
# GPU_CHECK_TIME_SCALE multiplies every step's time limit (default 1; 10 with GPU_CHECK_QUICK=1,
# since a CPU compiles far slower than the GPU machine's host runs the real steps).
#
# Steps, each in its own process with its own time limit, logged to $OUT_DIR/logs/<step>.log;
# a failing or timed-out step is recorded and the next one runs:
#
#   exactness   check_exactness.py: round trips at T = 1000 and the check_reversal
#               hypergradient at T = 100, both gradient forms, 784-512-512-512-10; the same
#               for batch statistics' running averages (model state) with AdamW
#   accuracy    accuracy.py --device: float32 hypergradients of every method at "default"
#               (TF32) and "highest" precision against float64, SGD and Adam, T = 1000
#   benchmark   benchmark.py --device at T = 1000: time and memory of SGD's and Adam's methods
#   profile     profile_reversible.py: a jax.profiler trace of the reversible hypergradient,
#               784-512-512-512-10, T = 100
#   sharded     benchmark_sharded.py --device: 100.7M weights, T = 10,000, on one device
#
# $OUT_DIR/summary.txt lists each step's status and wall time; machine.txt records the device,
# the driver and the JAX version.

set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-results/gpu_check}"
QUICK="${GPU_CHECK_QUICK:-0}"
PYTHON="${PYTHON:-python}"
if [ "$QUICK" = "1" ]; then SCALE="${GPU_CHECK_TIME_SCALE:-10}"; else SCALE="${GPU_CHECK_TIME_SCALE:-1}"; fi
mkdir -p "$OUT_DIR/logs"
SUMMARY="$OUT_DIR/summary.txt"

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "quick: $QUICK"
  echo "time scale: $SCALE"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  "$PYTHON" -c "import jax; d = jax.devices()[0]; print('jax:', jax.__version__); print('backend:', jax.default_backend()); print('device:', d.device_kind, 'x', jax.device_count())" 2>&1
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} > "$OUT_DIR/machine.txt"
printf "%-10s %-22s %8s\n" step status wall_s > "$SUMMARY"

failures=0

# run_step NAME TIME_LIMIT_S COMMAND...: runs the command with its own time limit (TERM, then
# KILL 10 s later), its output in logs/NAME.log, and appends its status and wall time.
run_step() {
  local name="$1" limit=$(( $2 * SCALE ))
  shift 2
  echo "== $name (limit ${limit} s): $*"
  echo "$*" > "$OUT_DIR/logs/$name.command"
  local start end rc status
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/logs/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  if [ "$rc" -eq 0 ]; then
    status=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="timed_out(rc=$rc)"
  else
    status="failed(rc=$rc)"
  fi
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
  local wall
  wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  printf "%-10s %-22s %8s\n" "$name" "$status" "$wall" >> "$SUMMARY"
  echo "   $status in ${wall} s; tail of logs/$name.log:"
  tail -n 3 "$OUT_DIR/logs/$name.log" | sed 's/^/   | /'
}

if [ "$QUICK" = "1" ]; then
  WIDE="784,16,10"
  exactness=(--sizes=$WIDE --steps=10 --grad_steps=10)
  accuracy=(--quick)
  benchmark=(--sizes=$WIDE --steps=10 --repeats=1)
  profile=(--sizes=$WIDE --steps=10)
  sharded=(--quick --devices=1 --methods=reversible --compile_only=)
else
  WIDE="784,512,512,512,10"
  exactness=(--sizes=$WIDE --steps=1000 --grad_steps=100)
  # Widest first: a run cut short by its limit keeps the networks it finished.
  accuracy=(--device --sizes=$WIDE --sizes=784,256,256,10 --sizes=784,50,10)
  benchmark=(--steps=1000 --repeats=3)
  profile=(--sizes=$WIDE --steps=100)
  sharded=(--device)
fi

run_step exactness 120 "$PYTHON" experiments/check_exactness.py "${exactness[@]}" \
  --out_dir="$OUT_DIR/exactness"
run_step accuracy 135 "$PYTHON" experiments/accuracy.py "${accuracy[@]}" \
  --out_dir="$OUT_DIR/accuracy"
run_step benchmark 120 "$PYTHON" experiments/benchmark.py --device "${benchmark[@]}" \
  --methods=unroll,checkpoint_sqrt,reversible,adam_unroll,adam_reversible \
  --out_dir="$OUT_DIR/benchmark"
run_step profile 45 "$PYTHON" experiments/profile_reversible.py "${profile[@]}" \
  --out_dir="$OUT_DIR/profile_reversible"
run_step sharded 60 "$PYTHON" experiments/benchmark_sharded.py "${sharded[@]}" \
  --out_dir="$OUT_DIR/sharded"

echo "failed or timed out: $failures" >> "$SUMMARY"
echo
cat "$SUMMARY"
echo "results in $OUT_DIR"
