"""The original code, built for a given native config: ldm's UNet and VAE, transformers' CLIP towers and
open_clip's OpenAI ViT. The only place that imports the reference packages; parity builds the reference
side from here, and fixtures/ builds its random-weight checkpoints with the same builders."""
