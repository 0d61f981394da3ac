"""The median of per-round ratios with a 95% bootstrap interval (the rounds resampled 10,000
times from `rng`, seeded by the caller so that a run prints the same figures again): whether a
target is met or missed beyond the machine's noise. Used by proxy.sh, ab.sh, swaps.sh,
latency.sh and pooled.py."""

import statistics


def median_interval(ratios, rng):
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(10_000))
    return f"{statistics.median(ratios):.2f} [{boot[249]:.2f}–{boot[9_749]:.2f}]"
