#!/usr/bin/env bash
# One call on a 4-GPU device machine: environment, a smoke benchmark, the full all-reduce
# benchmarks at world sizes 4 and 2, and the GPU tests. Logs and JSON land in $OUT.
#   STAGES="env smoke sweep bench4 bench2 rec transports tests gen" bash tests/gpu/device_run.sh
# One GPU: STAGES="env build codec host hostprof tests gen1 gemv1 prefill1 kv1" bash tests/gpu/device_run.sh
# (build first: a stage's timeout must not fall inside the CUDA codec build, 1-3 minutes)
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 MEGATRON_LITE_SPIN_LIMIT=${MEGATRON_LITE_SPIN_LIMIT:-4194304}
OUT=${OUT:-/tmp/megatron_lite_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"env smoke bench4 bench2 tests"}
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
for st in $STAGES; do
  case $st in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
      nvidia-smi topo -m
      PYTHONPATH=. python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count(),)"
      ;;
    build)
      # the CUDA C++ codec kernels, once per machine (kernels/codec_cuda.py), so that no
      # timed stage pays for the build or is killed inside it
      timeout ${T_BUILD:-420} python3 -c "
import time; t = time.time()
from megatron_lite.kernels import codec_cuda
codec_cuda.build(); print(f'CUDA codec kernels built in {time.time() - t:.0f} s')" 2>&1 | tail -3
      ;;
    smoke)
      timeout 150 torchrun --nproc_per_node=2 tools/bench_allreduce.py --min-size 16KB --max-size 64MB \
        --comm bf16,path=fused --comm int4:128,path=fused --comm int4:128,path=two-step \
        --iters 20 2>&1 | tee "$OUT/smoke.log" | grep -v "it/s\]" \
        || { log "smoke failed: stopping"; exit 1; }
      ;;
    sweep)
      # blocks per SM of the two-shot grid; update kernels/thresholds.py from the result
      timeout ${T_SWEEP:-150} torchrun --nproc_per_node=${SWEEP_NPROC:-4} \
        tests/gpu/sweep_grid.py > "$OUT/sweep.log" 2>&1
      grep -E "^geomean|^BEST|bitwise" "$OUT/sweep.log" | tail -20
      ;;
    bench4)
      timeout ${T_BENCH:-200} torchrun --nproc_per_node=4 tools/bench_allreduce.py \
        --json "$OUT/allreduce_w4.json" > "$OUT/bench_w4.log" 2>&1
      tail -5 "$OUT/bench_w4.log"
      ;;
    bench2)
      timeout ${T_BENCH:-200} torchrun --nproc_per_node=2 tools/bench_allreduce.py \
        --json "$OUT/allreduce_w2.json" > "$OUT/bench_w2.log" 2>&1
      tail -5 "$OUT/bench_w2.log"
      ;;
    rec)
      # the recommended rows (docs/results/recommended.json) against native, W = 4 and 2:
      # the speed cells of the README's table (add the JSON to sources.json's speed_files)
      REC=$(python3 -c "import json; d = json.load(open('docs/results/recommended.json')); print(' '.join('--comm ' + repr(d[k]) for k in ('safe', 'balanced', 'aggressive') if d[k]))")
      for w in 4 2; do
        [ "$w" -le "$(nvidia-smi -L | wc -l)" ] || continue
        eval timeout ${T_BENCH:-200} torchrun --nproc_per_node=$w tools/bench_allreduce.py \
          --min-size 1MB --no-oneshot $REC --json "$OUT/allreduce_w${w}_recommended.json" \
          > "$OUT/bench_rec_w$w.log" 2>&1
        grep -A 14 "^all-reduce, world" "$OUT/bench_rec_w$w.log" | cut -c1-200
      done
      ;;
    transports)
      # the slow-link tables: NCCL through host memory, then through sockets, native
      # measured on the same transport (W = $TR_NPROC, default 4)
      for tr in host-memory socket; do
        timeout ${T_BENCH:-200} torchrun --nproc_per_node=${TR_NPROC:-4} \
          tools/bench_allreduce.py --transport $tr --min-size 64KB \
          --json "$OUT/allreduce_w${TR_NPROC:-4}_$tr.json" > "$OUT/bench_$tr.log" 2>&1
        tail -3 "$OUT/bench_$tr.log"
      done
      ;;
    gen)
      # decode with and without torch.compile, llama3-8b TP4, batch-1/16 TPOT only
      for c in "" "--compile"; do
        tag=${c:+_compile}
        timeout ${T_GEN:-240} torchrun --nproc_per_node=4 tools/bench_generate.py $c \
          --random-weights llama3-8b --comm auto --comm int4:128 --prefill 8192x1 \
          --decode-batches 1,16 --decode-steps 100 --repeats 3 --profile \
          --json "$OUT/generate_llama3-8b_tp4$tag.json" > "$OUT/gen$tag.log" 2>&1
        grep -v "it/s" "$OUT/gen$tag.log" | tail -25
      done
      ;;
    codec)
      # single GPU: the CUDA C++ codec kernels bit for bit (builds them once; T_CODEC_TESTS=0
      # leaves that to the tests stage), then the codec kernel benchmark against a bf16
      # copy; Triton alone if the kernels disagree
      [ "${T_CODEC_TESTS:-300}" = 0 ] || timeout ${T_CODEC_TESTS:-300} python3 -m pytest -q -rf \
        tests/gpu/test_codec_cuda.py tests/gpu/test_quant_kernels.py 2>&1 | tail -40 \
        | tee "$OUT/codec_tests.log"
      timeout ${T_CODEC_BENCH:-300} python3 tools/bench_codec_kernels.py \
        --json "$OUT/codec_kernels.json" > "$OUT/codec_bench.log" 2>&1 \
        || { tail -3 "$OUT/codec_bench.log"; timeout 200 python3 tools/bench_codec_kernels.py \
             --impl triton --json "$OUT/codec_kernels_triton.json" > "$OUT/codec_bench_triton.log" 2>&1; }
      grep -v "it/s" "$OUT/codec_bench.log" | grep -A 40 "^64 MB" | head -40
      ;;
    codecab)
      # kernel variants side by side on one machine: AB_DEFINES="D1;D2;..." (each item a
      # MEGATRON_LITE_CUDA_DEFINES value; an empty item is the sources as they are), built in
      # parallel, then each benchmarked in turn (AB_ARGS) and the first once more at the
      # end, so that drift shows
      IFS=';' read -ra VARS <<< "${AB_DEFINES:-}"
      for v in "${VARS[@]}"; do
        MEGATRON_LITE_CUDA_DEFINES="$v" timeout ${T_BUILD:-420} python3 -c "
