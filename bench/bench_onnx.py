"""The UNet as ONNX: the fp16 and fp32 graphs' size on disk, and one UNet call in ONNX Runtime (CPU)
beside the native model's, in the same process, calls alternating.

    python bench/bench_onnx.py [--size full|tiny] [--runs N] [--opt disabled|basic|extended|all] [--json OUT]

Batch 2, the config's latent side (64 for SD v1), a 77-token context. The graphs are written by
`sdport export --onnx` into a temporary directory and removed at the end.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="tiny")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--opt", choices=["disabled", "basic", "extended", "all"], default="all")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    from sdport.convert.onnx_export import export_onnx
    from sdport.models.load import load_model

    h5 = common.h5_for(common.checkpoint_for(a.size))
    with tempfile.TemporaryDirectory(prefix="sdport-bench-onnx-") as work:
        sizes = {}
        for dtype in ("fp32", "fp16"):
            t = time.perf_counter()
            m = export_onnx(h5, os.path.join(work, dtype), components={"unet"}, dtype=dtype)
            c = m["components"]["unet"]
            sizes[dtype] = {"bytes": c["bytes"], "external_data": c["external_data"],
                            "export_s": time.perf_counter() - t}
        unet = load_model(h5, "unet")
        cfg = unet.config
        side = 64 if a.size == "full" else 16
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, cfg.in_channels, side, side, generator=g)
        t_ = torch.tensor([999, 500])
        ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[a.opt]
        opts.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch
        # ORT's pool spins after each run by default, taking the cores from the torch call that follows.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(os.path.join(work, "fp32", "unet.onnx"), opts, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy(), "t": t_.numpy(), "context": ctx.numpy()}

        def run_ort():
            return sess.run(None, feed)[0]

        @torch.no_grad()
        def run_native():
            return unet(x, t_, ctx)

        outs = {"onnxruntime": torch.from_numpy(run_ort()), "sdport": run_native()}  # warm-up calls
        runs = {"onnxruntime": [], "sdport": []}
        for _ in range(a.runs):
            for impl, fn in (("onnxruntime", run_ort), ("sdport", run_native)):
                t = time.perf_counter()
                fn()
                runs[impl].append(time.perf_counter() - t)
    d = outs["onnxruntime"].double() - outs["sdport"].double()
    record = {
        "benchmark": "onnx_unet", "size": a.size, "batch": 2, "side": side, "ort_optimization": a.opt,
        "graph_bytes": sizes, "fp16_over_fp32_bytes": sizes["fp16"]["bytes"] / sizes["fp32"]["bytes"],
        "results": [{"impl": k, "median_s": statistics.median(v), "runs_s": v, "peak_rss_mib": None}
                    for k, v in runs.items()],
        "process_peak_rss_mib": common.peak_rss_mib(),  # both in one process: one peak, not one each
        "agreement_rel_l2": float(d.norm() / outs["sdport"].double().norm()),
        "machine": common.machine("cpu"), "versions": {**common.versions(), "onnxruntime": ort.__version__},
    }
    for dtype, s in sizes.items():
        print(f"unet {dtype} graph: {s['bytes']:,} bytes" + (f" (external data {s['external_data']})" if s["external_data"] else "")
              + f", exported in {s['export_s']:.1f} s")
    for r in record["results"]:
        print(f"{r['impl']:>12}: median {r['median_s']:.3f} s over {len(r['runs_s'])} calls")
    print(f"ORT vs native rel_l2 {record['agreement_rel_l2']:.2g}")
    common.write_json(a.json, record)


if __name__ == "__main__":
    main()
