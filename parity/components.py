"""How parity runs each component: its inputs, how both sides are called, and how the reference is built.

One entry per native component (models/components.py), extending it with what this floor needs. The
harness asks the entry and never the component's name; adding a component is one class here (plus its
entries on the floors below and a reference builder in parity/reference/).
"""
from __future__ import annotations

import torch

from ..models.components import COMPONENTS, component as native_entry
from ..models.errors import SdportError, cut

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
TEXT_ENCODER = "text_model"  # the component whose output is a denoiser's text context (--prompt)
MAX_INPUT_BATCH = 16  # a dump's inputs: at most this batch and twice the drawn size along each side
CONTEXT_TOKENS = 77  # the text context's length: CLIP's 77 positions


class ParityError(SdportError):
    """Bad input to a parity run: a component the file lacks, an unavailable device, ..."""


def prompts(prompt: str, batch: int) -> list[str]:
    """Batch of texts: the empty (unconditional) prompt first, as classifier-free guidance pairs them."""
    return [prompt] if batch == 1 else [""] + [prompt] * (batch - 1)


def cast_floats(xs, dtype: torch.dtype):
    """Floating tensors to `dtype`; integer tensors (token ids, timesteps) and the rest as they are."""
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in xs)


class Drawer:
    """Draws named inputs from one seeded CPU generator and describes each draw for the report."""

    def __init__(self, seed: int, batch: int):
        self.g = torch.Generator("cpu").manual_seed(seed)
        self.batch = batch
        self.inputs: dict[str, torch.Tensor] = {}
        self.desc = {"seed": seed, "generator": f"torch.Generator('cpu').manual_seed({seed}), draws in this order",
                     "batch": batch, "draws": []}

    def __call__(self, name: str, how: str, t: torch.Tensor) -> torch.Tensor:
        self.inputs[name] = t
        self.desc["draws"].append({"name": name, "how": how, "shape": list(t.shape),
                                   "dtype": str(t.dtype).removeprefix("torch.")})
        return t


class ParityComponent:
    """The defaults: one image-like input [B, C, S, S], called positionally on both sides."""

    name = ""
    # Reference-call argument names a native block takes beyond its first input, by block kind (the
    # mapping table's docstrings fix the signatures: UNet resnet (x, emb), transformer (x, context), ...).
    extra_inputs: dict[str, tuple[str, ...]] = {}
    # Submodules of the reference container the component does not use (left unloaded, then dropped).
    other_half: tuple[str, ...] = ()
    takes_prompt_context = False  # --prompt makes its context with the native text encoder
    # source format -> reference submodules (name prefixes) whose activations are sequence-first
    # [T, B, D] where the native ones are [B, T, D]; the layer map transposes them
    sequence_first: dict[str, tuple[str, ...]] = {}

    @property
    def main_input(self) -> str:
        return native_entry(self.name).inputs[0]

    def default_size(self, cfg) -> int:
        """Spatial side (or token count) of the drawn input."""
        raise NotImplementedError

    def input_shapes(self, cfg, batch: int, side: tuple[int, ...]) -> dict[str, tuple]:
        """Each input's shape at `batch` and spatial size `side` ((H, W), or (L,) for tokens)."""
        raise NotImplementedError

    def side(self, shape: tuple) -> tuple:
        return tuple(shape[2:])

    def draw(self, cfg, d: Drawer, size: int, prompt: str | None, encode_text) -> None:
        raise NotImplementedError

    def check_inputs(self, cfg, shapes: dict[str, tuple], path: str) -> None:
        """Refuse (before reading them) inputs that the model does not take or that are far larger than
        the inputs parity draws: batch <= MAX_INPUT_BATCH, each spatial side <= 2x the drawn size."""
        first = shapes.get(self.main_input, ())
        batch = first[0] if first else 0
        side = self.side(first)
        limit = 2 * self.default_size(cfg)
        if first and (not 1 <= batch <= MAX_INPUT_BATCH or not all(1 <= n <= limit for n in side)):
            raise SdportError(f"{path}: inputs of batch {batch} and size {cut(list(side))} (at most batch "
                              f"{MAX_INPUT_BATCH} and {limit} per side for this {self.name})")
        want = self.input_shapes(cfg, batch, side)
        if set(shapes) != set(want):
            raise SdportError(f"{path}: inputs {cut(sorted(shapes))}; the {self.name} takes {sorted(want)}")
        for name, shape in want.items():
            got = shapes[name]
            free = self.free_dims(name)
            if len(got) != len(shape) or any(g != s for i, (g, s) in enumerate(zip(got, shape)) if i not in free):
                raise SdportError(f"{path}: input {name} has shape {cut(list(got))}, the {self.name} takes {list(shape)}")

    def free_dims(self, name: str) -> tuple[int, ...]:
        """Dimensions of input `name` that may differ from the drawn shape (checked on their own)."""
        return ()

    def check_values(self, cfg, inputs: dict[str, torch.Tensor], path: str) -> None:
        """Refuse input values the model cannot take (after reading them)."""

    def call_native(self, model, inputs: dict, dtype: torch.dtype):
        return model(*cast_floats(tuple(inputs[n] for n in native_entry(self.name).inputs), dtype))

    def call_reference(self, model, inputs: dict, source_format: str):
        return model(inputs[self.main_input])

    # The reference module whose output is what a port returns, where the reference call's own result
    # is something else (None: the call's result, contract_output).
    contract_module: str | None = None

    def contract_output(self, out) -> torch.Tensor:
        """The reference call's result as a port returns it (docs/ports.md: the `torch:` contract)."""
        from .layers import first_tensor
        return first_tensor(out)

    def reference_builder(self, source_format: str):
        """cfg -> the reference model (random weights; the harness assigns the checkpoint's)."""
        raise NotImplementedError

    def reference_plan_options(self, cfg) -> dict:
        """Options for reading the reference's weights as the native side's were read."""
        return {}

    def not_run(self, cfg) -> dict[str, str]:
        """{native submodule: why} for the parts of the table that neither side runs with this config."""
        return {}


