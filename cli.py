"""The `sdport` command line: one click group, thin commands; the work lives in the packages."""
from __future__ import annotations

import _thread
import json
import math
import os
import signal
import sys
import threading

import click

from . import __version__
from .models.storage import partial as partials
from .models.components import NAMES
from .models.errors import SdportError

COMPONENT_NAMES = NAMES
MAX_ERROR = 400  # characters of an error line
# The compute dtypes (models/devices.py DTYPES; a test keeps the two equal): named here so that building
# the command line imports no torch.
DTYPES = ("fp32", "fp16", "bf16")
GATES = (*DTYPES, "int8")  # the default tolerance tables (parity/metrics.py)
EXPORT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # what `export` writes: safetensors, else a zip


class _Group(click.Group):
    """User errors become one line on stderr and exit code 2; --debug shows the traceback. Ctrl-C
    exits 130 with one line, leaving no partial file behind."""

    def main(self, args=None, *rest, **kwargs):
        if args is None and threading.current_thread() is threading.main_thread():
            # The program itself (a CliRunner passes args, and the process it runs in keeps its handlers).
            signal.signal(signal.SIGINT, _on_sigint)
            sys.unraisablehook = _unraisable
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx):
        partials.reset()
        _SIGINT.update(unwind=True, seen=False, said=False)
        try:
            try:
                try:
                    rv = super().invoke(ctx)
                finally:
                    sys.stdout.flush()  # a reader gone away shows here, not as a traceback at interpreter exit
                if _SIGINT["seen"]:  # an interrupt that some finalizer swallowed is still an interrupt
                    raise KeyboardInterrupt
                return rv
            except BrokenPipeError:
                _stdout_closed(ctx)
            except (SdportError, OSError) as e:
                if _SIGINT["seen"]:  # a library's failure under a pending interrupt: the interrupt's doing
                    raise KeyboardInterrupt from None
                if ctx.obj and ctx.obj.get("debug"):
                    raise
                msg = str(e) if isinstance(e, SdportError) else f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}".lstrip(": ")
                msg = " ".join(msg.splitlines())  # one line, even when a library's message spans several
                if len(msg) > MAX_ERROR:  # whatever a file managed to get quoted into it
                    msg = msg[:MAX_ERROR] + "..."
                click.echo(f"error: {msg}", err=True)
                ctx.exit(2)
        except KeyboardInterrupt:
            _SIGINT["unwind"] = False  # a second Ctrl-C from here on exits at once
            partials.remove_open()  # what no writer's cleanup reached (the interrupt came between two lines)
            click.echo(_interrupted_line(), err=True)
            _SIGINT["said"] = True
            ctx.exit(130)
        finally:
            _SIGINT["unwind"] = False


# Ctrl-C in the program. While a command runs, SIGINT raises KeyboardInterrupt, so the writers unwind
# and remove their partial files; before it starts and after it ends (click's parsing, the interpreter's
# exit, where Python would print "Exception ignored" and keep the exit code), it exits 130 at once.
_SIGINT = {"unwind": False, "seen": False, "said": False}


def _on_sigint(signum, frame):
    _SIGINT["seen"] = True
    if _SIGINT["unwind"]:
        if _importing(frame):
            # Raised inside a module's import, the interrupt can land in Python code that a C++ extension
            # runs while it initialises (torch's), which aborts the process or makes the interpreter kill
            # itself with SIGINT at exit: deliver it again once the import is over.
            again = threading.Timer(0.02, _thread.interrupt_main)
            again.daemon = True
            again.start()
            return
        raise KeyboardInterrupt
    partials.remove_open()
    try:
        sys.stdout.flush()
    except Exception:  # a closed pipe, or the interrupt landed inside a write to it
        pass
    if not _SIGINT["said"]:
        os.write(2, (_interrupted_line() + "\n").encode())
    os._exit(130)


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _unraisable(hook, default=sys.unraisablehook):
    """An interrupt that lands in a finalizer or a weakref callback is swallowed there ("Exception ignored
    in ..."): raise it again a moment later from another thread, once this hook has returned (raised in
    the hook, it would be swallowed again). Where it lands nowhere, `seen` still ends the command with 130."""
    if isinstance(hook.exc_value, KeyboardInterrupt):
        again = threading.Timer(0.01, _thread.interrupt_main)
        again.daemon = True  # never holds up the exit
        again.start()
        return
    default(hook)


def _raise_if_interrupted() -> None:
    """An interrupt that C code or a finalizer swallowed: raised between two units of work."""
    if _SIGINT["seen"] and _SIGINT["unwind"]:
        raise KeyboardInterrupt


def _progress(desc: str, unit: str, total: int | None = None):
    from .progress import Progress

    return Progress(desc, unit, total, check=_raise_if_interrupted)


def _stages(prefix: str):
    """The parity libraries' progress(what, done, total, unit) callback, shown on stderr."""
    from .progress import Stages

    return Stages(prefix, check=_raise_if_interrupted)


def _interrupted_line() -> str:
    done = partials.completed()
    return f"interrupted after writing {', '.join(done)}" if done else "interrupted: no output written"


def _stdout_closed(ctx):
    """The reader of stdout went away (`sdport inspect F | head -1`): end quietly with 141 (128 + SIGPIPE),
    the status a shell reports for a command that a closed pipe stops."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere at exit
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
        pass
    ctx.exit(141)


class _Finite(click.ParamType):
    """A float that is a number: nan and inf are refused (one line, exit 2) instead of reaching a sampler."""

    name = "float"

    def convert(self, value, param, ctx):
        x = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(x):
            raise SdportError(f"{param.opts[0] if param else 'value'} {value}: expected a finite number")
        return x


FINITE = _Finite()


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="sdport")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def main(ctx, debug):
    """sdport: convert Stable Diffusion checkpoints to a documented HDF5 layout, run a native
    reimplementation from it, and compare it layer by layer with the original."""
    ctx.obj = {"debug": debug}


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _config_text(cfg: dict) -> str:
    """A component's config on one line, under the names the layout stores (docs/layout.md)."""
    return " ".join(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (list, dict)) else v}"
                    for k, v in cfg.items())


_CONFIG_OPTION = click.option(
    "--config", type=click.Path(dir_okay=False), default=None,
    help="The checkpoint's ldm inference yaml (default: NAME.yaml beside NAME.ckpt, when there is one).")
