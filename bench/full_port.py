"""A port checked at full size: `sdport parity COMPONENT CKPT --port SPEC` for each component, fp32 on
the CPU, each in a fresh process: verdict, pairing coverage, worst layer, wall time, peak RSS, spill.

    python bench/full_port.py --ckpt CKPT [--vit VIT_CKPT] [--port diffusers] [--components ...] [--json OUT]

The full-size checkpoints come from `python -m sdport.fixtures.build --size full --variants
lightning,vit_openai --out DIR` (random weights in the exact key layouts).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_parity_memory import CLI, run  # noqa: E402


def report_summary(path: str) -> dict:
    """A port run's JSON report in brief: verdict, layers, pairing, spill, culprit, worst layer."""
    with open(path) as f:
        rep = json.load(f)
    worst = max(rep["layers"], key=lambda l: max(m.get("rel_l2", 0) for m in l["metrics"].values()))
    return {"passed": rep["passed"], "layers": len(rep["layers"]), "pairing": rep["inputs"].get("pairing"),
            "spilled_bytes": rep["inputs"].get("spilled_bytes"), "culprit": rep["culprit"],
            "worst": {"port": worst["native"], "reference": worst["reference"],
                      "rel_l2": {m: v.get("rel_l2") for m, v in worst["metrics"].items()}}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--vit", default=None, help="an image-encoder checkpoint (for the vit component)")
    ap.add_argument("--port", default="diffusers")
    ap.add_argument("--components", default="unet,text_model,encoder,decoder,vit")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sdport-bench-port-")
    out = {"machine": {"load_average": os.getloadavg(), "cpus": os.cpu_count()}, "port": a.port, "results": {}}
    for comp in a.components.split(","):
        ckpt = a.vit if comp == "vit" else a.ckpt
        if ckpt is None:
            continue
        rj = os.path.join(work, f"{comp}.json")
        r = run(["-c", CLI, "parity", comp, ckpt, "--port", a.port, "--json", rj], None)
        r.update(report_summary(rj))
        r.pop("stdout_tail", None)
        out["results"][comp] = r
        print(comp, json.dumps(r), flush=True)
    out["machine"]["load_average_after"] = os.getloadavg()
    if a.json:
        with open(a.json, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