class UNet(ParityComponent):
    name = "unet"
    extra_inputs = {"resnet": ("emb",), "transformer": ("context",), "transformer_linear": ("context",),
                    "transformer_block": ("context",),
                    "cross_attention": ("context",)}
    takes_prompt_context = True

    def default_size(self, cfg) -> int:
        return 64 if cfg.model_channels >= 320 else 16  # latents of SD v1 / of the tiny preset

    def input_shapes(self, cfg, batch, side):
        return {"x": (batch, cfg.in_channels, *side), "t": (batch,), "context": (batch, CONTEXT_TOKENS, cfg.context_dim)}

    def free_dims(self, name):
        return (1,) if name == "context" else ()

    def check_inputs(self, cfg, shapes, path):
        super().check_inputs(cfg, shapes, path)
        if not 1 <= shapes["context"][1] <= 2 * CONTEXT_TOKENS:
            raise SdportError(f"{path}: a context of {shapes['context'][1]} tokens (at most {2 * CONTEXT_TOKENS})")

    def draw(self, cfg, d, size, prompt, encode_text):
        b = d.batch
        d("x", "x_T = randn (standard normal)", torch.randn(b, cfg.in_channels, size, size, generator=d.g))
        t = d("t", "randint(1, 1000): one timestep per batch item", torch.randint(1, 1000, (b,), generator=d.g))
        d.desc["timesteps"] = t.tolist()
        if prompt is not None:
            texts = prompts(prompt, b)
            d("context", f"native text encoder on token ids of {texts!r}", encode_text(texts).float().cpu())
            d.desc["prompt"] = prompt
        else:
            d("context", "randn (standard normal)", torch.randn(b, CONTEXT_TOKENS, cfg.context_dim, generator=d.g))

    def call_native(self, model, inputs, dtype):
        return model(*cast_floats((inputs["x"],), dtype), inputs["t"], inputs["context"].to(dtype))

    def call_reference(self, model, inputs, source_format):
        return model(inputs["x"], timesteps=inputs["t"], context=inputs["context"])

    def reference_builder(self, source_format):
        from .reference.unet import build_reference
        return build_reference

    def reference_plan_options(self, cfg):
        # in no shape: the reference takes the native file's head layout
        return {"num_heads": cfg.num_heads, "num_head_channels": cfg.num_head_channels}


