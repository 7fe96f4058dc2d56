"""sdport: convert CompVis Stable Diffusion checkpoints to a documented HDF5 layout, run a native
reimplementation from it, and prove layer by layer that it computes what the original computes."""

import os as _os

__version__ = "0.1.0"

# Transparent huge pages for torch's CPU allocations of 2 MiB or more: fewer page faults, and a lower
# peak within a parity pass (models/memory.py). torch reads this once, at its first allocation, so it is
# set here, before anything in the package imports torch; a value the user set (0 turns it off) is kept.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
del _os
