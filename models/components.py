"""The components of the native side, as values: what the layout stores and `load_model` builds.

Each entry names its layout group, its config and model classes, the inputs its forward takes (in
call order, under the names the parity inputs and activation dumps use), and how it runs on a CPU.
This is the one list of component names; `convert/` and `parity/` extend these entries with what
their floors need (convert/sources.py, parity/components.py), and nothing dispatches on a name.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import SdportError


@dataclass(frozen=True)
class Component:
    name: str  # the layout group, and the name on the command line
    module: str  # the models/ module that defines it; imported on first use, so that listing the
    classes: tuple[str, str]  # names (the CLI's choices) needs no torch: (config class, model class)
    inputs: tuple[str, ...]  # the forward's inputs, in call order
    channels_last: bool = False  # activations run channels-last (its 4-D weights are stored so once loaded)
    packed: bool = False  # Conv2d/Linear weights reordered into oneDNN's layout on a CPU (models/cpu/pack.py)

    @property
    def config(self) -> type:
        """The frozen config dataclass."""
        return getattr(importlib.import_module(f".{self.module}", __package__), self.classes[0])

    @property
    def model(self) -> type:
        """The nn.Module, built from the config alone."""
        return getattr(importlib.import_module(f".{self.module}", __package__), self.classes[1])


# In the order the layout lists them. Only the UNet runs channels-last and packed: a packed convolution
# returns channels-last output, and the VAE runs NCHW for its GroupNorms' accuracy at 512x512.
COMPONENTS: dict[str, Component] = {c.name: c for c in (
    Component("unet", "unet", ("UNetConfig", "UNet"), ("x", "t", "context"), channels_last=True, packed=True),
    Component("text_model", "clip", ("TextConfig", "TextEncoder"), ("ids",)),
    Component("vit", "clip", ("VisionConfig", "VisionEncoder"), ("pixels",)),
    Component("encoder", "vae", ("VAEConfig", "VAEEncoder"), ("image",)),
    Component("decoder", "vae", ("VAEConfig", "VAEDecoder"), ("latent",)),
)}
NAMES = tuple(COMPONENTS)


def component(name: str) -> Component:
    """The entry for `name` (SdportError naming the known ones otherwise)."""
    try:
        return COMPONENTS[name]
    except (KeyError, TypeError):
        raise SdportError(f"unknown component {str(name)[:40]!r}; choose from {', '.join(NAMES)}") from None
