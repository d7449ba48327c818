#!/usr/bin/env bash
# Issue 21's GPU measurements (packed batches, attention backends, token-mixer scaling) as one prepared
# command, for a session with one CUDA device; the CPU tables are in BENCHMARKS.md "Packed batches".
#
#     bash benchmarks/gpu_packing.sh [OUTDIR]      # OUTDIR: default $OUT (the device tool's), else ./gpu-results
#
# Runs with PYTHONPATH=src and the machine's python3 (its torch; $PYTHON overrides), each step under `timeout`:
#   1. packing.py --device cuda: packed (flex, varlen, grouped, nested, dense) vs padded vs buckets, training
#      (forward + backward) at 128 images a step, width 384 (DiT-S); then forward only        (<= 240 s)
#   2. attention_scaling.py --device cuda: one DiT block and the mixer alone, N = 256 .. 65536   (<= 240 s)
# Files in OUTDIR: nvidia-smi.txt, packing.md, packing_fwd.md, scaling_block.md, scaling_mixer.md, gpu_packing.log.
# Then set networks/packing.py AUTO["cuda"] to the fastest training backend measured, and paste the tables into
# BENCHMARKS.md. Device tool: command `bash benchmarks/gpu_packing.sh`, timeout_s 600.
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu-results}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOG="$OUTDIR/gpu_packing.log"
nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    >> "$OUTDIR/nvidia-smi.txt" 2>&1
timeout 150 "$PY" benchmarks/packing.py --device cuda --batch 128 --width 384 --depth 6 --heads 6 --steps 10 \
    --precision bf16 --backends flex,varlen,grouped,nested,dense > "$OUTDIR/packing.md" 2>> "$LOG"
timeout 90 "$PY" benchmarks/packing.py --device cuda --batch 128 --width 384 --depth 6 --heads 6 --steps 10 \
    --precision bf16 --forward-only --backends flex,varlen,grouped,nested,dense > "$OUTDIR/packing_fwd.md" 2>> "$LOG"
timeout 120 "$PY" benchmarks/attention_scaling.py --device cuda --lengths 256,1024,4096,16384,65536 --repeats 5 \
    > "$OUTDIR/scaling_block.md" 2>> "$LOG"
timeout 120 "$PY" benchmarks/attention_scaling.py --device cuda --part mixer --lengths 256,1024,4096,16384,65536 \
    --repeats 5 > "$OUTDIR/scaling_mixer.md" 2>> "$LOG"
echo "done" >> "$LOG"
