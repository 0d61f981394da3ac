#!/usr/bin/env bash
# What a mirrored copy costs the proxy: fleet-proxy's requests/s and CPU time per request with
# 10% of requests copied to a shadow and without, interleaved; how many copies went out and
# how many were shed; and, counted by perf where it may (they repeat where the clock does
# not), the proxy's system calls per request and the times the shadow was woken per copy.
#
#   benches/mirror.sh                # ROUNDS=4 DURATION=5 MODES="off http1 h2c"
#   MODES="off h2c h2c-unbatched" benches/mirror.sh
#   SHADOW_PREFIX="chrt -b 0" benches/mirror.sh   # the shadow in SCHED_BATCH: woken without IPI
#
# The proxy is pinned to CPU 0; wrk, the backend and the shadow (two nginx) to CPU 1.
# Needs nginx, wrk, curl, perf (Debian: nginx wrk curl linux-perf); without the right to
# count tracepoints (perf_event_paranoid) the last columns are left empty.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/common.sh

ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-5}
need nginx wrk curl
build_fleet_proxy
fleet_binary
MIRROR="mirror: { to: shadow, percent: 10 }"

start_backends taskset -c 1

# off: no mirroring; http1: copies to the shadow over HTTP/1.1, one connection per copy in
# flight; h2c: over HTTP/2, every copy a stream on one connection. Either with `-unbatched`:
# each copy sent as it comes (`batch_window: 0s`) rather than with those of the next 2 ms.
read -ra MODES <<<"${MODES:-off http1 h2c}"
declare -A PORT PID ADMIN
for mode in "${MODES[@]}"; do
  port=$(free_port); admin=$(free_port); conf="$WORK/fleet-$mode.yaml"
  case ${mode%-unbatched} in
    off) fleet_conf "$conf" "$port" "$admin" "$BACKEND" "$SHADOW" "" ;;
    http1) fleet_conf "$conf" "$port" "$admin" "$BACKEND" "$SHADOW" "$MIRROR" http1 ;;
    h2c) fleet_conf "$conf" "$port" "$admin" "$BACKEND" "$SHADOW_H2C" "$MIRROR" h2c ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac
  [[ $mode == *-unbatched ]] && echo "mirror: { batch_window: 0s }" >>"$conf"
  start "fleet-$mode" taskset -c 0 "$FLEET" --config "$WORK/fleet-$mode.yaml" --worker-threads 1
  PID[$mode]=$LAST; PORT[$mode]=$port; ADMIN[$mode]=$admin
  wait_port "$port" 300
done

WRK=(taskset -c 1 wrk -t1 -c64 -H "$COOKIE")
SHADOW_WORKER=$(pgrep -P "$SHADOW_PID" nginx | head -1)
# Copies sent (answered or failed) and shed so far, from the proxy's /stats.
copies() {
  curl -s "http://127.0.0.1:$1/stats" | python3 -c '
import json, sys
s = json.load(sys.stdin)
sent = sum(x["requests"] for x in s["series"] if x["source"] == "mirror")
print(sent, s["proxy"]["mirror_shed"])'
}
# Counts system calls and context switches of a process for as long as the load runs.
count() { # pid, output file
  if command -v perf >/dev/null; then
    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$1" -o "$2" -- sleep "$DURATION" 2>/dev/null &
  fi
}

echo "mode round req/s cpu_us_per_req copies_sent/shed_per_1000_requests proxy_syscalls_per_req shadow_wakeups_per_copy"
: >"$WORK/runs"
for round in $(seq "$ROUNDS"); do
  # Each round starts one mode further along, so that none always follows the same other.
  for i in "${!MODES[@]}"; do
    mode=${MODES[$(((i + round) % ${#MODES[@]}))]}
    "${WRK[@]}" -d1s "http://127.0.0.1:${PORT[$mode]}/" >/dev/null
    copies0=$(copies "${ADMIN[$mode]}"); cpu0=$(cpu_ticks "${PID[$mode]}")
    rm -f "$WORK/proxy.perf" "$WORK/shadow.perf"
    count "${PID[$mode]}" "$WORK/proxy.perf"; count "$SHADOW_WORKER" "$WORK/shadow.perf"
    out=$("${WRK[@]}" -d"${DURATION}s" "http://127.0.0.1:${PORT[$mode]}/")
    cpu1=$(cpu_ticks "${PID[$mode]}"); wait
    # Copies still queued when the load stops go out after it: counted a moment later.
    sleep 1; copies1=$(copies "${ADMIN[$mode]}")
    python3 - "$mode" "$round" "$out" "$((cpu1 - cpu0))" "$(getconf CLK_TCK)" "$copies0" "$copies1" \
      "$WORK/proxy.perf" "$WORK/shadow.perf" <<'PY'
import os, re, sys
mode, round, out, ticks, hz, c0, c1, proxy, shadow = sys.argv[1:]
reqs = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
(s0, d0), (s1, d1) = (map(int, c.split()) for c in (c0, c1))
def counted(path):
    found = {}
    for line in open(path) if os.path.exists(path) else []:
        f = line.strip().split(",")
        if len(f) > 2 and f[0].isdigit():
            found[f[2].split(":")[-1]] = int(f[0])
    return found
p, s = counted(proxy), counted(shadow)
calls = f"{p['sys_enter'] / reqs:.3f}" if "sys_enter" in p else "-"
wakeups = f"{s['context-switches'] / (s1 - s0):.2f}" if "context-switches" in s and s1 > s0 else "-"
print(f"{mode} {round} {rps:.0f} {int(ticks) * 1e6 / int(hz) / reqs:.2f} "
      f"{(s1 - s0) * 1e3 / reqs:.0f}/{(d1 - d0) * 1e3 / reqs:.0f} {calls} {wakeups}")
PY
  done
done | tee "$WORK/runs"

python3 - "$WORK/runs" <<'PY'
import statistics, sys
runs = {(r[0], r[1]): r for r in (l.split() for l in open(sys.argv[1]))}
rounds = sorted({k[1] for k in runs}, key=int)
def med(mode, col):
    xs = [float(runs[mode, n][col]) for n in rounds if runs[mode, n][col] != "-"]
    return f"{statistics.median(xs):.3g}" if xs else "-"
for mode in sorted({k[0] for k in runs}):
    line = f"{mode}: system calls per request {med(mode, 5)}, shadow woken per copy {med(mode, 6)}"
    if mode != "off":
        rps = [float(runs[mode, n][2]) / float(runs["off", n][2]) for n in rounds]
        cpu = [float(runs[mode, n][3]) / float(runs["off", n][3]) for n in rounds]
        line += (f"; against off, median of {len(rps)} rounds: req/s {statistics.median(rps):.2f} "
                 f"(per round {', '.join(f'{x:.2f}' for x in rps)}), CPU per request "
                 f"{statistics.median(cpu):.2f} (per round {', '.join(f'{x:.2f}' for x in cpu)})")
    print(line)
PY
