"""How long traffic waited behind other threads, read from `perf sched record` of the proxy's
core: each time the thread serving traffic was taken off the core while it could still run
(switched out in state R), until it ran again, and which threads held the core meanwhile.

    python3 benches/stalls.py perf.data TRAFFIC_TID

Prints, for each thread name (numbers dropped, fleet-proxy's background threads by their
`fleet-` names), how many such turns it took, their total, the longest, and how many lasted
over 0.5 ms and over 1 ms."""
import collections
import re
import subprocess
import sys

path, traffic = sys.argv[1], sys.argv[2]
out = subprocess.run(["perf", "sched", "timehist", "--state", "-i", path],
                     capture_output=True, text=True, check=True).stdout.splitlines()[3:]
# time (s), [cpu], name[tid/pid], wait time, sch delay, run time (ms), state at switch-out
ROW = re.compile(r"\s*([\d.]+)\s+\[\d+\]\s+(\S.*?)\s+([\d.]+)\s+[\d.]+\s+([\d.]+)\s+(\S+)\s*$")
# Switched out while it could still run: preempted. perf 6.1 prints R for that (the traffic
# thread never yields); some versions mark it R+.
RUNNABLE = {"R", "R+"}
preempted = False  # whether the traffic thread is waiting for the core now
turns = collections.defaultdict(list)
stalls = []  # each wait of the preempted traffic thread, from its own "wait time"
for line in out:
    m = ROW.match(line)
    if not m:
        continue
    name, wait_ms, run_ms, state = m[2], float(m[3]), float(m[4]), m[5]
    tid = re.search(r"\[(\d+)(?:/\d+)?\]$", name)
    if tid and tid[1] == traffic:
        if preempted:
            stalls.append(wait_ms)
        preempted = state in RUNNABLE
    elif preempted:
        turns[re.sub(r"\[.*$", "", name)].append(run_ms)
print(f"  traffic thread preempted {len(stalls)} times, {sum(stalls):.1f} ms in all, "
      f"longest {max(stalls, default=0):.2f} ms")
for name, rs in sorted(turns.items(), key=lambda kv: -sum(kv[1]))[:8]:
    print(f"  {name:18} {len(rs):4} turns, {sum(rs):6.1f} ms, longest {max(rs):5.2f} ms, "
          f"> 0.5 ms {sum(r > 0.5 for r in rs):3}, > 1 ms {sum(r > 1 for r in rs):3}")
