"""Parity sweeps: a grid of parity runs from a TOML spec, on a local process pool or a Ray cluster
(docs/sweeps.md). spec -> cells -> executors (cells.py runs one in a worker) -> store -> summary."""
