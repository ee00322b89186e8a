#!/usr/bin/env bash
# One prepared GPU check (an NVIDIA host with jax[cuda] and CUDA torch): the parity tests on the
# GPU backend, the S training step side by side with the official PyTorch code on the same GPU, a
# bf16 row, and the README demo command. Results go to docs/BENCHMARKS.md ("GPU").
#
#   OUT=/tmp/gpu OFFICIAL_REPO=/path/DAMO-YOLO DAMO_GOLDEN=/path/golden bash benchmarks/gpu_check.sh
#
# The 2026-12-04 H200 run did not install the package: it put the wheels missing there on
# PYTHONPATH, linked configs/, export/ and data_pipelines/ into damo_jax/ (what the install's
# package-dir mapping does) and used PYTHONPATH=<repo>.
#
# Knobs (environment): SECTIONS (order and choice, default "tests bf16 demo sbs": what the first
# run, 2026-12-04, left open comes first), IMG (640), BATCH (32, the official recipe's per-GPU
# batch), STEPS (10), ROUNDS (side-by-side alternations of ours / official, 2), DEMO_S (seconds for
# the demo command), TESTS_S (seconds for the tests), BF16_S (seconds for the bf16 row), TOTAL_S
# (540, one device call: no section runs past this many seconds from the start). Every section has
# its own time limit and its own log under $OUT; a failing section does not stop the others.
set -u
OUT=${OUT:?set OUT to a folder for the logs}
IMG=${IMG:-640}; BATCH=${BATCH:-32}; STEPS=${STEPS:-10}; ROUNDS=${ROUNDS:-2}
DEMO_S=${DEMO_S:-240}; TESTS_S=${TESTS_S:-200}; BF16_S=${BF16_S:-200}
SECTIONS=${SECTIONS:-tests bf16 demo sbs}
PY=${PY:-python3}
TOTAL_S=${TOTAL_S:-540}; START=$(date +%s)
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_check_xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
# limit SECONDS: the smaller of SECONDS and what is left of TOTAL_S (at least 1)
limit() { local left=$(( TOTAL_S - ($(date +%s) - START) )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
mkdir -p "$OUT"
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"; }

log "host: $(nproc) cores; $(nvidia-smi -L 2>/dev/null | head -1)"
env_info=$($PY - <<'EOF' 2>&1
import jax, flax, optax
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "backend", jax.default_backend(), jax.devices())
from damo_jax.models.conv_grad import resolve_grad_impl
print("model.grad_impl auto ->", resolve_grad_impl("auto"))
EOF
)
echo "$env_info" | tee -a "$OUT/summary.txt"
BACKEND=$(echo "$env_info" | sed -n 's/.* backend \([a-z]*\) .*/\1/p')

side_by_side() {   # round r: ours, then the official code
  local r=$1
  log "round $r: damo_jax S@$IMG batch $BATCH float32"
  local parts="full"; [ "$r" = 1 ] && parts="fwd grad full"   # later rounds load the step from the cache
  timeout "$(limit 150)" $PY benchmarks/train_step.py --config s --img-size "$IMG" --batch "$BATCH" \
      --steps "$STEPS" --num-gt 5 --compile-here --no-tune --parts $parts \
      > "$OUT/ours_r$r.log" 2>&1
  tail -n 6 "$OUT/ours_r$r.log" | tee -a "$OUT/summary.txt"
  if [ -n "${OFFICIAL_REPO:-}" ]; then
    log "round $r: official S@$IMG batch $BATCH (torch, cuda)"
    timeout "$(limit 80)" $PY benchmarks/official_torch.py --repo "$OFFICIAL_REPO" --device cuda \
        --mode train --config s --img-size "$IMG" --batch "$BATCH" --num-gt 5 --steps "$STEPS" \
        --warmup 3 > "$OUT/official_r$r.log" 2>&1
    tail -n 3 "$OUT/official_r$r.log" | tee -a "$OUT/summary.txt"
  fi
}

tests() {
  log "tests on the ${BACKEND:-unknown} backend"
  # -v: every test's outcome is on its own line as it ends, so a run cut by its limit still names
  # its failures
  timeout "$(limit "$TESTS_S")" $PY -m pytest -p no:cacheprovider -v -n 4 --dist loadfile -o addopts="" \
      tests/test_models_golden.py tests/test_model_loss_golden.py tests/test_losses_golden.py \
      tests/test_assign_golden.py tests/test_reparam.py tests/test_conv_grad.py \
      tests/test_distill_golden.py > "$OUT/tests.log" 2>&1
  echo "rc $?" >> "$OUT/tests.log"
  grep -E "FAILED|ERROR" "$OUT/tests.log" | head -n 60 | tee -a "$OUT/summary.txt"
  local n_pass n_fail n_skip
  n_pass=$(grep -c PASSED "$OUT/tests.log"); n_fail=$(grep -c FAILED "$OUT/tests.log")
  n_skip=$(grep -c SKIPPED "$OUT/tests.log")
  echo "passed $n_pass, failed $n_fail, skipped $n_skip; $(tail -n 1 "$OUT/tests.log")" | tee -a "$OUT/summary.txt"
}

bf16() {
  log "damo_jax S@$IMG batch $BATCH bfloat16 compute (model.dtype)"
  timeout "$(limit "$BF16_S")" $PY benchmarks/train_step.py --config s --img-size "$IMG" --batch "$BATCH" \
      --steps "$STEPS" --num-gt 5 --compile-here --no-tune --dtype bfloat16 \
      > "$OUT/ours_bf16.log" 2>&1
  echo "rc $?" >> "$OUT/ours_bf16.log"
  grep -E "^\||^\{|^compiled|^rc" "$OUT/ours_bf16.log" | tail -n 6 | tee -a "$OUT/summary.txt"
}

demo() {
  log "README command 1 on the GPU: python -m damo_jax.train --config demo (limit ${DEMO_S}s)"
  rm -rf /tmp/gpu_demo
  timeout "$(limit "$DEMO_S")" $PY -m damo_jax.train --config demo --workdir /tmp/gpu_demo > "$OUT/demo.log" 2>&1
  echo "rc $?" >> "$OUT/demo.log"
  grep -iE "AP50|epoch|error" "$OUT/demo.log" | tail -n 30 | tee -a "$OUT/summary.txt"
  cp /tmp/gpu_demo/predictions.png "$OUT/" 2>/dev/null
}

sbs() { for r in $(seq 1 "$ROUNDS"); do side_by_side "$r"; done; }

for section in $SECTIONS; do
  if [ "$(limit 10)" -lt 10 ]; then log "no time left for $section"; continue; fi
  "$section"
done
log "done"
