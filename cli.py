"""The `sdport` command line: one click group, thin commands; the work lives in the packages."""
from __future__ import annotations

import json
import sys

import click

from . import __version__
from .models.errors import SdportError

COMPONENT_NAMES = ("unet", "text_model", "vit", "encoder", "decoder")


class _Group(click.Group):
    """User errors become one line on stderr and exit code 2; --debug shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (SdportError, OSError) as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            msg = str(e) if isinstance(e, SdportError) else f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}".lstrip(": ")
            click.echo(f"error: {msg}", err=True)
            ctx.exit(2)


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


@main.command()
@click.argument("file", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(file, as_json):
    """What is inside FILE: a checkpoint (.ckpt/.pt/.bin/.safetensors) or an sdport .h5."""
    from .convert.inspect import inspect as run

    info = run(file)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    if info["kind"] == "sdport-layout":
        click.echo(f"{file}: sdport layout v{info['layout_version']} ({info.get('family')}, {info.get('variant')}), "
                   f"from {info.get('source_file')} [{info.get('source_format')}], dtype policy {info.get('dtype_policy')}")
        for name, c in info["components"].items():
            click.echo(f"  /{name:<11} {c['datasets']:>5} datasets {_human_bytes(c['bytes']):>11}  {c['dtypes']}")
        return
    click.echo(f"{file}: {info['container']} ({info['wrapper']}), {info['tensors']} tensors, "
               f"{_human_bytes(info['bytes'])}, dtypes {info['dtypes']}")
    click.echo(f"  family {info.get('family')}, variant {info.get('variant')}"
               + (f" (UNet in-channels {info['unet_in_channels']})" if "unet_in_channels" in info else "")
               + f", EMA {'present' if info['ema'] else 'absent'}")
    for name, n in info["components"].items():
        click.echo(f"  {name:<11} {n:>5} keys")
    if info.get("error"):
        click.echo(f"  unsupported: {info['error']}")
    if info.get("unknown_keys"):
        click.echo(f"  {len(info['unknown_keys'])} unknown keys, e.g. {info['unknown_keys'][:3]}")


@main.command()
@click.argument("file", type=click.Path(dir_okay=True))
def verify(file):
    """Recompute every checksum of an sdport .h5 file and check it is complete."""
    from .models.layout import LayoutReader, verify as check
    from .models.load import load_model

    problems = check(file)
    if not problems:
        with LayoutReader(file) as r:
            for comp in r.components():
                try:
                    load_model(r, comp, device="meta")
                except SdportError as e:
                    problems.append(str(e))
    if problems:
        click.echo(f"{file}: {len(problems)} problem(s); first: {problems[0]}", err=True)
        for p in problems[1:10]:
            click.echo(f"  {p}", err=True)
        sys.exit(1)
    click.echo(f"{file}: ok")


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
@click.option("--dtype", type=click.Choice(["keep", "fp32", "fp16", "bf16"]), default="keep", show_default=True)
@click.option("--ema", type=click.Choice(["auto", "use", "ignore"]), default="auto", show_default=True,
              help="auto: model.diffusion_model.* as CompVis inference does; use: the EMA copy; ignore: never read it.")
@click.option("--num-heads", type=int, default=None, help="UNet attention heads (not stored in checkpoints).")
@click.option("--strict", is_flag=True, help="Fail on keys that belong to no known component.")
@click.option("--force", is_flag=True, help="Overwrite the destination.")
@click.option("--compress", is_flag=True, help="gzip the datasets (smaller, no memory-mapped loading).")
def convert(src, out, components, dtype, ema, num_heads, strict, force, compress):
    """Convert a CompVis checkpoint (or a CLIP ViT state dict) to the sdport HDF5 layout."""
    from tqdm import tqdm

    from .convert.convert import convert as run

    bar = tqdm(total=None, unit="tensor", desc="converting", disable=None, file=sys.stderr)

    def progress(n):
        bar.update(n - bar.n)

    try:
        s = run(src, out, components=_components_option(components), dtype=dtype, ema=ema, strict=strict,
                force=force, num_heads=num_heads, compression="gzip" if compress else None, progress=progress)
    finally:
        bar.close()
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
    for key, n in list(s.nonfinite.items())[:10]:
        click.echo(f"  warning: {key} holds {n} NaN/Inf value(s)", err=True)
    if s.nonfinite:
        click.echo(f"  warning: {len(s.nonfinite)} tensor(s) hold NaN/Inf values", err=True)


@main.command()
@click.argument("h5", type=click.Path(dir_okay=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="BACK.safetensors (flat) or BACK.ckpt (PyTorch zip).")
@click.option("--flat", is_flag=True, help="For .ckpt: a flat state dict instead of {'state_dict': ...}.")
@click.option("--force", is_flag=True, help="Overwrite the destination.")
def export(h5, out, flat, force):
    """Write an sdport .h5 back under the source key names (CompVis, or the ViT's source format)."""
    from .convert.convert import export as run

    counts = run(h5, out, force=force, wrapper="flat" if flat else None)
    click.echo(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
