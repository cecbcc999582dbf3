#!/usr/bin/env bash
# One-shot verification of the GPU paths on a GPU machine without network: the whole script stops within
# 470 s (each step gets what is left of that budget, up to its own cap), and writes one results file.
#   bash bench/gpu_check.sh [results-file]      (default: bench/gpu_check_results.md)
# In order of what matters most when time runs short:
# 1. builds hessfast offline with the CUDA module forced on, for this GPU's architecture only;
# 2. runs the kernel tests (CUDA and Triton cases join because a GPU is present);
# 3. lanczos(m=100) end to end at real shapes (bench/gpu_e2e.py: VGG-16 on CIFAR-100 shapes, ResNet-18,
#    a GPT-2-small-sized transformer; eager, compiled, probes in lockstep; each as a multiple of one gradient);
# 4. the kernel benchmarks on the GPU (P = 1e6 and 1.5e7, the paper's VGG-16 size; float32 and a bfloat16
#    basis, against a plain device copy's bandwidth);
# 5. an FSDP2 model on one GPU with NCCL (bench/gpu_fsdp.sh: products, Lanczos, bf16 compute);
# 6. the transformer workload (bench/bench_transformers.py: a 1.3 M-parameter GPT-2, default SDPA
#    attention, products by every mode and lanczos(m=100) against a float64 reference);
# 7. the CPU kernel benchmark for comparison.
# To start by hand on a GPU with CIFAR-100 on disk (days, not part of this check): HESSFAST_DATA=/data hessfast run lr-advice --scale paper --out runs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/gpu_check_results.md}"
PY="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
DEADLINE=$(( $(date +%s) + ${HESSFAST_GPU_CHECK_SECONDS:-470} ))
# the timeout of a step: its cap, or what is left of the budget when that is less (at least 1 s)
budget() { local left=$(( DEADLINE - $(date +%s) )); [ "$left" -lt 1 ] && left=1; [ "$left" -lt "$1" ] && echo "$left" || echo "$1"; }
unset TRITON_INTERPRET            # compile Triton kernels for the GPU (tests/conftest.py only sets it by default)
{ echo "# hessfast GPU check $(date -u '+%Y-%m-%d %H:%M UTC')"; echo; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1; echo; } > "$OUT"

ARCH=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}+PTX")' 2>/dev/null || echo "80;90+PTX")
echo "## build (HESSFAST_CUDA_ARCHS=$ARCH)" >> "$OUT"
if HESSFAST_FORCE_CUDA=1 HESSFAST_CUDA_ARCHS="$ARCH" timeout "$(budget 200)" "$PY" -m pip install --no-build-isolation --no-deps . > /tmp/hessfast_build.log 2>&1; then
  echo "build: ok" >> "$OUT"
else
  echo "build: FAILED (tail of log below)" >> "$OUT"; tail -40 /tmp/hessfast_build.log >> "$OUT"; exit 1
fi
# run from a neutral directory so the installed package (with the compiled modules) is imported
RUN() { (cd /tmp && "$@"); }
RUN "$PY" -c 'import json, hessfast.kernels as k; print(json.dumps(k.backends(), indent=1))' >> "$OUT" 2>&1

echo -e "\n## tests" >> "$OUT"
# TRITON_INTERPRET=0 keeps conftest's setdefault from switching Triton to the interpreter
RUN env TRITON_INTERPRET=0 timeout "$(budget 120)" "$PY" -m pytest -q -x -p no:cacheprovider --rootdir "$PWD" \
    "$PWD/tests/kernels/test_kernels.py" "$PWD/tests/kernels/test_kernels_sqhvp.py" "$PWD/tests/engine/test_block_lanczos.py" \
    "$PWD/tests/kernels/test_build.py" "$PWD/tests/distributed/test_data_parallel.py::test_host_basis_streams_to_cuda" 2>&1 | tail -15 >> "$OUT"

echo -e "\n## lanczos(m=100) end to end at real shapes" >> "$OUT"
RUN timeout "$(budget 230)" "$PY" "$PWD/bench/gpu_e2e.py" --device cuda --budget "$(( $(budget 230) - 10 ))" \
    --save "$PWD/$OUT" > /tmp/hessfast_gpu_e2e.log 2>&1 || \
    { echo "end-to-end bench failed:"; tail -20 /tmp/hessfast_gpu_e2e.log; } >> "$OUT"

echo -e "\n## kernel benchmarks" >> "$OUT"
RUN timeout "$(budget 100)" "$PY" "$PWD/bench/bench_kernels.py" --device cuda --P 1e6 1.5e7 --k 10 100 --b 1 8 \
    --dtype float32 --repeat 5 --only cgs2 orth sqhvp bf16 --save "$PWD/$OUT" > /tmp/hessfast_bench_gpu.log 2>&1 || \
    { echo "GPU bench failed:"; tail -20 /tmp/hessfast_bench_gpu.log; } >> "$OUT"

echo -e "\n## FSDP2, world size 1, NCCL" >> "$OUT"
timeout "$(budget 60)" bash bench/gpu_fsdp.sh >> "$OUT" 2>&1 || echo "gpu_fsdp.sh failed or timed out" >> "$OUT"

echo -e "\n## transformers (GPT-2, SDPA attention)" >> "$OUT"
RUN timeout "$(budget 120)" "$PY" "$PWD/bench/bench_transformers.py" --device cuda --attn sdpa --repeat 3 \
    --save "$PWD/$OUT" > /tmp/hessfast_bench_transformers.log 2>&1 || \
    { echo "transformers bench failed:"; tail -20 /tmp/hessfast_bench_transformers.log; } >> "$OUT"

echo -e "\n## CPU kernel benchmark" >> "$OUT"
RUN timeout "$(budget 40)" "$PY" "$PWD/bench/bench_kernels.py" --device cpu --P 1e6 --k 100 --b 1 --only cgs2 \
    --repeat 3 --save "$PWD/$OUT" > /tmp/hessfast_bench_cpu.log 2>&1 || \
    { echo "CPU bench failed:"; tail -20 /tmp/hessfast_bench_cpu.log; } >> "$OUT"
echo "results written to $OUT ($(( ${HESSFAST_GPU_CHECK_SECONDS:-470} - DEADLINE + $(date +%s) )) s)"
