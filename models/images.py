"""PNG in and out for the pipelines: RGB images as [-1, 1] tensors, repaint masks, text chunks.

Pixel conventions follow CompVis' scripts: an image enters as 2 * (uint8 / 255) - 1 and leaves as
clamp((x + 1) / 2, 0, 1) * 255, truncated to uint8. Images are never resized here: a size that does
not fit is the caller's error to report.

Uses Pillow (a declared dependency of sdport) besides torch and numpy.
"""
from __future__ import annotations

import os
import stat

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import BadFile, SdportError, cut

GREEN = (0, 255, 0)  # pure green marks the region to repaint in an init image


MAX_PIXELS = 4096 * 4096  # an init image or mask larger than this is refused before it is decoded


def _open(path) -> Image.Image:
    """Image.open on a regular file only (a FIFO would block), its size checked before decoding."""
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise BadFile(f"{path}: not a regular file (a pipe, socket or device)")
    im = Image.open(path)
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise BadFile(f"{path}: a {w}x{h} image (at most {MAX_PIXELS} pixels are read)")
    return im


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 [H, W, 3] (alpha dropped, palette and grey expanded)."""
    try:
        with _open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise BadFile(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
        raise BadFile(f"{path}: not a readable image ({cut(e, 120)})") from None


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1], as ldm's img2img load_img."""
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0)  # [H, W, 3]
    return 2.0 * x.permute(2, 0, 1)[None].contiguous() - 1.0  # [1, 3, H, W]


def green_mask(rgb: np.ndarray) -> torch.Tensor:
    """Pixels that are exactly (0, 255, 0) -> float32 [1, 1, H, W], 1 = repaint."""
    hit = np.all(rgb == np.array(GREEN, dtype=np.uint8), axis=-1)  # [H, W]
    return torch.from_numpy(hit.astype(np.float32))[None, None]


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """A mask image -> float32 [1, 1, H, W], 1 = repaint: grey level >= 128 (white) repaints, as the
    SD inpainting scripts threshold at 0.5."""
    try:
        with _open(path) as im:
            grey = np.asarray(im.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise BadFile(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
        raise BadFile(f"{path}: not a readable image ({cut(e, 120)})") from None
    return torch.from_numpy((grey >= 128).astype(np.float32))[None, None]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Decoder output [1, 3, H, W] (about [-1, 1]) -> uint8 [H, W, 3], as CompVis' txt2img writes it."""
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"expected one RGB image [1, 3, H, W], got {list(image.shape)}")
    x = torch.clamp((image.detach().float().cpu() + 1.0) / 2.0, min=0.0, max=1.0)
    return (255.0 * x[0].permute(1, 2, 0).numpy()).astype(np.uint8)  # [H, W, 3], truncated like ldm


def write_png(image: torch.Tensor, path: str | os.PathLike, text: dict[str, str] | None = None) -> None:
    """Write the image with `text` as tEXt/iTXt chunks; goes through PATH.partial so a crash leaves no PNG."""
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_itxt(k, str(v))  # iTXt: UTF-8, so any prompt survives
    path = os.fspath(path)
    partial = path + ".partial"
    try:
        Image.fromarray(to_uint8(image), "RGB").save(partial, format="PNG", pnginfo=info)
        os.replace(partial, path)
    except OSError as e:
        if os.path.exists(partial):
            os.remove(partial)
        raise SdportError(f"{path}: cannot write ({e.strerror or e})") from None


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG (what write_png stored)."""
    with Image.open(path) as im:
        im.load()
        return dict(getattr(im, "text", {}))
