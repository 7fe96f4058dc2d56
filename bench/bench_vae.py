"""Benchmark the VAE decoder (64x64 latent -> 512x512 image): ldm, diffusers and sdport.

    python bench/bench_vae.py [--size full|tiny] [--dtype fp32|fp16|bf16] [--device cpu|cuda] [--json OUT] [--runs N]

Each implementation runs in its own process (its own peak RSS); timed calls alternate between them.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from component import run  # noqa: E402

if __name__ == "__main__":
    run("decoder")
