#!/usr/bin/env bash
# What a fresh fleet-proxy pays for memory it has not used before. For each of PROCESSES fresh
# processes, started after PAUSE seconds of quiet: the `build_ms` of its first four `PUT`s of
# a 10,001-route table; then, in another fresh process with the 20-route table of proxy.sh and
# after a 5 s wrk run, how long a burst of IDLE connections opened at once takes to be
# answered, and the RSS each second for four seconds after.
#
#   benches/cold.sh [BINARY]          # PROCESSES=3 PAUSE=15 IDLE=10000
#
# Needs nginx, wrk, python3, curl (Debian: nginx wrk python3 curl).
set -euo pipefail
# A binary named relative to where the script was started from, before moving to the repository.
if [[ $# -gt 0 ]]; then set -- "$(realpath "$1")"; fi
cd "$(dirname "$0")/.."
source benches/common.sh

PROCESSES=${PROCESSES:-3}
PAUSE=${PAUSE:-15}
IDLE=${IDLE:-10000}
need nginx wrk python3 curl
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ $# -eq 0 ]]; then build_fleet_proxy; fleet_binary; fi
BIN=${1:-$FLEET}

start_backends taskset -c 1
big_table "$BACKEND" >"$WORK/big.json"
idle_client "$WORK/burst.py"

for n in $(seq "$PROCESSES"); do
  sleep "$PAUSE"
  port=$(free_port); admin=$(free_port)
  fleet_conf "$WORK/fleet.yaml" "$port" "$admin" "$BACKEND" "$SHADOW" ""
  start "fleet$n" taskset -c 0 "$BIN" --config "$WORK/fleet.yaml" --worker-threads 1; pid=$LAST
  wait_port "$port"; wait_port "$admin"
  builds=""
  for _ in 1 2 3 4; do
    builds+="$(taskset -c 1 curl -s -X PUT --data-binary @"$WORK/big.json" "http://127.0.0.1:$admin/routes" |
      build_ms) "
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
  # The burst in a process of its own, with the 20-route table: the RSS is proxy.sh's.
  start "burst$n" taskset -c 0 "$BIN" --config "$WORK/fleet.yaml" --worker-threads 1; pid=$LAST
  wait_port "$port"
  taskset -c 1 wrk -t1 -c128 -d5s -H "$COOKIE" "http://127.0.0.1:$port/" >/dev/null
  rm -f "$WORK/ready"
  taskset -c 1 python3 "$WORK/burst.py" "$port" "$IDLE" "$WORK/ready" &
  client=$!
  PIDS+=("$client")
  for _ in $(seq 1200); do [[ -s "$WORK/ready" ]] && break; sleep 0.1; done
  rss=""
  for _ in 1 2 3 4; do sleep 1; rss+="$(awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status") "; done
  echo "process $n: build_ms of the first four PUTs: ${builds}; $IDLE connections answered in $(cat "$WORK/ready" 2>/dev/null || echo '>120') s; RSS 1 to 4 s later: ${rss}MiB"
  kill "$client" "$pid"; wait "$client" "$pid" 2>/dev/null || true
done
