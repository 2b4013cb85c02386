#!/usr/bin/env bash
# (the tree with docs/notebook/logs/2026-12-07-quantize-pipeline.patch applied; one call, one GPU)
# one short call: the kept build and two pipelined-quantize variants built in parallel,
# their A/B (kept build first and last), then the kept build's codec table
export PYTHONPATH=$PWD
mkdir -p /tmp/o
S0=$(date +%s)
pack() { tar czf "$OUT/all.tgz" -C /tmp/o . ; }
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > /tmp/o/env.txt 2>&1; cat /tmp/o/env.txt
OUT=/tmp/o STAGES="codecab" AB_DEFINES=";ML_QPIPE=4;ML_QPIPE=8" T_AB=50 \
  AB_ARGS="--min-size 4MB --max-size 64MB --op quantize --codec int8:128 --codec int4:128 --codec hadamard-int4:128 --codec weighted-hadamard-int4:128 --codec weighted-hadamard-int8:128 --codec weighted-hadamard-int5:128 --codec weighted-int8:128" \
  bash tests/gpu/device_run.sh > /tmp/o/ab.log 2>&1
pack; echo "ab done at $(( $(date +%s) - S0 )) s"; cat /tmp/o/ab.log | tail -5
OUT=/tmp/o STAGES="codec" T_CODEC_TESTS=0 bash tests/gpu/device_run.sh > /tmp/o/run_codec.log 2>&1
pack; echo "table done at $(( $(date +%s) - S0 )) s"
grep -v "it/s" /tmp/o/run_codec.log | tail -30
