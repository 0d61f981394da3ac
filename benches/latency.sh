#!/usr/bin/env bash
# Latency at a set rate: fleet-proxy against nginx, one worker thread each, the same backend,
# the same requests offered at the same pace. Where proxy.sh drives each proxy as hard as it
# goes (wrk keeps CONNS requests in flight, so its p99 is mostly the queue of a saturated
# core), this offers a fixed number of requests a second, at LOADS percent of what nginx
# serves flat out, and reports p50, p99 and p99.9 at each: the latency a service sees when
# its proxy is busy but not overrun.
#
#   benches/latency.sh                          # defaults below
#   ROUNDS=10 LOADS="30 45" benches/latency.sh
#
# The load generator is oha (crates.io; the version below, installed with cargo into
# $TARGET/oha unless that version is on PATH), run with --latency-correction: a request's
# latency counts from when oha's pacer handed it out (at or after it was due: the pacer runs on
# tokio's 1 ms timer, so requests leave in bursts of a millisecond's worth), not from when a
# connection came free, so a stall of the proxy is not hidden by the requests it held back
# ("coordinated omission"; wrk cannot pace, and h2load's --rps times from the send). A delay of
# oha's own thread before it hands a request out is not counted. A run in which fewer requests
# were made than offered is flagged: oha drops those still queued at the end.
# Pinning, interleaving and the bootstrap interval are as in proxy.sh: proxies on CPU 0, oha
# and the backend on CPU 1, each round starting with a different proxy.
#
# SCHED=fifo (the default) runs the proxies, the backends and oha in the real-time FIFO class
# once nginx's capacity is known, so that none of them loses its core to a thread of the normal
# class while it has work: on this machine a kernel thread (kdamond, DAMON's, free to run on
# either core) takes 1-4 ms turns on the proxies' core some twenty times in ten seconds
# (stalls.sh). At the default loads the proxies' core stays under about 70% busy, so the
# kernel's 95% cap on real-time threads does not bind, and both proxies are treated alike.
# SCHED=other keeps the normal class and the machine's stalls in the figures.
#
# Needs two CPUs, nginx, wrk, python3, procps, util-linux (Debian) and cargo.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}       # seconds per oha run
CONNS=${CONNS:-64}            # connections oha keeps open
ROUNDS=${ROUNDS:-5}           # interleaved runs per proxy and load
LOADS=${LOADS:-"20 40 50"}    # offered load, percent of what nginx serves flat out
SCHED=${SCHED:-fifo}          # fifo or other: see above
OHA_VERSION=1.16.0

source benches/common.sh
need nginx wrk python3 pgrep taskset chrt
build_fleet_proxy
fleet_binary

OHA=$(command -v oha || true)
if [[ -z "$OHA" || "$("$OHA" --version)" != "oha $OHA_VERSION" ]]; then OHA="$TARGET/oha/bin/oha"; fi
if [[ ! -x "$OHA" ]]; then
  echo "installing oha $OHA_VERSION into $TARGET/oha" >&2
  cargo install oha --locked --version "$OHA_VERSION" --root "$TARGET/oha" >&2
fi

# The proxies' core and the load core are what every figure is read against: no run without.
(( $(nproc) >= 2 )) || { echo "latency.sh needs two CPUs, one for the proxies and one for the load" >&2; exit 1; }
PROXY_CPU=(taskset -c 0); LOAD_CPU=(taskset -c 1)

start_backends "${LOAD_CPU[@]}"
NGINX=$(free_port)
nginx_proxy_conf proxy "$BACKEND" "listen 127.0.0.1:$NGINX;"
start nginx "${PROXY_CPU[@]}" nginx -c "$WORK/proxy/nginx.conf"; NGINX_PID=$LAST
FLEET_PORT=$(free_port); FLEET_ADMIN=$(free_port)
fleet_conf "$WORK/fleet.yaml" "$FLEET_PORT" "$FLEET_ADMIN" "$BACKEND" "$SHADOW" ""
start fleet "${PROXY_CPU[@]}" "$FLEET" --config "$WORK/fleet.yaml" --worker-threads 1; FLEET_PID=$LAST
wait_port "$NGINX"; wait_port "$FLEET_PORT"

# What nginx serves flat out: the median of three wrk runs, as proxy.sh drives it.
WRK=("${LOAD_CPU[@]}" wrk -t1 -c"$CONNS" -H "$COOKIE" -H 'User-Agent: bench')
"${WRK[@]}" -d1s "http://127.0.0.1:$NGINX/" >/dev/null
MAX=$(for _ in 1 2 3; do "${WRK[@]}" -d3s "http://127.0.0.1:$NGINX/" | awk '/Requests\/sec/ {print $2}'; done |
  sort -n | sed -n 2p)

# From here on, the proxies, the backends (every thread of each process) and oha run FIFO.
OHA_SCHED=()
if [[ "$SCHED" == fifo ]]; then
  for pid in "${PIDS[@]}"; do
    children=$(pgrep -P "$pid" || true)
    # An nginx master's worker does the work: it must be found, or the two proxies differ.
    if [[ -z "$children" ]] && grep -q nginx "/proc/$pid/comm"; then
      echo "no worker found under nginx $pid" >&2; exit 1
    fi
    for p in "$pid" $children; do chrt -a -f -p 1 "$p" >/dev/null; done
  done
  OHA_SCHED=(chrt -f 1)
