#!/usr/bin/env bash
# What a mirrored copy costs the proxy: fleet-proxy's CPU time per request with 10% of
# requests copied to a shadow and without, the two interleaved, and the interrupts each CPU
# took per 1,000 requests (rescheduling IPIs show the shadow being woken on the other core).
#
#   benches/mirror.sh                # ROUNDS=4 DURATION=5
#   SHADOW_PREFIX="chrt -b 0" benches/mirror.sh   # the shadow in SCHED_BATCH: woken without IPI
#
# The proxy is pinned to CPU 0; wrk, the backend and the shadow (two nginx) to CPU 1.
# Needs nginx, wrk (Debian: nginx wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/common.sh

ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-5}
need nginx wrk
build_fleet_proxy

start_backends taskset -c 1

declare -A PORT PID
for mode in off on; do
  port=$(free_port); admin=$(free_port); line=""
  [[ $mode == on ]] && line="mirror: { to: shadow, percent: 10 }"
  fleet_conf "$WORK/fleet-$mode.yaml" "$port" "$admin" "$BACKEND" "$SHADOW" "$line"
  start "fleet-$mode" taskset -c 0 "$TARGET/release/fleet-proxy" --config "$WORK/fleet-$mode.yaml" --worker-threads 1
  PID[$mode]=$LAST; PORT[$mode]=$port
  wait_port "$port" 300
done

WRK=(taskset -c 1 wrk -t1 -c64 -H "$COOKIE")
interrupts() { awk '$1=="RES:"||$1=="CAL:"||$1=="LOC:" {printf "%s %s %s ", $1, $2, $3}' /proc/interrupts; }

echo "mode requests req/s cpu_us_per_req interrupts_per_1000_requests(cpu0/cpu1)"
: >"$WORK/runs"
for round in $(seq "$ROUNDS"); do
  for mode in off on; do
    "${WRK[@]}" -d1s "http://127.0.0.1:${PORT[$mode]}/" >/dev/null
    irq0=$(interrupts); cpu0=$(cpu_ticks "${PID[$mode]}")
    out=$("${WRK[@]}" -d"${DURATION}s" "http://127.0.0.1:${PORT[$mode]}/")
    irq1=$(interrupts); cpu1=$(cpu_ticks "${PID[$mode]}")
    python3 - "$mode" "$out" "$irq0" "$irq1" "$((cpu1 - cpu0))" "$(getconf CLK_TCK)" <<'PY'
import re, sys
mode, out, a, b, ticks, hz = sys.argv[1:]
reqs = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
def parse(t):
    t = t.split()
    return {t[i]: (int(t[i + 1]), int(t[i + 2])) for i in range(0, len(t), 3)}
A, B = parse(a), parse(b)
irq = " ".join(f"{k[:-1]} {(B[k][0] - A[k][0]) * 1e3 / reqs:.1f}/{(B[k][1] - A[k][1]) * 1e3 / reqs:.1f}" for k in A)
print(f"{mode} {reqs} {rps:.0f} {int(ticks) * 1e6 / int(hz) / reqs:.2f} {irq}")
PY
  done
done | tee "$WORK/runs"

python3 - "$WORK/runs" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
off = [r for r in rows if r[0] == "off"]
on = [r for r in rows if r[0] == "on"]
rps = [float(b[2]) / float(a[2]) for a, b in zip(off, on)]
cpu = [float(b[3]) / float(a[3]) for a, b in zip(off, on)]
print(f"mirror on / off, median of {len(rps)} rounds: req/s {statistics.median(rps):.2f} "
      f"(per round {', '.join(f'{x:.2f}' for x in rps)}), CPU per request {statistics.median(cpu):.2f} "
      f"(per round {', '.join(f'{x:.2f}' for x in cpu)})")
PY
