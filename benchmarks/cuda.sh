#!/usr/bin/env bash
# The CUDA checks and benchmarks on one GPU, in one go: what the README's GPU section comes from.
#
#   bash benchmarks/cuda.sh [OUT_DIR]      # default OUT_DIR: $OUT, else ./out
#
# Runs with the python3 on PATH (a CUDA build of torch; this package from src/, nothing installed):
#   1. the CUDA tests (tests/test_cuda.py): kernels, the ring on the GPU (also compiled), simulated ranks,
#      ranks sharing it;
#   2. what each layout's pieces cost on the GPU's kernel (benchmarks/kernels.py, bf16);
#   3. `simulate`: 8 virtual ranks on the GPU, forward and forward+backward, every layout (bf16), on the cuDNN
#      and on the FlashAttention-2 kernel;
#   4. `simulate` sweep over 2..16 ranks at 8,192 tokens per rank (forward, the default kernel);
#   5. `bench` on one rank (NCCL): the ring of one against torch SDPA on the whole sequence;
#   6. causal triangles of 128 to 4,096 tokens, the pieces packed documents give each rank (cost per pair);
#   7. `simulate` with 64 packed documents (small pieces: one varlen call per step, and with --backend cudnn a call
#      per piece) and with 8: 8 virtual ranks, every layout and balanced, forward and forward+backward;
#   8. `train` on one rank eager, under torch.compile, eager again, and with activation checkpointing (tokens/s,
#      peak memory);
#   9. the CPU kernel on this host's CPU: its tests, and its dense chunks by BLAS against its register blocks
#      (benchmarks/kernels.py --chunks), in the host's own build and in the AVX2 build (ATen and MKL held to AVX2).
# Each step has its own time limit and log; a failed step does not stop the others. The summary is last.
# STEPS="tests kernels" runs only the steps named.
set -u
out=${1:-${OUT:-out}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=()

step() {  # step NAME SECONDS COMMAND...: run, log to $out/NAME.txt, remember the exit status
    local name=$1 limit=$2
    shift 2
    [[ -z ${STEPS:-} || " $STEPS " == *" $name "* ]] || return 0
    echo "== $name: $*"
    local start=$SECONDS
    # progress lines (redrawn with \r) are left out of the log
    timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -Ev '^(simulate|bench): [0-9]+/[0-9]+ ' | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    status+=("$name rc=$rc $((SECONDS - start))s")
}

lscpu | grep -E '^(Model name|CPU\(s\))' | tee "$out/cpu.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"

step tests 150 $py -m pytest --tb=short -p no:cacheprovider tests/test_cuda.py
step kernels 60 $py benchmarks/kernels.py --device cuda --dtype bfloat16 --tokens 8192 16384 32768 \
    --heads 32 --head-dim 128 --repeats 10
for backend in cudnn flash; do
    step simulate-$backend 100 $py -m striped_attention.cli simulate --device cuda --dtype bfloat16 --world-size 8 \
        --seq-len 131072 --heads 32 --head-dim 128 --pass both --repeats 5 --backend $backend
done
step sweep 60 $py -m striped_attention.cli simulate --device cuda --dtype bfloat16 --world-sizes 2,4,8,16 \
    --tokens-per-rank 8192 --heads 32 --head-dim 128 --repeats 3
step bench1 60 $py -m striped_attention.cli bench --device cuda --world-size 1 --dtype bfloat16 \
    --seq-len 32768 --heads 32 --head-dim 128 --layouts striped --baseline --repeats 10 --check

# 8 virtual ranks, 131,072 tokens in --documents N packed documents (N follows)
documents=($py -m striped_attention.cli simulate --device cuda --dtype bfloat16 --world-size 8 --seq-len 131072 \
    --heads 32 --head-dim 128 --pass both --seed 0 --layouts contiguous,striped,zigzag,balanced --documents)
step documents-64 150 "${documents[@]}" 64 --repeats 5
step documents-64-per-piece 150 "${documents[@]}" 64 --repeats 3 --backend cudnn  # no varlen call: one per piece
step documents-8 150 "${documents[@]}" 8 --repeats 5
step triangles 60 $py benchmarks/kernels.py --device cuda --dtype bfloat16 --tokens 16384 --heads 32 --head-dim 128 \
    --repeats 10 --triangles 128 256 1024 4096

# the training recipe on one NCCL rank, eager, compiled (inductor), eager again: what torch.compile gains
train=($py -m torch.distributed.run --standalone --nproc-per-node 1 -m striped_attention.cli train --device cuda \
    --dtype bfloat16 --model small --seq-len 65536 --steps 12 --eval-every 0 --eval-batches 1 --no-progress)
step train-eager 90 "${train[@]}"
step train-compile 200 "${train[@]}" --compile
step train-eager-again 90 "${train[@]}"
step train-checkpointed 90 "${train[@]}" --activation-checkpointing

cpu_chunks=($py benchmarks/kernels.py --tokens 4096 --kernels own --chunks blas registers --repeats 5)
step cpu-kernels 240 $py -m pytest --tb=short -p no:cacheprovider tests/test_kernels.py
step cpu-chunks 150 "${cpu_chunks[@]}"
step cpu-chunks-avx2 150 env ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 "${cpu_chunks[@]}"

echo "== summary"
printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
