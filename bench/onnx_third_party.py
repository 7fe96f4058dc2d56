"""ONNX UNet graphs that no sdport code wrote, checked as ports at full size: ldm's own UNetModel and
diffusers' UNet2DConditionModel, each built from the checkpoint and exported with `torch.onnx.export`
(the TorchScript exporter, as `sdport export --onnx` uses), then `sdport parity unet CKPT --port
onnx:GRAPH` in a fresh process: verdict, pairing, worst layer, wall time, peak RSS.

    python bench/onnx_third_party.py --ckpt CKPT [--which ldm,diffusers] [--size 32] [--batch 2] [--out DIR] [--json OUT]

The graph's spatial size is fixed at export (`--size`, latent pixels); its batch is dynamic. `--out`
keeps the graphs (default: a temporary folder, deleted).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_parity_memory import CLI, run  # noqa: E402
from full_port import report_summary  # noqa: E402

EXPORT = """
import sys, time, warnings, torch
from sdport.parity.reference.load import load_reference
from sdport.parity.ports.diffusers import build
which, ckpt, size, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ref, cfg, _ = load_reference("unet", ckpt)
module = ref if which == "ldm" else build(ckpt, "unet")
del ref
x = torch.randn(1, cfg.in_channels, size, size)  # [B, C, H, W]
t, c = torch.tensor([10]), torch.randn(1, 77, cfg.context_dim)
with warnings.catch_warnings(), torch.no_grad():
    warnings.simplefilter("ignore")
    torch.onnx.export(module.eval(), (x, t, c), path, dynamo=False, opset_version=17,
                      input_names=["sample", "timestep", "encoder_hidden_states"],
                      dynamic_axes={"sample": {0: "b"}, "timestep": {0: "b"}, "encoder_hidden_states": {0: "b"}})
"""


def _bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--which", default="ldm,diffusers")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    root = a.out or tempfile.mkdtemp(prefix="sdport-bench-onnx-")
    out = {"machine": {"load_average": os.getloadavg(), "cpus": os.cpu_count()}, "size": a.size,
           "batch": a.batch, "results": {}}
    try:
        for which in a.which.split(","):
            folder = os.path.join(root, which)  # torch writes a large graph's tensors beside it
            os.makedirs(folder, exist_ok=True)
            graph = os.path.join(folder, "unet.onnx")
            exported = run(["-c", EXPORT, which, a.ckpt, str(a.size), graph], None)
            report = os.path.join(root, f"{which}.json")
            r = run(["-c", CLI, "parity", "unet", a.ckpt, "--port", f"onnx:{graph}", "--size", str(a.size),
                     "--batch", str(a.batch), "--json", report], None)
            r.pop("stdout_tail", None)
            r.update(export={"wall_s": exported["wall_s"], "peak_rss_mib": exported["peak_rss_mib"],
                             "bytes_on_disk": _bytes(folder)}, **report_summary(report))
            out["results"][which] = r
            print(which, json.dumps(r), flush=True)
            if not a.out:
                shutil.rmtree(folder)
    finally:
        if not a.out:
            shutil.rmtree(root, ignore_errors=True)
    out["machine"]["load_average_after"] = os.getloadavg()
    if a.json:
        with open(a.json, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
