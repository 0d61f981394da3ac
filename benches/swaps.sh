#!/usr/bin/env bash
# Is a table swap visible to traffic? For each fleet-proxy binary given, with a 10,001-route
# table in force: wrk without swaps, then wrk while a loop puts a new 10,001-route table through
# `PUT /routes` 250 ms after the last one came into force. Binaries and the two runs alternate
# in every round, so that the machine's drifting load falls on all alike.
#
#   benches/swaps.sh BINARY [BINARY…]          # ROUNDS=4 DURATION=4
#
# Prints each run (req/s, p50, p99, tables put in force so far) and, per binary, the median of
# the per-round ratios with swaps / without, and how long the PUTs took.
# Needs nginx, wrk, python3, curl (Debian: nginx wrk python3 curl).
set -euo pipefail
# Binaries named relative to where the script was started from, before moving to the repository.
args=(); for bin in "$@"; do args+=("$(realpath "$bin")"); done; set -- "${args[@]}"
cd "$(dirname "$0")/.."
source benches/common.sh

(($#)) || { echo "usage: benches/swaps.sh BINARY [BINARY…]" >&2; exit 2; }
ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-4}
need nginx wrk python3 curl

BACKEND=$(free_port)
nginx_conf backend "server { listen 127.0.0.1:$BACKEND; location / { return 200 'ok\n'; } }"
start backend taskset -c 1 nginx -c "$WORK/backend/nginx.conf"
wait_port "$BACKEND"
big_table "$BACKEND" >"$WORK/big.json"

# The proxies on CPU 0; wrk, the backend and curl on CPU 1.
PORTS=(); ADMINS=()
for n in $(seq 0 $(($# - 1))); do
  port=$(free_port); admin=$(free_port)
  fleet_conf "$WORK/fleet$n.yaml" "$port" "$admin" "$BACKEND" "$BACKEND" ""
  start "fleet$n" taskset -c 0 "${@:$((n + 1)):1}" --config "$WORK/fleet$n.yaml" --worker-threads 1
  PORTS+=("$port"); ADMINS+=("$admin")
done
for n in "${!PORTS[@]}"; do
  wait_port "${PORTS[$n]}" 300
  curl -s -o /dev/null -X PUT --data-binary @"$WORK/big.json" "http://127.0.0.1:${ADMINS[$n]}/routes"
  : >"$WORK/put.$n"
done

WRK=(taskset -c 1 wrk -t1 -c64 --latency -H "$COOKIE")
# One run: prints "rps p99_ms"; with swaps when $2 is 1.
run() { # binary index, swaps
  local port=${PORTS[$1]} admin=${ADMINS[$1]} swapper="" out
  "${WRK[@]}" -d1s "http://127.0.0.1:$port/" >/dev/null
  if [[ $2 == 1 ]]; then
    (while :; do
      taskset -c 1 curl -s -o /dev/null -w '%{time_total}\n' -X PUT --data-binary @"$WORK/big.json" \
        "http://127.0.0.1:$admin/routes" >>"$WORK/put.$1"
      sleep 0.25
    done) &
    swapper=$!
    # `run` is a command substitution: its swap loop is not in PIDS, so it ends with it.
    trap "kill $swapper 2>/dev/null || true" EXIT
    # The loop's own processes (bash, taskset, sleep) on the load core too, not the proxy's.
    taskset -pc 1 "$swapper" >/dev/null
  fi
  out=$("${WRK[@]}" -d"${DURATION}s" "http://127.0.0.1:$port/")
  if [[ -n $swapper ]]; then kill "$swapper"; wait "$swapper" 2>/dev/null || true; fi
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  echo "binary $1 swaps=$2: $rps req/s, p50 $p50, p99 $p99, $(wc -l <"$WORK/put.$1") tables put in force so far" >&2
  echo "$rps $(to_ms <<<"$p99")"
}

for _ in $(seq "$ROUNDS"); do
  for n in "${!PORTS[@]}"; do
    echo "$(run "$n" 0) $(run "$n" 1)" >>"$WORK/rounds.$n"
  done
done
for n in "${!PORTS[@]}"; do
  python3 - "$WORK/rounds.$n" "$WORK/put.$n" "${@:$((n + 1)):1}" <<'EOF'
import sys, statistics as s
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
puts = [float(l) * 1000 for l in open(sys.argv[2]) if l.strip()]
rps = [r[2] / r[0] for r in rows]
p99 = [r[3] / r[1] for r in rows]
print(f"{sys.argv[3]}: with swaps / without, median of {len(rows)} rounds: req/s {s.median(rps):.2f} "
      f"({min(rps):.2f}-{max(rps):.2f}), p99 {s.median(p99):.2f} ({min(p99):.2f}-{max(p99):.2f}); "
      f"{len(puts)} tables put in force, PUT {s.median(puts):.0f} ms median, {max(puts):.0f} ms at most")
EOF
done
