#!/usr/bin/env python3
"""The per-round ratios of several `benches/proxy.sh` runs taken together: their median and a
95% bootstrap interval (10,000 resamples, seeded), as proxy.sh prints for one run. Rounds of
runs made minutes apart on the same machine are alike, and more of them narrow the interval.

    benches/proxy.sh > run1.log 2>&1; benches/proxy.sh > run2.log 2>&1
    benches/pooled.py run1.log run2.log
"""
import random
import sys

from interval import median_interval


def rounds(path):
    """Each `round N (...): name rps p50 p99 cpu shadow steal | ...` line, by proxy name."""
    for line in open(path):
        if line.startswith("round "):
            fields = (seg.split() for seg in line.split(":", 1)[1].split("|"))
            yield {f[0]: [float(x) for x in f[1:]] for f in fields}


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    all_rounds = [r for path in sys.argv[1:] for r in rounds(path)]
    print(f"{len(all_rounds)} rounds from {len(sys.argv) - 1} runs")
    print("| median of per-round ratios [95% interval] | req/s | p99 | CPU/req |")
    print("|---|---:|---:|---:|")
    for label, a, b in [("fleet-proxy / nginx", "fleet", "nginx"), ("mirror on / off", "mirror", "fleet")]:
        ratios = ([r[a][i] / r[b][i] for r in all_rounds] for i in (0, 2, 3))
        cols = [median_interval(r, random.Random(1)) for r in ratios]
        print(f"| {label} | {' | '.join(cols)} |")


if __name__ == "__main__":
    main()