from megatron_lite.kernels import codec_cuda; codec_cuda.build()" > "$OUT/ab_build_${v//[^A-Za-z0-9]/_}.log" 2>&1 &
      done
      wait
      log "variants built"
      i=0
      for v in "${VARS[@]}" "${VARS[0]}"; do
        MEGATRON_LITE_CUDA_DEFINES="$v" timeout ${T_AB:-150} python3 tools/bench_codec_kernels.py \
          --impl cuda ${AB_ARGS:---min-size 16MB --max-size 256MB} \
          --json "$OUT/ab_${i}_${v//[^A-Za-z0-9]/_}.json" > "$OUT/ab_$i.log" 2>&1 \
          || { log "variant '$v' failed"; tail -5 "$OUT/ab_$i.log"; }
        i=$((i + 1))
      done
      ;;
    host)
      # host microseconds of an eager quantized all-reduce: plan lookup and whole call, at
      # a decode-sized and a prefill-sized message (one GPU: the launch path of W > 1)
      for size in 16KB 1MB; do
        timeout ${T_HOST:-90} torchrun --nproc_per_node=${HOST_NPROC:-1} tools/bench_allreduce.py \
          --host-overhead --min-size $size --max-size 64MB --comm auto --comm int8:128,path=fused \
          --comm int4:128,path=fused --comm hadamard-int8:128,path=fused \
          --comm weighted-hadamard-int5:64,path=fused --comm int4:128,algo=one-shot \
          --comm weighted-hadamard-int5:64,algo=one-shot \
          --comm weighted-hadamard-int6-sym:128,algo=one-shot \
          --json "$OUT/host_overhead_w${HOST_NPROC:-1}_$size.json" > "$OUT/host_$size.log" 2>&1
        grep -E "dispatch|error" "$OUT/host_$size.log" | cut -c1-220
      done
      ;;
    hostprof)
      # where an eager call's host time goes: cProfile of each path and the cost of the
      # single host operations it makes (tests/gpu/profile_host.py; one GPU)
      timeout ${T_HOST:-90} torchrun --nproc_per_node=1 tests/gpu/profile_host.py \
        > "$OUT/profile_host.log" 2>&1
      grep -A 20 "^single operations" "$OUT/profile_host.log"
      ;;
    gen1)
      # one GPU (TP 1), llama3-8b: graphed vs eager prefill against the compute floor,
      # graphed decode with and without torch.compile against the streaming floor; the
      # compiled run compiles the prefill too (--compile-prefill: dynamic prompt lengths)
      for c in "" "--compile --compile-prefill"; do
        tag=${c:+_compile}
        pre="--eager-prefill --eager-decode --prefill 512x1,2048x1,8192x1"
        [ -n "$c" ] && pre="--eager-prefill --prefill 512x1,2048x1,8192x1"
        timeout ${T_GEN:-200} torchrun --nproc_per_node=1 tools/bench_generate.py $c $pre \
          --random-weights llama3-8b --comm native --no-lower-bound --decode-batches 1,16 \
          --decode-steps 100 --repeats 5 --profile \
          --json "$OUT/generate_llama3-8b_tp1$tag.json" > "$OUT/gen1$tag.log" 2>&1
        grep -v "it/s" "$OUT/gen1$tag.log" | tail -22
      done
      ;;
    gemv1)
      # one GPU (TP 1), llama3-8b: the batch-1 GEMV kernel against cuBLAS per layer, then
      # the compiled, graphed decode that uses it at batches 1 and 16, with its profile
      timeout ${T_GEMV:-150} python3 tools/bench_gemv.py --shape llama3-8b --tp 1 \
        --json "$OUT/gemv_llama3-8b_tp1.json" > "$OUT/gemv1.log" 2>&1
      grep -v "it/s" "$OUT/gemv1.log" | tail -14
      timeout ${T_GEN:-200} torchrun --nproc_per_node=1 tools/bench_generate.py --compile \
        --random-weights llama3-8b --comm native --no-lower-bound --prefill 512x1 \
        --decode-batches 1,16 --decode-steps 100 --repeats 3 --profile \
        --json "$OUT/generate_llama3-8b_tp1_gemv.json" > "$OUT/gemv1_gen.log" 2>&1
      grep -v "it/s" "$OUT/gemv1_gen.log" | grep -v "kernels: {" | tail -16
      ;;
    prefill1)
      # one GPU (TP 1), llama3-8b: the 8k prefill as an eager model and compiled, then the
      # batch-1 TPOT, with the SM clock and board power sampled in each timed region
      for c in "" "--compile --compile-prefill"; do
        tag=${c:+_compile}
        timeout ${T_GEN:-200} torchrun --nproc_per_node=1 tools/bench_generate.py $c \
          --random-weights llama3-8b --comm native --no-lower-bound --prefill 8192x1 \
          --decode-batches 1 --decode-steps 100 --repeats ${PREFILL_REPEATS:-5} --check-tokens 0 \
          --profile --json "$OUT/prefill_llama3-8b_tp1$tag.json" > "$OUT/prefill1$tag.log" 2>&1
        grep -v "it/s" "$OUT/prefill1$tag.log" | grep -v "kernels: {" | tail -12
      done
      ;;
    kv1)
      # one GPU: the ring KV cache of the sliding layers against the full layout (context
      # 8000: its decode steps must stay within gemma2-27b's 8192 positions)
      for kv in live full; do
        timeout ${T_GEN:-200} torchrun --nproc_per_node=1 tools/bench_generate.py \
          --random-weights gemma2-27b --comm native --no-lower-bound --kv-layout $kv \
          --prefill 2048x1 --decode-batches 1,4 --context 8000 --decode-steps 50 --repeats 3 \
          --json "$OUT/generate_gemma2-27b_tp1_$kv.json" > "$OUT/gen1_$kv.log" 2>&1
        grep -v "it/s" "$OUT/gen1_$kv.log" | tail -12
      done
      ;;
    ncu)
      # where the codec kernels' time goes (hardware counters: Firecracker machines only;
      # NCU_SET: tests/gpu/profile_codec.py's set of kernels)
      timeout ${T_NCU:-150} ncu --clock-control none --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section LaunchStats -k regex:_kernel \
        python3 tests/gpu/profile_codec.py ${NCU_SET:-quantize} \
        > "$OUT/ncu_codec.txt" 2>&1
      grep -E "_kernel<|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued" \
        "$OUT/ncu_codec.txt" | head -80
      ;;
    tests)
      timeout ${T_TESTS:-240} python3 -m pytest -q -rf ${GPU_TESTS:-tests/gpu} 2>&1 | tail -40 | tee "$OUT/tests.log"
      ;;
  esac
  log "stage $st done"
done
for w in 4 2; do
  [ -f "$OUT/bench_w$w.log" ] && grep -A 20 "^all-reduce, world" "$OUT/bench_w$w.log" | cut -c1-200
  [ -f "$OUT/bench_w$w.log" ] && grep "auto thresholds" "$OUT/bench_w$w.log"
done
