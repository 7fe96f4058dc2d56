"""sdport: convert CompVis Stable Diffusion checkpoints to a documented HDF5 layout, run a native
reimplementation from it, and prove layer by layer that it computes what the original computes."""

__version__ = "0.1.0"
