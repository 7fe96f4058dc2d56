"""The layout's storage: reading the HDF5 file (memory-mapped, checksummed) and refusing hostile ones.

Knows nothing about models beyond the names of the groups that hold them; `convert/writer.py` is the one
writer of the format, `models/load.py` builds models from what this package reads.
"""
