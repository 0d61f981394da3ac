#!/usr/bin/env bash
# How long the thread serving traffic waits for the core while large tables are put in force
# back to back, and behind which threads. For each fleet-proxy binary given: 10,001 routes in
# force, wrk (-t1 -c64) on CPU 1, the proxy (one worker) on CPU 0, a loop putting a new
# 10,001-route table through `PUT /routes` 250 ms after the last came into force (on CPU 0 in
# the idle class, as in swaps.sh), and `perf sched record` of CPU 0 for DURATION s. Reports
# every time the traffic thread was taken off the core while it could still run, and which
# threads held the core meanwhile (benches/stalls.py): fleet-proxy's own background threads
# are the `fleet-` ones; the rest (the PUT loop's curl, kernel threads) are the machine's.
#
#   benches/stalls.sh BINARY [BINARY…]          # DURATION=10 ROUTES=10000 PUTS=1
#
# A BINARY named `nginx` runs nginx as the proxy instead (no table, no PUTs): what the machine
# alone does to a proxy's traffic thread. PUTS=0 leaves the loop out for fleet-proxy too.
#
# Needs perf (Debian: linux-perf) with the right to record scheduler events (root, or
# kernel.perf_event_paranoid ≤ -1), nginx, wrk, curl, chrt.
set -euo pipefail
args=(); for bin in "$@"; do args+=("$(realpath "$bin")"); done; set -- "${args[@]}"
cd "$(dirname "$0")/.."
source benches/common.sh

(($#)) || { echo "usage: benches/stalls.sh BINARY [BINARY…]" >&2; exit 2; }
DURATION=${DURATION:-10}
ROUTES=${ROUTES:-10000}
need nginx wrk curl chrt perf python3

BACKEND=$(free_port)
nginx_conf backend "server { listen 127.0.0.1:$BACKEND; location / { return 200 'ok\n'; } }"
start backend taskset -c 1 nginx -c "$WORK/backend/nginx.conf"
wait_port "$BACKEND"
big_table "$BACKEND" "$ROUTES" >"$WORK/big.json"

for bin in "$@"; do
  port=$(free_port); admin=$(free_port)
  if [[ $bin == */nginx ]]; then
    # nginx as the proxy (as in proxy.sh), for the machine's own share of the stalls.
    nginx_proxy_conf proxy "$BACKEND" "listen 127.0.0.1:$port;"
    start proxy taskset -c 0 nginx -c "$WORK/proxy/nginx.conf"
    proxy=$LAST
    wait_port "$port"
    traffic=$(pgrep -P "$proxy" | head -1)
  else
    fleet_conf "$WORK/fleet.yaml" "$port" "$admin" "$BACKEND" "$BACKEND" ""
    start fleet taskset -c 0 "$bin" --config "$WORK/fleet.yaml" --worker-threads 1
    proxy=$LAST; traffic=$LAST
    wait_port "$port" 300
    curl -s -o /dev/null -X PUT --data-binary @"$WORK/big.json" "http://127.0.0.1:$admin/routes"
  fi
  taskset -c 1 wrk -t1 -c64 -d"$((DURATION + 3))s" --latency -H "$COOKIE" \
    "http://127.0.0.1:$port/" >"$WORK/wrk.out" &
  load=$!
  : >"$WORK/puts"
  loop=""
  if [[ $bin != */nginx && ${PUTS:-1} == 1 ]]; then
    (trap 'exit 0' TERM; while :; do
      taskset -c 0 chrt -i 0 curl -s -o /dev/null -w '%{time_total}\n' -X PUT \
        --data-binary @"$WORK/big.json" "http://127.0.0.1:$admin/routes" >>"$WORK/puts"
      sleep 0.25
    done) &
    loop=$!
  fi
  sleep 1
  perf sched record -C 0 -o "$WORK/sched.data" -- sleep "$DURATION" >/dev/null 2>&1
  if [[ -n $loop ]]; then kill "$loop"; wait "$loop" 2>/dev/null || true; fi
  wait "$load"
  echo "$bin: $(wc -l <"$WORK/puts") tables put in force; wrk: $(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out") req/s, p99 $(awk '$1=="99%" {print $2}' "$WORK/wrk.out") (recorded, so slower)"
  python3 benches/stalls.py "$WORK/sched.data" "$traffic"
  kill "$proxy"; wait "$proxy" 2>/dev/null || true
done
