"""CPU tuning of the native models: oneDNN-packed weights and the AVX512-BF16 attention kernel.

Both are speed only: a model computes the same values without them (tests compare against plain torch).
"""
