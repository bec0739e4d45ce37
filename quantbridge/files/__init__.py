"""Where and how quantbridge writes: the cache directory, output directories it refuses or swaps,
errno hints and signals (faults).
"""
