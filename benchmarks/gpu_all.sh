#!/usr/bin/env bash
# Issue 22's GPU measurements as one prepared command, for a session with one CUDA device:
#
#     bash benchmarks/gpu_all.sh [OUTDIR]          # OUTDIR: default $OUT (the device tool's), else ./gpu-results
#
# It runs with PYTHONPATH=src and the machine's own python3 (its preinstalled torch; $PYTHON overrides), within a
# total limit of GPU_ALL_MINUTES (default 9) minutes:
#   1. benchmarks/gpu_sync_check.py, the default digits run: does a steady training step synchronise with the
#      device? eager (<= 90 s), then with --compile reduce-overhead (CUDA graphs, <= 150 s)
#   2. benchmarks/gpu.py with what is left (its wall-time guard skips rows that do not fit): DiT-B/2 bf16 batch
#      256 vs diffusers' DiTTransformer2DModel (eager and compiled), the default CLI run's steps/s on the GPU
#      (eager and reduce-overhead) vs the 2-core CPU, unet-32 img/s (fp32/TF32, bf16, channels_last, compiled),
#      DiT-B/2 sampling at batch 256 (eager and compiled), then the per-model table and the profile
# Files in OUTDIR (6, within the device tool's 8): nvidia-smi.txt, sync_eager.txt, sync_compiled.txt,
# gpu.md (the tables, for BENCHMARKS.md), gpu.json, gpu.log. Exit status: gpu.py's.
#
# diffusers is not installed on the H200 image: carry its wheel. Once, on the development machine:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
# then call the device tool with carry [".whl"] and the command `bash benchmarks/gpu_all.sh`, timeout_s 600.
# Without the wheels the diffusers rows say "diffusers not installed" and everything else runs.
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu-results}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LIMIT_S=$(( ${GPU_ALL_MINUTES:-9} * 60 ))
START=$(date +%s)
left() { echo $(( LIMIT_S - ($(date +%s) - START) )); }

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    >> "$OUTDIR/nvidia-smi.txt" 2>&1

echo "[$(( $(date +%s) - START )) s] sync check, eager"
timeout 90 "$PY" benchmarks/gpu_sync_check.py --steps 24 --log-every 8 > "$OUTDIR/sync_eager.txt" 2>&1
echo "  exit $? (0: no sync in a steady step)"; tail -n 12 "$OUTDIR/sync_eager.txt"
echo "[$(( $(date +%s) - START )) s] sync check, --compile reduce-overhead"
timeout 150 "$PY" benchmarks/gpu_sync_check.py --steps 32 --log-every 8 --compile reduce-overhead \
    > "$OUTDIR/sync_compiled.txt" 2>&1
echo "  exit $?"; tail -n 12 "$OUTDIR/sync_compiled.txt"

REST=$(( $(left) - 20 ))  # seconds for gpu.py; its guard plans with a little less
if [ "$REST" -lt 60 ]; then
    echo "no time left for benchmarks/gpu.py"; exit 3
fi
MINUTES=$("$PY" -c "print(round(max(($REST - 30) / 60, 0.5), 2))")
echo "[$(( $(date +%s) - START )) s] benchmarks/gpu.py --max-minutes $MINUTES --profile"
timeout "$REST" "$PY" benchmarks/gpu.py --max-minutes "$MINUTES" --profile --json "$OUTDIR/gpu.json" \
    > "$OUTDIR/gpu.md" 2> "$OUTDIR/gpu.log"
RC=$?
cat "$OUTDIR/gpu.md"
echo "[$(( $(date +%s) - START )) s] done, gpu.py exit $RC"
exit $RC