fi

# Jiffies of CPUs 0 and 1 from /proc/stat, each as "busy stolen all": stolen is the time the
# hypervisor gave the CPU to another tenant.
jiffies() { awk '/^cpu[01] / { printf "%d %d %d ", $2 + $3 + $4 + $7 + $8, $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }

# One paced run: prints "p50_ms p99_ms p99.9_ms made_rps failed busy% steal%" for the
# proxies' core, then busy% and steal% of the load core. Requests in flight at the end are
# waited for (-w), so none is cut off and counted as failed; made_rps is the requests made
# over DURATION, and a run that made under 98% of those offered is flagged on stderr.
measure() { # port, requests per second
  local before after
  before=$(jiffies)
  "${LOAD_CPU[@]}" "${OHA_SCHED[@]}" "$OHA" -z "${DURATION}s" -w -c "$CONNS" -q "$2" --latency-correction --no-tui \
    --worker-threads 1 --output-format json -H "$COOKIE" -H 'User-Agent: bench' \
    "http://127.0.0.1:$1/" >"$WORK/oha.json"
  after=$(jiffies)
  python3 - "$WORK/oha.json" "$before" "$after" "$2" "$DURATION" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
p = r["latencyPercentiles"]
answered = sum(r["statusCodeDistribution"].values())
ok = sum(n for code, n in r["statusCodeDistribution"].items() if code.startswith("2"))
made = answered + sum(r["errorDistribution"].values())
if not ok:
    sys.exit("no request succeeded")
made_rps, offered = made / float(sys.argv[5]), float(sys.argv[4])
if made_rps < 0.98 * offered:
    print(f"warning: {made_rps:.0f} req/s made of {offered:.0f} offered: the load core fell behind", file=sys.stderr)
b, a = list(map(int, sys.argv[2].split())), list(map(int, sys.argv[3].split()))
share = lambda i, c: f"{100 * (a[c + i] - b[c + i]) / max(1, a[c + 2] - b[c + 2]):.1f}"
cores = [share(i, c) for c in (0, 3) for i in (0, 1)]
print(f'{p["p50"] * 1e3:.3f} {p["p99"] * 1e3:.3f} {p["p99.9"] * 1e3:.3f} {made_rps:.0f} {made - ok} ' + " ".join(cores))
EOF
}

echo "# $(date -u +%FT%TZ) $(nproc) CPUs, $(uname -r); oha $("$OHA" --version | awk '{print $2}') -c$CONNS -z${DURATION}s --latency-correction, $ROUNDS rounds; nginx flat out: $MAX req/s (wrk -c$CONNS); scheduling class: $SCHED" >&2
NAMES=(nginx fleet)
declare -A PORT_OF=([nginx]=$NGINX [fleet]=$FLEET_PORT)
for round in $(seq "$ROUNDS"); do
  for load in $LOADS; do
    rate=$(awk -v m="$MAX" -v l="$load" 'BEGIN { printf "%d", m * l / 100 }')
    for i in "${!NAMES[@]}"; do
      name=${NAMES[$(((i + round - 1) % ${#NAMES[@]}))]}
      measure "${PORT_OF[$name]}" "$rate" >>"$WORK/$name.$load.runs"
    done
    echo "round $round, $load% ($rate req/s; p50 p99 p99.9 ms, req/s, failed; busy and steal %: proxy core, load core): nginx $(tail -1 "$WORK/nginx.$load.runs") | fleet $(tail -1 "$WORK/fleet.$load.runs")" >&2
  done
done

echo
echo "| offered | proxy | p50 ms | p99 ms | p99.9 ms | made req/s | failed |"
echo "|---|---|---:|---:|---:|---:|---:|"
for load in $LOADS; do
  rate=$(awk -v m="$MAX" -v l="$load" 'BEGIN { printf "%d", m * l / 100 }')
  for name in "${NAMES[@]}"; do
    python3 - "$WORK/$name.$load.runs" "$load% ($rate req/s)" "$name" <<'EOF'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
cols = [statistics.median(c) for c in zip(*rows)]
failed = int(sum(r[4] for r in rows))
name = "fleet-proxy" if sys.argv[3] == "fleet" else sys.argv[3]
print(f"| {sys.argv[2]} | {name} | {cols[0]:.3f} | {cols[1]:.3f} | {cols[2]:.3f} | {cols[3]:.0f} | {failed} |")
EOF
  done
done
echo
echo "| offered | fleet-proxy / nginx: p50 | p99 | p99.9 |"
echo "|---|---:|---:|---:|"
for load in $LOADS; do
  PYTHONPATH=benches python3 - "$WORK/fleet.$load.runs" "$WORK/nginx.$load.runs" "$load%" <<'EOF'
import random, sys
from interval import median_interval
fleet = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
nginx = [list(map(float, l.split())) for l in open(sys.argv[2]) if l.strip()]
rng = random.Random(1)
cells = [median_interval([f[c] / n[c] for f, n in zip(fleet, nginx)], rng) for c in range(3)]
print(f"| {sys.argv[3]} | " + " | ".join(cells) + " |")
EOF
done
echo
echo "Ratios are the median of the per-round ratios with a 95% bootstrap interval."