_PREDICTION_OPTION = click.option(
    "--prediction", type=click.Choice(["eps", "v"]), default=None,
    help="What the UNet predicts (no weight says it): overrides the yaml; eps is assumed without either.")


def _echo_settings(settings) -> None:
    """What no shape says, each with its source (shapes / yaml / flag / assumed)."""
    if not isinstance(settings, dict) or not settings:
        return
    click.echo("  settings (value, source, why):")
    for name, s in settings.items():
        if isinstance(s, dict):
            click.echo(f"  - {name:<31} {json.dumps(s.get('value'))}  [{s.get('source')}] {s.get('why')}")


@main.command()
@click.argument("file", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_CONFIG_OPTION
@_PREDICTION_OPTION
def inspect(file, as_json, config, prediction):
    """What is inside FILE: a checkpoint (.ckpt/.pt/.bin/.safetensors) or an sdport .h5."""
    from .convert.inspect import inspect as run

    info = run(file, config, prediction)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    if info["kind"] == "sdport-layout":
        click.echo(f"{file}: sdport layout v{info['layout_version']} ({info.get('family')}, {info.get('variant')}), "
                   f"from {info.get('source_file')} [{info.get('source_format')}], dtype policy {info.get('dtype_policy')}")
        for name, c in info["components"].items():
            click.echo(f"  /{name:<11} {c['datasets']:>5} datasets {_human_bytes(c['bytes']):>11}  {c['dtypes']}")
        click.echo("  config:")
        for name, c in info["components"].items():
            if c.get("config"):
                click.echo(f"    {name:<11} {_config_text(c['config'])}")
        _echo_settings(info.get("settings"))
        return
    click.echo(f"{file}: {info['container']} ({info['wrapper']}), {info['tensors']} tensors, "
               f"{_human_bytes(info['bytes'])}, dtypes {info['dtypes']}")
    click.echo(f"  family {info.get('family')}, variant {info.get('variant')}"
               + (f" (UNet in-channels {info['unet_in_channels']})" if "unet_in_channels" in info else "")
               + f", EMA {'present' if info['ema'] else 'absent'}")
    for name, n in info["components"].items():
        click.echo(f"  {name:<11} {n:>5} keys")
    if info.get("configs"):
        click.echo("  config (inferred from the tensors' shapes; the UNet's heads are not stored: --num-heads, "
                   "--num-head-channels):")
    for name, cfg in (info.get("configs") or {}).items():
        click.echo(f"    {name:<11} {_config_text(cfg)}")
    _echo_settings(info.get("settings"))
    if info.get("error"):
        click.echo(f"  unsupported: {info['error']}")
    by_reason: dict[str, list[str]] = {}
    for key, reason in (info.get("ignored") or {}).items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        click.echo(f"  ignored    {len(keys)} key(s), e.g. {keys[0]!r}: {reason}")
    if info.get("unknown_keys"):
        click.echo(f"  {len(info['unknown_keys'])} unknown keys, e.g. {info['unknown_keys'][:3]}")
    for w in info.get("warnings", []):
        click.echo(f"warning: {w}", err=True)


@main.command()
@click.argument("file", type=click.Path(dir_okay=True))
def verify(file):
    """Check an sdport .h5 file: layout version, every component's config and datasets (names and
    shapes, as the loader would), and every dataset's sha256. Exit 1 when anything is wrong."""
    from .models.storage.layout import COMPONENTS, SCHEDULE, LayoutReader, verify as check
    from .models.load import check_datasets

    problems, counts = [], {}
    with LayoutReader(file) as r:
        version, comps = r.version, r.components()
        if not comps:
            problems.append(f"no component: the file holds none of {', '.join(COMPONENTS)} "
                            f"(an interrupted conversion leaves such a file)")
        for comp in comps:
            try:
                check_datasets(r, comp)
                counts[comp] = len(r.keys(comp))
            except SdportError as e:
                problems.append(str(e))
        if r.has(SCHEDULE):
            counts[SCHEDULE] = len(r.keys(SCHEDULE))
    if not problems:
        problems = check(file)
    if problems:
        click.echo(f"{file}: {len(problems)} problem(s); first: {problems[0]}", err=True)
        for p in problems[1:10]:
            click.echo(f"  {p}", err=True)
        sys.exit(1)
    click.echo(f"{file}: ok (layout version {version}; " + ", ".join(f"/{k} {n} datasets" for k, n in counts.items())
               + "; every config builds its model, every dataset has its shape and sha256)")


def _components_option(value):
    if not value:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in COMPONENT_NAMES]
    if bad:
        raise click.BadParameter(f"unknown component(s) {bad}; choose from {', '.join(COMPONENT_NAMES)}")
    return set(names)


