#!/usr/bin/env bash
# The GPU checks of the Pallas kernels as one device call (issue 6), for a session lent a GPU:
#
#   run(command="bash bench/gpu_session.sh", timeout_s=590)        # the `device` tool; nothing to carry
#
# bench/kernels.py needs no package the GPU image lacks (no cvxpy, highspy or ml-collections), so no
# wheels travel. Writes under $OUT (or out/gpu): nvidia-smi.txt, kernels.md (rewritten after every
# row, so a run cut short keeps its table), kernels.log. Order: correctness (exit 1 on a mismatch,
# timings then invalid), copy bandwidth, the bar (Mixtral-8x7B, 2.5 bpw, 1 token), then --quick's
# list until the budget, then the end-to-end decode if time is left, then (still if time is left)
# XLA's cold compile of 4 Mixtral layers with and without shared layout shapes (shared_kernels.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv >"$out/nvidia-smi.txt" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" >>"$out/nvidia-smi.txt" 2>&1
start=$SECONDS
# SMOKE=1: the same sequence on CPU in interpret mode (tiny shapes), to check this script itself
timeout 470 python3 bench/kernels.py ${SMOKE:+--smoke} --quick --no-e2e --budget-s "${BENCH_BUDGET_S:-300}" --cache /tmp/jax-cache \
  --out "$out/kernels.md" 2>&1 | tee "$out/kernels.log"
status=${PIPESTATUS[0]}
if (( SECONDS - start < 400 )); then  # the end-to-end decode (reference model) if time is left
  timeout $(( 560 - (SECONDS - start) )) python3 -c "
import sys; sys.path.insert(0, 'bench')
import kernels
b, q = kernels.end_to_end(new_tokens=${SMOKE:+4}${SMOKE:-64}, prompt_len=8)
print(f'end-to-end greedy decode, reference model, batch 1: bf16 {b:.1f} tok/s, quantized ~2.5 bpw (Pallas) {q:.1f} tok/s ({q / b:.2f}x)')
" 2>&1 | tee -a "$out/kernels.log" | tail -1 >>"$out/kernels.md"
fi
if [[ -z "${SMOKE:-}" ]] && (( SECONDS - start < 470 )); then
  timeout $(( 575 - (SECONDS - start) )) python3 bench/shared_kernels.py --layers 4 --paddings inf --xla-compile \
    >"$out/shared_kernels.md" 2>>"$out/kernels.log"
fi
exit "$status"
