"""The benchmark suite behind ``make bench``: figures printed side by side with limits and peers.

Nothing here is collected by pytest (no ``test_*`` modules) and nothing asserts a speed: the
figures are printed, and ``docs/performance.md`` records a run.
"""
