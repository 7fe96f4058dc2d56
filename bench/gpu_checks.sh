#!/usr/bin/env bash
# The GPU figures in one run: full-size UNet parity (native fp32 and fp16 against the fp32 reference),
# UNet step time against diffusers (fp16 and fp32), txt2img 512x512 with 50 PLMS steps end to end, and
# peak GPU memory. Everything lands in $OUT (default ./gpu-out) as JSON plus a log.
#
#   bash bench/gpu_checks.sh [full|tiny] [cuda|cpu]
#
# `tiny cpu` runs the same steps on the bundled-size fixture in about a minute: a rehearsal of the
# script, not a measurement. Expects `sdport` and the reference packages importable (make setup), or,
# on a machine without a package index, the wheels that bench/gpu_wheels.sh gathers (see there).
set -euo pipefail
SIZE=${1:-full}
DEVICE=${2:-cuda}
OUT=${OUT:-gpu-out}
DATA=${SDPORT_BENCH_DATA:-/tmp/sdport-bench-data}
mkdir -p "$OUT" "$DATA"
exec > >(tee "$OUT/gpu_checks.log") 2>&1
export PYTHONUNBUFFERED=1
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "$SIZE" = full ]; then
  CKPT="$DATA/sd-full.ckpt"; SIDE=64; PX=512; STEPS=50; RUNS=5
  [ -f "$CKPT" ] || python -m sdport.fixtures.build --size full --variants lightning --out "$DATA"
else
  CKPT="$DATA/sd-tiny.ckpt"; SIDE=16; PX=32; STEPS=4; RUNS=1
  [ -f "$CKPT" ] || python -m sdport.fixtures.build --size tiny --variants lightning --out "$DATA"
fi
H5="${CKPT%.ckpt}.h5"
[ -f "$H5" ] || sdport convert "$CKPT" -o "$H5"
FP16=fp16; [ "$DEVICE" = cpu ] && FP16=bf16  # no fp16 kernels on a CPU (models/load.py)

python - <<'EOF' || true
import torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch", torch.__version__)
EOF

# 1. Layer-by-layer parity; exit 1 (a failed gate) is a result, not a reason to stop.
for DT in fp32 "$FP16"; do
  sdport parity unet "$CKPT" --h5 "$H5" --device "$DEVICE" --dtype "$DT" --size "$SIDE" --batch 2 \
    --mode both --json "$OUT/parity_unet_$DT.json" || echo "parity unet $DT: exit $?"
done

# 2. UNet step time and peak memory against diffusers (and ldm in fp32).
python "$HERE/bench_unet.py" --size "$SIZE" --device "$DEVICE" --dtype "$FP16" --impls diffusers,sdport \
  --runs "$RUNS" --json "$OUT/unet_$FP16.json"
python "$HERE/bench_unet.py" --size "$SIZE" --device "$DEVICE" --dtype fp32 --runs "$RUNS" \
  --json "$OUT/unet_fp32.json"

# 3. txt2img end to end, with the process's peak GPU memory.
python - "$H5" "$DEVICE" "$FP16" "$PX" "$STEPS" "$OUT/txt2img.json" <<'EOF'
import json, sys, time
import torch
from sdport.models import pipeline as P
h5, device, dtype, px, steps, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
req = P.Request(prompt="a red cube on a wooden table", steps=steps, height=px, width=px, sampler="plms", seed=1)
with P.Models(h5, device=device, dtype=dtype) as models:
    for run in ("warm-up", "timed"):
        if device == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        latents = list(P.txt2img(models, req))
        image = P.decode(models, latents[-1])
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
rec = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dtype": dtype, "size": px,
       "steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
       "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}
print(json.dumps(rec))
json.dump(rec, open(out, "w"), indent=1)
EOF
echo "done: $OUT"