class TextModel(ParityComponent):
    name = "text_model"
    # ldm ran OpenCLIP's blocks sequence-first (open_clip 2.0); parity/reference/openclip.py does too
    sequence_first = {"openclip": ("transformer.",)}

    def default_size(self, cfg):
        return cfg.max_positions

    def side(self, shape):
        return tuple(shape[1:])

    def input_shapes(self, cfg, batch, side):
        return {"ids": (batch, *side)}

    def check_inputs(self, cfg, shapes, path):
        super().check_inputs(cfg, shapes, path)
        n = self.side(shapes["ids"])[0]
        if n > cfg.max_positions:
            raise SdportError(f"{path}: {n} token ids; the text encoder has {cfg.max_positions} positions")

    def check_values(self, cfg, inputs, path):
        ids = inputs["ids"]
        if ids.numel() and not (ids.min() >= 0 and ids.max() < cfg.vocab_size):
            raise SdportError(f"{path}: token ids outside 0..{cfg.vocab_size - 1}")

    def draw(self, cfg, d, size, prompt, encode_text):
        from ..models.tokenizer import default_tokenizer
        texts = prompts(prompt if prompt is not None else DEFAULT_PROMPT, d.batch)
        ids = torch.tensor([default_tokenizer()(s, cfg.pad_id) for s in texts])[:, :cfg.max_positions]
        d("ids", f"CLIP tokenizer on {texts!r}, padded with {cfg.pad_id} (no randomness)", ids)
        d.desc["prompt"] = texts[-1]

    def not_run(self, cfg):
        return {f"layers.{i}": f"not run by either side: layer {cfg.layer!r} stops before it (its weights stay "
                               "in the layout so that export gives the checkpoint back)"
                for i in range(cfg.layers_run, cfg.layers)}

    def call_reference(self, model, inputs, source_format):
        if source_format == "openclip":
            return model(inputs["ids"])
        return model(input_ids=inputs["ids"])

    def reference_builder(self, source_format):
        if source_format == "openclip":
            from .reference.openclip import build_text_reference as build_openclip
            return build_openclip
        from .reference.clip import build_text_reference
        return build_text_reference


class Encoder(ParityComponent):
    name = "encoder"
    other_half = ("decoder", "post_quant_conv")

    def default_size(self, cfg):
        return 32 * cfg.downscale  # images of 32 latent pixels

    def input_shapes(self, cfg, batch, side):
        return {"image": (batch, cfg.in_channels, *side)}

    def draw(self, cfg, d, size, prompt, encode_text):
        d("image", "rand * 2 - 1: uniform in [-1, 1)",
          torch.rand(d.batch, cfg.in_channels, size, size, generator=d.g) * 2 - 1)

    def call_reference(self, model, inputs, source_format):
        return model.encode(inputs["image"])

    contract_module = "quant_conv"  # the moments [B, 2 * embed_dim, h, w], before encode's clamp

    def reference_builder(self, source_format):
        from .reference.vae import build_reference
        return build_reference


class Decoder(Encoder):
    name = "decoder"
    contract_module = None
    other_half = ("encoder", "quant_conv")

    def default_size(self, cfg):
        return 32

    def input_shapes(self, cfg, batch, side):
        return {"latent": (batch, cfg.embed_dim, *side)}

    def draw(self, cfg, d, size, prompt, encode_text):
        d("latent", "randn (standard normal)", torch.randn(d.batch, cfg.embed_dim, size, size, generator=d.g))

    def call_reference(self, model, inputs, source_format):
        return model.decode(inputs["latent"])

    def contract_output(self, out):
        return out  # the image


class ViT(ParityComponent):
    name = "vit"

    def default_size(self, cfg):
        return cfg.image_size

    def input_shapes(self, cfg, batch, side):
        return {"pixels": (batch, 3, cfg.image_size, cfg.image_size)}

    def draw(self, cfg, d, size, prompt, encode_text):
        d("pixels", "randn (standard normal; stands for CLIP-normalised pixels)",
          torch.randn(d.batch, 3, size, size, generator=d.g))

    def call_reference(self, model, inputs, source_format):
        if source_format == "hf":
            return model(pixel_values=inputs["pixels"])
        return model(inputs["pixels"])

    def reference_builder(self, source_format):
        if source_format == "hf":
            from .reference.clip import build_vision_reference
            return build_vision_reference
        from .reference.clip import build_openai_vision_reference
        return build_openai_vision_reference


PARITY: dict[str, ParityComponent] = {c.name: c for c in (UNet(), TextModel(), ViT(), Encoder(), Decoder())}
assert tuple(PARITY) == tuple(COMPONENTS)


def entry(name: str) -> ParityComponent:
    native_entry(name)  # the one error for an unknown name
    return PARITY[name]
