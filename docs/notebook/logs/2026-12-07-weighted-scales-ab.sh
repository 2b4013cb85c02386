#!/usr/bin/env bash
# (the tree with docs/notebook/logs/2026-12-07-weighted-scales-ab.patch applied; one call, one GPU)
# the committed kernels and two ways of loading the weighted- scales, built in parallel,
# their quantize A/B (committed build first and last); on an H200 then the codec table
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/o
S0=$(date +%s)
pack() { tar czf "$OUT/all.tgz" -C /tmp/o . ; }
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > /tmp/o/env.txt 2>&1; cat /tmp/o/env.txt
VARS=";ML_SCALE_PER_CHUNK=3,ML_QMINB=4;ML_SCALE_PER_CHUNK=0"
OUT=/tmp/o STAGES="codecab" AB_DEFINES="$VARS" T_AB=60 \
  AB_ARGS="--min-size 16MB --max-size 128MB --op quantize --codec hadamard-int4:128 --codec weighted-hadamard-int4:128 --codec weighted-hadamard-int8:128 --codec weighted-int8:128 --codec weighted-hadamard-int5:64 --codec weighted-hadamard-int6-sym:128" \
  bash tests/gpu/device_run.sh > /tmp/o/ab.log 2>&1
pack; echo "ab done at $(( $(date +%s) - S0 )) s"; tail -5 /tmp/o/ab.log
case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in *H200*)
  OUT=/tmp/o STAGES="codec" T_CODEC_TESTS=0 bash tests/gpu/device_run.sh > /tmp/o/run_codec.log 2>&1
  pack; echo "table done at $(( $(date +%s) - S0 )) s"; grep -v "it/s" /tmp/o/run_codec.log | tail -30 ;;
esac
