#!/usr/bin/env bash
# GPU check, run whenever a GPU machine is lent: set-up, device listing, the model-parity and train-step tests on
# the GPU, then the bf16 speed benchmark (benchmarks/gpu_step.py). Everything printed also goes to
# ${OUT:-./device_check_out}/device_check.log, the benchmark's JSON to gpu_step.json beside it.
#
#   bash benchmarks/device_check.sh
#
# The virtualenv is $MKDM_VENV when set (reused, as .ci/run does), else runs/device_venv (created if missing);
# the installs are no-ops where it is complete. Each step has a timeout and the whole script ends within
# 8 minutes; a failing step is reported and the next one runs; the exit status is 1 if any step failed.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-./device_check_out}"
VENV="${MKDM_VENV:-$PWD/runs/device_venv}"
PY="$VENV/bin/python"
JAX_PIN="jax[cuda12]==$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' requirements.txt)"
TESTS=(tests/test_models.py tests/test_mpnet.py tests/test_train.py tests/test_losses.py)
# These two train in CPU-only subprocesses (JAX_PLATFORMS=cpu): about 2 minutes that test nothing on the GPU.
CPU_ONLY=(--deselect tests/test_train.py::test_sharded_training_matches_single_device
          --deselect tests/test_train.py::test_killed_run_resumes_to_identical_params)
TOTAL_S=460  # the whole script: 8 minutes less the margin of the timeouts' kill delay
BENCH_S=100  # kept for the benchmark, the last step: the steps before it end by TOTAL_S - BENCH_S

step() {
  # step NAME DEADLINE CAP CMD...: runs CMD under a timeout of min(CAP, DEADLINE - elapsed) seconds.
  local name=$1 deadline=$2 cap=$3 rc=0
  shift 3
  local limit=$((deadline - SECONDS < cap ? deadline - SECONDS : cap))
  echo "=== [$SECONDS s] $name (timeout ${limit} s): $*"
  if ((limit < 5)); then
    echo "=== FAILED: $name (no time left)"
    FAILED+=("$name")
    return
  fi
  timeout -k 5 "$limit" "$@" || rc=$?
  if ((rc == 124)); then
    echo "=== FAILED: $name (timed out)"
    FAILED+=("$name")
  elif ((rc != 0)); then
    echo "=== FAILED: $name (exit $rc)"
    FAILED+=("$name")
  fi
}

main() {
  FAILED=()
  local pre=$((TOTAL_S - BENCH_S))
  echo "device check: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if [[ ! -x "$PY" ]]; then
    step venv "$pre" 30 python3 -m venv "$VENV"
  fi
  step "pip install -e . -r requirements.txt $JAX_PIN" "$pre" 180 \
    "$PY" -m pip install --progress-bar off -e . -r requirements.txt "$JAX_PIN"
  step 'pip install requirements-test.txt' "$pre" 120 \
    "$PY" -m pip install --progress-bar off -r requirements-test.txt
  step 'pip install requirements-nodeps.txt' "$pre" 60 \
    "$PY" -m pip install --progress-bar off --no-deps -r requirements-nodeps.txt
  step nvidia-smi "$pre" 15 nvidia-smi
  step 'jax devices' "$pre" 60 "$PY" -c 'import jax; print(jax.__version__, jax.devices())'
  # Highest matmul precision: the parity tolerances are fp32's, and JAX may run fp32 dots as TF32 on GPUs.
  step "pytest ${TESTS[*]}" "$pre" 240 \
    env JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q "${TESTS[@]}" "${CPU_ONLY[@]}"
  step 'benchmark gpu_step.py' "$TOTAL_S" "$BENCH_S" \
    "$PY" benchmarks/gpu_step.py --precision=bf16 --out="$OUT_DIR/gpu_step.json"
  echo "=== [$SECONDS s] done; failed steps: ${#FAILED[@]}"
  for name in "${FAILED[@]}"; do
    echo "  $name"
  done
  ((${#FAILED[@]} == 0))
}

mkdir -p "$OUT_DIR"
main 2>&1 | tee "$OUT_DIR/device_check.log"