@main.command()
@click.argument("src", type=click.Path(dir_okay=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Destination .h5 file.")
@click.option("--components", default=None, help="Comma-separated subset of unet,text_model,vit,encoder,decoder.")
@click.option("--dtype", type=click.Choice(["keep", *DTYPES]), default="keep", show_default=True)
@click.option("--ema", type=click.Choice(["auto", "use", "ignore"]), default="auto", show_default=True,
              help="auto: model.diffusion_model.* as CompVis inference does; use: the EMA copy; ignore: never read it.")
@click.option("--num-heads", type=click.IntRange(min=1), default=None,
              help="UNet attention heads, the same at every level (not stored in checkpoints).")
@click.option("--num-head-channels", type=click.IntRange(min=1), default=None,
              help="UNet attention head width instead: heads = width // N per level (SD 2.x: 64).")
@click.option("--strict", is_flag=True, help="Fail on keys that belong to no known component.")
@click.option("--force", is_flag=True, help="Overwrite the destination.")
@click.option("--compress", is_flag=True, help="gzip the datasets (smaller, no memory-mapped loading).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Store Linear/Conv2d weights as int8 with per-output-channel scales (not exportable).")
@click.option("--quantize-components", default="unet", show_default=True,
              help="Comma-separated components --quantize applies to.")
@_CONFIG_OPTION
@_PREDICTION_OPTION
def convert(src, out, components, dtype, ema, num_heads, num_head_channels, strict, force, compress, quantize,
            quantize_components, config, prediction):
    """Convert a CompVis checkpoint (or a CLIP ViT state dict) to the sdport HDF5 layout."""
    from .convert.convert import convert as run

    with _progress("converting", "tensor") as bar:  # the total comes with the first update
        s = run(src, out, components=_components_option(components), dtype=dtype, ema=ema, strict=strict,
                force=force, num_heads=num_heads, num_head_channels=num_head_channels, config=config,
                prediction=prediction,
                compression="gzip" if compress else None, progress=bar.update,
                quantize=quantize, quantize_components=_components_option(quantize_components))
    p = s.plan
    click.echo(f"wrote {out}: {p.family} {p.variant}, {_human_bytes(s.bytes_written)}")
    for name, n in s.written.items():
        click.echo(f"  /{name:<11} {n:>5} datasets")
    if p.ema.get("present"):
        click.echo(f"  EMA weights present (differ from the others: {p.ema.get('differs')}); "
                   f"used: {'EMA' if p.ema.get('used') else 'model.diffusion_model.*'}")
    reasons: dict[str, int] = {}
    for reason in p.ignored.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in reasons.items():
        click.echo(f"  ignored {n:>4} key(s): {reason}")
    if p.unknown:
        click.echo(f"  {len(p.unknown)} unknown key(s) not converted, e.g. {p.unknown[:3]} (--strict makes this an error)")
    for w in p.warnings:
        click.echo(f"  warning: {w}", err=True)
    for key, n in list(s.nonfinite.items())[:10]:
        click.echo(f"  warning: {key} holds {n} NaN/Inf value(s)", err=True)
    if s.nonfinite:
        click.echo(f"  warning: {len(s.nonfinite)} tensor(s) hold NaN/Inf values", err=True)


@main.command()
@click.argument("h5", type=click.Path(dir_okay=True))
@click.option("-o", "--output", "out", default=None, type=click.Path(),
              help="BACK.safetensors (flat) or BACK.ckpt, .pt, .pth, .bin (PyTorch zip); other suffixes are refused.")
@click.option("--flat", is_flag=True, help="For .ckpt: a flat state dict instead of {'state_dict': ...}.")
@click.option("--onnx", "out_dir", default=None, type=click.Path(),
              help="Instead of -o: one ONNX graph per component into this directory, with manifest.json (docs/onnx.md).")
@click.option("--components", default=None, help="With --onnx: comma-separated subset (default: every component in H5).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default=None, help="With --onnx: the graphs' dtype [fp32].")
@click.option("--opset", type=int, default=None, help="With --onnx: the ONNX opset [17].")
@click.option("--force", is_flag=True, help="Overwrite the destination.")
def export(h5, out, flat, out_dir, components, dtype, opset, force):
    """Write an sdport .h5 back under the source key names (CompVis, or the ViT's source format), or
    (--onnx DIR) the native models as ONNX graphs."""
    if out is None and out_dir is None:
        from .models.storage.layout import LayoutReader

        with LayoutReader(h5):  # what is wrong with the input is the first thing to say
            pass
    if (out is None) == (out_dir is None):
        raise SdportError("export: give either -o FILE (checkpoint) or --onnx DIR (ONNX graphs), not both or neither")
    if out_dir is not None:
        if flat:
            raise SdportError("export: --flat applies to -o checkpoints, not to --onnx")
        return _export_onnx(h5, out_dir, components, dtype or "fp32", opset, force)
    if components or dtype or opset is not None:
        raise SdportError("export: --components, --dtype and --opset apply to --onnx")
    from .convert.convert import check_export_destination, export as run

    check_export_destination(h5, out, force=force)  # a directory or the input itself is the first thing to say
    # The format follows the suffix; an unknown one would silently get a PyTorch zip under a misleading name.
    suffix = os.path.splitext(out)[1]
    if suffix not in EXPORT_SUFFIXES:
        raise SdportError(f"{out}: unknown output suffix {suffix or '(none)'!r}; use .safetensors (flat safetensors) "
                          f"or {'/'.join(s for s in EXPORT_SUFFIXES if s != '.safetensors')} (PyTorch zip)")

    counts = run(h5, out, force=force, wrapper="flat" if flat else None)
    click.echo(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def _export_onnx(h5, out_dir, components, dtype, opset, force):
    from .convert.onnx_export import DEFAULT_OPSET, export_onnx

    with _progress("exporting", "graph") as bar:
        m = export_onnx(h5, out_dir, components=_components_option(components), dtype=dtype,
                        opset=DEFAULT_OPSET if opset is None else opset, force=force,
                        progress=lambda name, done, total: bar.update(done, total))
    click.echo(f"wrote {out_dir}: {len(m['components'])} ONNX graph(s), opset {m['opset']}, {m['dtype']}")
    for name, c in m["components"].items():
        ext = f" + {c['external_data']}" if c["external_data"] else ""
        click.echo(f"  {c['file']}{ext}: {_human_bytes(c['bytes'])}, ONNX Runtime vs native rel_l2 "
                   f"{c['ort_check']['rel_l2_vs_native']:.2g}")


# ---------------------------------------------------------------------------------------------
# Tokenizer and image generation
# ---------------------------------------------------------------------------------------------


def _token_record(tok, prompt: str, pad: int | None = None) -> dict:
    ids, cut = tok.framed(prompt) if pad is None else tok.framed(prompt, pad)
    body = tok.encode(prompt)
    return {"prompt": prompt, "ids": ids, "tokens": tok.tokens(ids), "prompt_tokens": len(body), "truncated": cut,
            "dropped": max(0, len(body) - 75), "dropped_text": tok.decode(body[75:])}


MAX_PROMPTS_FILE = 16 << 20  # bytes of a --file of prompts


def _read_prompts(path: str) -> list[str]:
    """The lines of a prompts file: a regular file (a FIFO would block), at most MAX_PROMPTS_FILE bytes, UTF-8."""
    from .models.storage.small import read_regular

    data = read_regular(path, MAX_PROMPTS_FILE)
    if len(data) > MAX_PROMPTS_FILE:
        raise SdportError(f"{path}: larger than {MAX_PROMPTS_FILE >> 20} MiB; split it into smaller files")
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SdportError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


@main.command()
@click.argument("prompt", required=False)
@click.option("--file", "prompts_file", type=click.Path(dir_okay=False),
              help="PROMPTS.txt: one prompt per line; prints one JSON line per prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--pad", type=click.Choice(["end", "zero"]), default="end", show_default=True,
              help="Padding after the end token: end (SD v1, transformers' CLIPTokenizer) or zero "
                   "(SD 2.x, open_clip.tokenize).")
def tokenize(prompt, prompts_file, as_json, pad):
    """The 77 token ids the text encoder sees for PROMPT (start, at most 75 tokens, end, padding)."""
    from .models.tokenizer import END, default_tokenizer

    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give either PROMPT or --file PROMPTS.txt")
    tok = default_tokenizer()
    pad_id = END if pad == "end" else 0
    if prompts_file is not None:
        lines = _read_prompts(prompts_file)
        for line_no, line in enumerate(lines, 1):
            click.echo(json.dumps({"line": line_no, **_token_record(tok, line, pad_id)}, ensure_ascii=False))
        return
    rec = _token_record(tok, prompt, pad_id)
    if as_json:
        click.echo(json.dumps(rec, ensure_ascii=False))
        return
    click.echo(f"{rec['prompt_tokens']} prompt token(s) of 75; "
               + (f"CUT: the last {rec['dropped']} do not reach the text encoder: {rec['dropped_text']!r}"
                  if rec["truncated"] else "not cut"))
    click.echo("ids:    " + " ".join(map(str, rec["ids"])))
    tokens = rec["tokens"]
    body = 2 + min(rec["prompt_tokens"], 75)  # start + prompt tokens + end; the rest is padding
    pad = f" + {len(tokens) - body} x {tokens[-1]} (padding)" if len(tokens) > body else ""
    click.echo("tokens: " + " ".join(tokens[:body]) + pad)


# models.pipeline.SAMPLERS (not imported here: it pulls in torch)
SAMPLERS = ["plms", "ddim", "dpmpp2m"]
SAMPLER_HELP = ("plms, ddim: ldm's PLMSSampler / DDIMSampler; dpmpp2m: DPM-Solver++(2M) as ldm's DPMSolverSampler "
                "(time-uniform, not the Karras-sigma \"DPM++ 2M\" of A1111 / ComfyUI; docs/pipelines.md).")


_SPACING_OPTION = click.option(
    "--spacing", type=click.Choice(["ldm", "linspace", "leading", "trailing"]), default="ldm", show_default=True,
    help="Which timesteps the steps take: ldm's stride 1000 // steps (CompVis; some counts run more steps, some are "
         "refused), or diffusers' linspace / leading / trailing (exactly --steps steps).")


def _say_if_cut(**texts) -> None:
    """One line on stderr for each prompt longer than the 75 tokens the text encoder sees (as `tokenize` says)."""
    from .models.tokenizer import default_tokenizer

    tok = default_tokenizer()
    for label, text in texts.items():
        if not text or not tok.framed(text)[1]:
            continue
        rec = _token_record(tok, text)
        cut = rec["dropped_text"]
        cut = cut if len(cut) <= 60 else cut[:57] + "..."
        what = "negative prompt" if label == "negative" else label
        click.echo(f"warning: the {what} has {rec['prompt_tokens']} tokens; the text encoder sees the first 75, "
                   f"the last {rec['dropped']} are cut: {cut!r}", err=True)


ATTENTION_PRECISIONS = ("fp32", "compute")  # models/unet.py's (a test keeps the two equal)
_ATTENTION_PRECISION_OPTION = click.option(
    "--attention-precision", type=click.Choice(ATTENTION_PRECISIONS), default="fp32", show_default=True,
    help="fp16/bf16 UNet: q·kᵀ and softmax in fp32 (as ldm) or in the compute dtype (ldm's ATTN_PRECISION=fp16).")


def _generation_options(fn):
    """Options shared by txt2img, img2img and inpaint."""
    for opt in reversed([
        click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="OUT.png"),
        click.option("--negative", default="", help="Unconditional prompt (default: the empty prompt)."),
        click.option("--steps", type=int, default=50, show_default=True),
        _SPACING_OPTION,
        click.option("--seed", type=int, default=42, show_default=True),
        click.option("--eta", type=FINITE, default=0.0, show_default=True, help="DDIM noise (0: deterministic)."),
        click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
                     help="fp16 is for GPUs; bf16 is the fast choice on a CPU."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps, ..."),
        click.option("--low-memory", is_flag=True,
                     help="Load one component at a time and free it (peak: the largest component)."),
        click.option("--attention-chunk", type=int, default=None, metavar="N",
                     help="UNet attention over N query tokens at a time (same image; saves memory only where the "
                          "attention kernel would hold the whole score matrix)."),
        _ATTENTION_PRECISION_OPTION,
        click.option("--force", is_flag=True, help="Overwrite OUT.png."),
    ]):
        fn = opt(fn)
    return fn


def _check_output(out: str, force: bool) -> None:
    import os

    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise SdportError(f"{out}: output directory {parent} does not exist")
    if os.path.exists(out) and not force:
        raise SdportError(f"{out}: already exists (use --force to overwrite)")


def _init_size(init: str, rgb, height, width) -> None:
    h, w = rgb.shape[:2]
    if (height or h) != h or (width or w) != w:
        raise SdportError(f"{init} is {w}x{h} but --width/--height ask for {width or w}x{height or h}; sdport does "
                          f"not resize: resize the image yourself or leave out --width/--height")


def _generate(models, req, mode, run, out, height, width):
    """Drive a pipeline generator under a progress bar, decode the last latent, write the PNG."""
    from .models import images, pipeline

    for note in models.notes + [pipeline.steps_note(req, mode)]:
        if note:
            click.echo(f"note: {note}", err=True)
    _say_if_cut(prompt=req.prompt, negative=req.negative)
    latent = None
    with _progress(mode, "step", pipeline.total_steps(req, mode)) as bar:
        for i, latent in enumerate(run, 1):
            bar.update(i)
    image = pipeline.decode(models, latent)
    images.write_png(image, out, pipeline.png_text(models, req, mode, height, width))
    n = pipeline.total_steps(req, mode)  # the steps run: img2img's share, or what the spacing made of --steps
    steps = f"{n} of {req.steps} steps (strength {req.strength})" if mode == "img2img" else (
        f"{n} steps" + (f" (--steps {req.steps}, {req.spacing} spacing)" if n != req.steps else ""))
    click.echo(f"wrote {out}: {width}x{height}, {req.sampler} {steps}, scale {req.scale}, seed {req.seed}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.argument("prompt")
@_generation_options
@click.option("--scale", type=FINITE, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="plms", show_default=True,
              help=SAMPLER_HELP)
@click.option("--height", type=int, default=None, help="Image height (default: the model's trained size, 512 for SD v1).")
@click.option("--width", type=int, default=None, help="Image width (default: as --height).")
def txt2img(model, prompt, out, negative, steps, spacing, seed, eta, dtype, device, low_memory, attention_chunk, attention_precision, force,
            scale, sampler, height, width):
    """Generate OUT.png from PROMPT with an sdport .h5 (CompVis txt2img defaults: 50 PLMS steps, the model's
    trained size: 512x512 for SD v1)."""
    from .models import pipeline

    _check_output(out, force)
    with pipeline.Models(model, device=device, dtype=dtype, low_memory=low_memory,
                         attention_chunk=attention_chunk,
                         attention_precision=attention_precision) as models:
        models.require("txt2img")
        if height is None or width is None:
            side = pipeline.trained_size(models)
            height, width = height or width or side, width or height or side
        req = pipeline.Request(prompt=prompt, negative=negative, steps=steps, scale=scale, seed=seed,
                               sampler=sampler, eta=eta, height=height, width=width, spacing=spacing)
        _generate(models, req, "txt2img", pipeline.txt2img(models, req), out, height, width)


@main.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.argument("prompt")
@click.option("--init", "init", required=True, type=click.Path(dir_okay=False), help="IN.png to start from.")
@click.option("--strength", type=FINITE, default=0.75, show_default=True,
              help="How much to change: int(strength * steps) DDIM steps are re-run.")
@_generation_options
@click.option("--scale", type=FINITE, default=5.0, show_default=True,
              help="Classifier-free guidance scale (5.0 as ldm's img2img).")
@click.option("--height", type=int, default=None, help="Must equal the init image's (default: its size).")
@click.option("--width", type=int, default=None, help="Must equal the init image's (default: its size).")
def img2img(model, prompt, init, strength, out, negative, steps, spacing, seed, eta, dtype, device, low_memory,
            attention_chunk, attention_precision, force, scale, height, width):
    """Change IN.png toward PROMPT (ldm's img2img: encode, noise to the strength's step, DDIM back)."""
    from .models import images, pipeline

    _check_output(out, force)
    rgb = images.read_rgb(init)
    _init_size(init, rgb, height, width)
    h, w = rgb.shape[:2]
    req = pipeline.Request(prompt=prompt, negative=negative, steps=steps, scale=scale, seed=seed, sampler="ddim",
                           eta=eta, height=h, width=w, strength=strength, spacing=spacing)
    with pipeline.Models(model, device=device, dtype=dtype, low_memory=low_memory,
                         attention_chunk=attention_chunk,
                         attention_precision=attention_precision) as models:
        _generate(models, req, "img2img", pipeline.img2img(models, req, images.to_tensor(rgb)), out, h, w)


@main.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.argument("prompt", required=False, default="")
@click.option("--init", "init", required=True, type=click.Path(dir_okay=False),
              help="IN.png; its pure green (0,255,0) pixels are repainted unless --mask is given.")
@click.option("--mask", "mask", type=click.Path(dir_okay=False), default=None,
              help="MASK.png of the same size: white (>= 128 grey) = repaint.")
@_generation_options
@click.option("--scale", type=FINITE, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="plms", show_default=True,
              help=SAMPLER_HELP)
@click.option("--height", type=int, default=None, help="Must equal the init image's (default: its size).")
@click.option("--width", type=int, default=None, help="Must equal the init image's (default: its size).")
def inpaint(model, prompt, init, mask, out, negative, steps, spacing, seed, eta, dtype, device, low_memory,
            attention_chunk, attention_precision, force, scale, sampler, height, width):
    """Repaint part of IN.png, with a plain or a 9-channel inpainting model (PROMPT may be left out)."""
    from .models import images, pipeline

    _check_output(out, force)
    rgb = images.read_rgb(init)
    _init_size(init, rgb, height, width)
    repaint = images.green_mask(rgb) if mask is None else images.read_mask(mask)
    h, w = rgb.shape[:2]
    req = pipeline.Request(prompt=prompt, negative=negative, steps=steps, scale=scale, seed=seed, sampler=sampler,
                           eta=eta, height=h, width=w, spacing=spacing)
    with pipeline.Models(model, device=device, dtype=dtype, low_memory=low_memory,
                         attention_chunk=attention_chunk,
                         attention_precision=attention_precision) as models:
        run = pipeline.inpaint(models, req, images.to_tensor(rgb), repaint)
        _generate(models, req, "inpaint", run, out, h, w)



# --- parity ------------------------------------------------------------------------------------


@main.group()
def parity():
    """Compare the native models with the original code, layer by layer.

    \b
    sdport parity COMPONENT CHECKPOINT ...   reference vs native (unet, text_model, vit, encoder, decoder)
    sdport parity record ...                 write the reference's activations (golden file)
    sdport parity check --golden F ...       native side only, against a golden file
    sdport parity compare A.h5 B.h5          two activation dumps from any producer
    sdport parity txt2img CHECKPOINT ...     whole sampler runs, step by step (docs/parity.md)
    """


def _byte_size(option: str, text: str | None) -> int | None:
    """'512M', '4G', '1048576' -> bytes (K, M, G, T are powers of 1024); one line on anything else."""
    if text is None:
        return None
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        n = float("nan")
    if not n >= 1 or n != n or n > 2 ** 62:
        raise SdportError(f"{option} {text}: give a positive size in bytes, e.g. 512M or 4G")
    return int(n)


def _tolerance(dtype, tol, tolerances):
    from .parity.metrics import apply_overrides, default_tolerance, load_tolerances

    try:
        t = load_tolerances(tolerances, dtype) if tolerances else default_tolerance(dtype)
        return apply_overrides(t, list(tol))
    except (ValueError, KeyError) as e:
        raise SdportError(f"tolerance: {e}") from None
    except FileNotFoundError:
        raise SdportError(f"{tolerances}: no such tolerance file") from None


def _check_report_paths(**paths) -> None:
    """Every output path before the run, as convert checks its destination: a missing or read-only folder
    fails now, not after minutes of work. Existing report files are overwritten."""
    for opt, path in paths.items():
        if not path:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise SdportError(f"--{opt} {path}: is a directory")
        if not os.path.isdir(parent):
            raise SdportError(f"--{opt} {path}: output directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise SdportError(f"--{opt} {path}: output directory {parent} is not writable")


def _finish(result, json_path, junit, html, worst=10):
    """Write the reports, print the summary, exit 1 when the gate fails."""
    from .parity.report import summary_text

    result.write(json_path, junit, html)
    click.echo(summary_text(result.report, worst=worst))
    spilled = result.report.inputs.get("spilled_bytes")
    if spilled:
        click.echo(f"spilled to disk: {_human_bytes(spilled)} (reference activations, deleted)")
    if result.unpaired:
        names = ", ".join(list(result.unpaired)[:4]) + (" ..." if len(result.unpaired) > 4 else "")
        click.echo(f"not observable ({len(result.unpaired)}): {names} (reasons in the JSON report)")
    for label, path in (("json", json_path), ("junit", junit), ("html", html)):
        if path:
            click.echo(f"{label}: {path}")
    if not result.report.passed:
        sys.exit(1)


def _gate_options(fn):
    for opt in reversed([
        click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the JSON report here."),
        click.option("--junit", type=click.Path(dir_okay=False), help="Write a JUnit XML report here."),
        click.option("--html", type=click.Path(dir_okay=False), help="Write a self-contained HTML report here."),
        click.option("--tol", multiple=True, metavar="METRIC=VALUE",
                     help="Override one tolerance, e.g. --tol rel_l2=1e-4 (repeatable; 'none' un-gates)."),
        click.option("--tolerances", type=click.Path(dir_okay=False),
                     help="JSON/TOML file of tolerances (flat, or per dtype)."),
        click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
                     help="Native dtype (the reference stays fp32); also picks the default tolerances."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
    ]):
        fn = opt(fn)
    return fn


def _input_options(fn):
    for opt in reversed([
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the CPU generator for inputs."),
        click.option("--prompt", default=None, help="Text for the text encoder (and the UNet's context)."),
        click.option("--batch", type=int, default=2, show_default=True),
        click.option("--size", type=int, default=None, help="Spatial side of the input (default per component)."),
    ]):
        fn = opt(fn)
    return fn


def _layout_gate(h5, component):
    """'int8' when the layout's component holds int8-quantized weights: an int8 port is gated by the int8
    defaults (those `convert --quantize` is measured against), not by its compute dtype's; else None."""
    if not h5:
        return None
    from .models.storage.layout import LayoutReader

    with LayoutReader(h5) as r:
        return "int8" if r.has(component) and r.quantized(component) else None


def _component_command(component):
    @click.argument("checkpoint", type=click.Path(dir_okay=False))
    @click.option("--h5", type=click.Path(dir_okay=False), help="The converted file (default: convert on the fly).")
    @click.option("--mode", type=click.Choice(["accumulated", "isolated", "both"]), default="both", show_default=True)
    @click.option("--gate", "gate_dtype", type=click.Choice(GATES), default=None,
                  help="Whose default tolerances gate (default: int8 when --h5 holds int8 weights, else --dtype).")
    @click.option("--port", default=None, metavar="SPEC",
                  help="Compare a port instead of the native model: diffusers, torch:FILE.py:FUNC, "
                       "torch:package.module:FUNC, dump:FILE.h5 (docs/ports.md) or onnx:FILE.onnx[:LEVEL] (docs/onnx.md).")
    @click.option("--num-heads", type=click.IntRange(min=1), default=None,
                  help="UNet attention heads for the reference (and a diffusers port), as for convert.")
    @click.option("--spill-dir", type=click.Path(file_okay=False, exists=True), default=None,
                  help="Where the reference's activations wait for the candidate (default: the system's temp dir).")
    @click.option("--onnx-memory", default=None, metavar="SIZE",
                  help="With --port onnx: the bytes of observed tensors held at once (512M, 4G, ...) [1G] (docs/onnx.md).")
    @click.option("--calibrate", is_flag=True,
                  help="Gate each layer at no less than twice the reference's own fp32 noise floor, measured "
                       "against the reference in float64 on the same inputs (a second reference run; docs/parity.md).")
    @_ATTENTION_PRECISION_OPTION
    @_input_options
    @_gate_options
    def cmd(checkpoint, h5, mode, gate_dtype, port, num_heads, spill_dir, onnx_memory, calibrate, attention_precision,
            seed, prompt, batch, size, json_path, junit, html, tol, tolerances, dtype, device):
        from .parity.harness import run_parity

        _check_report_paths(json=json_path, junit=junit, html=html)
        if port is not None:
            with _stages(f"parity {component} --port") as progress:
                result = run_parity(component, checkpoint, h5=h5, modes=("accumulated", "isolated") if mode == "both"
                                    else (mode,), device=device, dtype=dtype, seed=seed, prompt=prompt, batch=batch,
                                    size=size, tolerance=_tolerance(gate_dtype or dtype, tol, tolerances),
                                    progress=progress, port=port, num_heads=num_heads, spill_dir=spill_dir,
                                    attention_precision=attention_precision, calibrate=calibrate,
                                    onnx_memory=_byte_size("--onnx-memory", onnx_memory))
            _finish(result, json_path, junit, html)
            return
        if onnx_memory is not None:
            raise SdportError("--onnx-memory applies to --port onnx:FILE.onnx")
        quantized = _layout_gate(h5, component)
        gate = gate_dtype or quantized or dtype
        if quantized and not gate_dtype:
            click.echo(f"gate: int8 defaults (/{component} of {h5} holds int8-quantized weights; --gate overrides)")
        modes = ("accumulated", "isolated") if mode == "both" else (mode,)
        with _stages(f"parity {component}") as progress:
            result = run_parity(component, checkpoint, h5=h5, modes=modes, device=device, dtype=dtype, seed=seed,
                                prompt=prompt, batch=batch, size=size, tolerance=_tolerance(gate, tol, tolerances),
                                progress=progress, num_heads=num_heads, spill_dir=spill_dir,
                                attention_precision=attention_precision, calibrate=calibrate)
        _finish(result, json_path, junit, html)

    cmd.__doc__ = (f"Reference vs native {component}, layer by layer, from seeded inputs; exit 1 when a "
                   f"layer breaks tolerance. Isolated mode re-runs each native layer on the reference's input "
                   f"and names the first one that breaks tolerance as the culprit.")
    return parity.command(component)(cmd)


for _c in COMPONENT_NAMES:
    _component_command(_c)


@parity.command("record")
@click.argument("component", type=click.Choice(COMPONENT_NAMES))
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Golden .h5 to write.")
@click.option("--stats-only", is_flag=True, help="Summary statistics, sha256 and a strided sample per layer.")
@click.option("--sample-size", type=int, default=4096, show_default=True,
              help="Elements in each layer's strided sample.")
@click.option("--device", default="cpu", show_default=True)
@_input_options
def parity_record(component, checkpoint, out, stats_only, sample_size, device, seed, prompt, batch, size):
    """Write the reference side's activations for CHECKPOINT (docs/golden.md)."""
    from .parity.harness import record

    with _stages(f"parity record {component}") as progress:
        n = record(component, checkpoint, out, stats_only=stats_only, device=device, seed=seed, prompt=prompt,
                   batch=batch, size=size, sample_size=sample_size, progress=progress)
    click.echo(f"wrote {out}: {n} layers of {component} ({'stats-only' if stats_only else 'full tensors'}), seed {seed}")


@parity.command("check")
@click.option("--golden", "golden_path", required=True, type=click.Path(dir_okay=False), help="Golden dump.")
@click.option("--h5", type=click.Path(dir_okay=False), help="The converted .h5 to check.")
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False))
@_gate_options
def parity_check(golden_path, h5, checkpoint, json_path, junit, html, tol, tolerances, dtype, device):
    """The native side alone against a golden dump (no reference package needed): --h5 FILE or CHECKPOINT."""
    from .parity.harness import check

    _check_report_paths(json=json_path, junit=junit, html=html)
    with _stages("parity check") as progress:
        result = check(golden_path, h5=h5, checkpoint=checkpoint, device=device, dtype=dtype,
                       tolerance=_tolerance(dtype, tol, tolerances), progress=progress)
    if result.report.inputs.get("provenance"):
        click.echo(f"warning: {result.report.inputs['provenance']}", err=True)
    _finish(result, json_path, junit, html)


@parity.command("compare")
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="Which default tolerances gate A against B.")
@click.option("--tol", multiple=True, metavar="METRIC=VALUE", help="Override one tolerance (repeatable).")
@click.option("--tolerances", type=click.Path(dir_okay=False), help="JSON/TOML file of tolerances.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--junit", type=click.Path(dir_okay=False), help="Write a JUnit XML report here.")
@click.option("--html", type=click.Path(dir_okay=False), help="Write a self-contained HTML report here.")
def parity_compare(a, b, dtype, tol, tolerances, json_path, junit, html):
    """Compare activation dump A with dump B (the reference), layer by layer, paired by name."""
    from .parity.harness import compare_dumps

    _check_report_paths(json=json_path, junit=junit, html=html)
    _finish(compare_dumps(a, b, dtype=dtype, tolerance=_tolerance(dtype, tol, tolerances)), json_path, junit, html)


def _layer_steps_option(value):
    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return []
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SdportError(f"--layer-steps {value}: expected step numbers like 0,5,9 (or none)") from None


@parity.command("txt2img")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--h5", type=click.Path(dir_okay=False), help="The converted file (default: convert on the fly).")
@click.option("--prompt", required=True)
@click.option("--negative", default="", help="Unconditional prompt (default: the empty prompt).")
@click.option("--steps", type=int, default=50, show_default=True)
@_SPACING_OPTION
@click.option("--scale", type=FINITE, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="plms", show_default=True,
              help=SAMPLER_HELP)
@click.option("--eta", type=FINITE, default=0.0, show_default=True, help="DDIM noise (0: deterministic).")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the CPU generator for x_T.")
@click.option("--height", type=int, default=None, help="Image height (default: 512 for SD v1, the model's usual size).")
@click.option("--width", type=int, default=None, help="Image width (default: as --height).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (both sides).")
@click.option("--dtype", default="fp32", show_default=True,  # free text: a bad name gets the one-line error
              help=f"Native dtype: {', '.join(DTYPES)} (the reference is fp32).")
@click.option("--layer-steps", default=None, help="Steps whose UNet call is compared layer by layer, e.g. 0,25,49 "
              "(default: first, middle, last; none: skip).")
@click.option("--gate", "gate_dtype", default=None,
              help=f"Whose default tolerances gate: {', '.join(GATES)} (default: --dtype).")
@click.option("--tol", multiple=True, metavar="METRIC=VALUE",
              help="Override the per-step latent tolerance, e.g. --tol rel_l2=1e-4 (repeatable).")
@click.option("--image-psnr", type=FINITE, default=None, help="Override the image gate: psnr_db lower bound.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--html", type=click.Path(dir_okay=False), help="Write a self-contained HTML report here.")
@click.option("--png", type=click.Path(dir_okay=False), help="Write reference | native | difference here.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Write parity-txt2img.{json,png,html} (and the converted .h5) into this folder.")
def parity_txt2img(checkpoint, h5, prompt, negative, steps, spacing, scale, sampler, eta, seed, height, width, device,
                   dtype, layer_steps, gate_dtype, tol, image_psnr, json_path, html, png, out_dir):
    """ldm's own sampler against the native pipeline from the same x_T, step by step (free-running and
    teacher-forced), the decoded images, and the UNet layer by layer at chosen steps; exit 1 when a
    gate fails (docs/parity.md)."""
    import os

    from .parity.harness import dtype_of
    from .parity.metrics import apply_overrides, dtype_key
    from .parity.txt2img import latent_tolerance, run_txt2img
    from .parity import txt2img_report as out

    dtype_of(dtype)  # --dtype first: --gate defaults to it
    try:
        gate_dtype = dtype_key(gate_dtype or dtype)
        tolerance = apply_overrides(latent_tolerance(gate_dtype), list(tol))
    except ValueError as e:
        raise SdportError(f"--gate/--tol: {e}") from None
    _say_if_cut(prompt=prompt, negative=negative)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        json_path = json_path or os.path.join(out_dir, "parity-txt2img.json")
        png = png or os.path.join(out_dir, "parity-txt2img.png")
        html = html or os.path.join(out_dir, "parity-txt2img.html")
    if out_dir and not os.access(out_dir, os.W_OK):  # it also takes the converted .h5
        raise SdportError(f"--out {out_dir}: folder is not writable")
    _check_report_paths(json=json_path, png=png, html=html)
    with _stages("parity txt2img") as progress:
        result = run_txt2img(checkpoint, h5=h5, prompt=prompt, negative=negative, steps=steps, spacing=spacing,
                             scale=scale, sampler=sampler, eta=eta, seed=seed, height=height, width=width,
                             device=device, dtype=dtype, layer_steps=_layer_steps_option(layer_steps),
                             gate_dtype=gate_dtype, tolerance=tolerance, image_psnr_db=image_psnr, workdir=out_dir,
                             progress=progress)
    if json_path:
        out.write_json(result, json_path)
    scale_text = out.write_png(result, png) if png else None
    if html:
        out.write_html(result, html)
    click.echo(out.summary(result))
    for label, path in (("json", json_path), ("png", png), ("html", html)):
        if path:
            click.echo(f"{label}: {path}" + (f" ({out.PANELS}; heatmap {scale_text})" if label == "png" else ""))
    if not result.passed:
        sys.exit(1)


class _SweepGroup(click.Group):
    """`sdport sweep SPEC.toml ...` runs a sweep (the `run` subcommand); `sdport sweep compare OLD NEW`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@main.group(cls=_SweepGroup)
def sweep():
    """Parity sweeps: a grid of parity runs from a TOML spec, on local worker processes or a Ray cluster
    (docs/sweeps.md).

    \b
    sdport sweep SPEC.toml [--out DIR] [--workers N] [--ray auto|local|ADDRESS] [--resume] [--allow-port-code]
    sdport sweep compare OLD_DIR NEW_DIR     cells that passed before and fail now; every cell's drift
    """


@sweep.command("run")
@click.argument("spec_path", metavar="SPEC.toml", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="The results store (default: sweep-<spec name> in the current folder).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (local default 1; Ray default: the cluster's GPUs, else its CPUs).")
@click.option("--ray", "ray_address", default=None, metavar="auto|local|ADDRESS",
              help="Run on Ray: auto (a running cluster), local (start one here) or a cluster's address.")
@click.option("--resume", is_flag=True, help="Continue the sweep in --out: finished cells with the same inputs are kept.")
@click.option("--allow-port-code", is_flag=True,
              help="Let the spec name torch: ports, i.e. Python files or modules whose function sdport calls.")
def sweep_run(spec_path, out_dir, workers, ray_address, resume, allow_port_code):
    """Run every cell of SPEC.toml; exit 1 when a cell fails or errs (summary.html, junit.xml in --out)."""
    from .parity.sweep import spec as sweep_spec
    from .parity.sweep.run import run_sweep

    spec = sweep_spec.load(spec_path, allow_port_code)
    out_dir = out_dir or f"sweep-{os.path.splitext(os.path.basename(spec_path))[0]}"

    def make_executor():
        if ray_address:
            from .parity.sweep.ray_executor import RayExecutor
            return RayExecutor(ray_address, workers)
        from .parity.sweep.executors import LocalExecutor
        return LocalExecutor(workers or 1)

    with _progress("sweep", "cell") as bar:
        result = run_sweep(spec, out_dir, make_executor, resume=resume, progress=bar.update,
                           log=lambda line: click.echo(line, err=True))
    c = result.counts
    click.echo(f"sweep {spec.name}: {c['cells']} cells, {c['pass']} pass, {c['fail']} fail, {c['error']} error "
               f"({c['computed']} computed, {c['reused']} from the store, {c['retried']} retried)")
    for r in result.records:
        if r["status"] != "pass":
            why = r["error"] if r["status"] == "error" else "; ".join(r.get("failures") or [])
            click.echo(f"  {r['status']}: {r['label']}: {why[:200]}")
    click.echo(f"summary: {os.path.join(out_dir, 'summary.html')}")
    click.echo(f"junit: {os.path.join(out_dir, 'junit.xml')}")
    if not result.passed:
        sys.exit(1)


@sweep.command("compare")
@click.argument("old", type=click.Path(file_okay=False))
@click.argument("new", type=click.Path(file_okay=False))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the comparison as JSON here.")
@click.option("--all", "all_cells", is_flag=True, help="List every cell's drift (default: the 20 that moved most).")
def sweep_compare(old, new, json_path, all_cells):
    """Sweep OLD against sweep NEW: cells that passed before and fail now (exit 1 when there are any)
    and each cell's metric drift."""
    from .parity.sweep.compare import compare_stores, text
    from .parity.sweep.store import dumps, write_atomic

    _check_report_paths(json=json_path)
    c = compare_stores(old, new)
    click.echo(text(c, all_cells))
    if json_path:
        write_atomic(os.path.abspath(json_path), dumps(c.to_dict()))
        click.echo(f"json: {json_path}")
    if c.regressions:
        sys.exit(1)


@main.command()
@click.option("--out", "out_dir", default="out/demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the converted file and the reports go.")
def demo(out_dir):
    """The main job on the bundled tiny checkpoint: convert, UNet parity (both modes), reports."""
    import os
    from importlib import resources

    from .convert.convert import convert as run_convert
    from .parity.harness import run_parity

    ckpt = resources.files("sdport.fixtures").joinpath("tiny", "sd-tiny-fp16.ckpt")
    os.makedirs(out_dir, exist_ok=True)
    with resources.as_file(ckpt) as ckpt_path:
        h5 = os.path.join(out_dir, "sd-tiny.h5")
        s = run_convert(str(ckpt_path), h5, dtype="fp32", force=True)
        click.echo(f"converted {ckpt_path.name} -> {h5} (fp32): "
                   + ", ".join(f"{k} {v}" for k, v in s.written.items()))
        with _stages("parity unet") as progress:
            result = run_parity("unet", str(ckpt_path), h5=h5, progress=progress)
    paths = {k: os.path.join(out_dir, f"parity-unet.{k}") for k in ("json", "html")}
    paths["junit"] = os.path.join(out_dir, "parity-unet.xml")
    _finish(result, paths["json"], paths["junit"], paths["html"])

if __name__ == "__main__":
    main()
