#!/usr/bin/env bash
# Is a table swap visible to traffic? For each fleet-proxy binary given, with a table of
# ROUTES routes and a catch-all in force (10,001 by default), each round makes three wrk runs:
#   without  no swaps;
#   swaps    a loop puts a new table of as many routes through `PUT /routes`, 250 ms after
#            the last one came into force;
#   control  the same loop at the same pace, putting the table to a sink instead: an nginx
#            that reads and discards it.
# The loop and the sink run on the proxy's core in the idle scheduling class: they take only
# the time the proxy leaves, as if the client were on another machine. (On the load core the
# loop's sending took that core from wrk and the backend, and p99 rose as much with PUTs to a
# sink as with PUTs to the proxy.) The control measures what remains of the loop's own cost,
# so that swaps / control is what the swaps cost the proxy's traffic. Binaries and runs
# alternate within every round, so that the machine's drifting load falls on all alike.
#
#   benches/swaps.sh BINARY [BINARY…]          # ROUNDS=8 DURATION=4 ROUTES=10000
#
# Prints each run (req/s, p50, p99, tables put so far) and, per binary, the medians of the
# per-round ratios swaps / without, control / without and swaps / control with 95% bootstrap
# intervals, and how long the PUTs took. Use ROUNDS=15 or more to settle a question.
# Needs nginx, wrk, python3, curl, chrt (Debian: nginx wrk python3 curl util-linux).
set -euo pipefail
# Binaries named relative to where the script was started from, before moving to the repository.
args=(); for bin in "$@"; do args+=("$(realpath "$bin")"); done; set -- "${args[@]}"
cd "$(dirname "$0")/.."
source benches/common.sh

(($#)) || { echo "usage: benches/swaps.sh BINARY [BINARY…]" >&2; exit 2; }
ROUNDS=${ROUNDS:-8}
DURATION=${DURATION:-4}
ROUTES=${ROUTES:-10000}
need nginx wrk python3 curl chrt

BACKEND=$(free_port)
nginx_conf backend "server { listen 127.0.0.1:$BACKEND; location / { return 200 'ok\n'; } }"
start backend taskset -c 1 nginx -c "$WORK/backend/nginx.conf"
wait_port "$BACKEND"
big_table "$BACKEND" "$ROUTES" >"$WORK/big.json"
# Where the PUT loop and the control's sink run: the proxies' core, in the idle class.
IDLE_CPU=(taskset -c 0 chrt -i 0)
# The control's sink: reads the same PUT and discards it.
SINK=$(free_port)
nginx_conf sink "client_max_body_size 64m;
  server { listen 127.0.0.1:$SINK; location / { return 200 '{}'; } }"
start sink "${IDLE_CPU[@]}" nginx -c "$WORK/sink/nginx.conf"
wait_port "$SINK"

# The proxies on CPU 0; wrk and the backend on CPU 1.
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
# The pause after a PUT in the control: as long as the last PUT to the proxy took, plus 250 ms,
# so that both loops send tables at the same pace.
control_pause() { # binary index
  python3 - "$WORK/put.$1" <<'EOF'
import sys
t = [float(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{(t[-1] if t else 1.5) + 0.25:.3f}")
EOF
}

# One run: prints "rps p99_ms".
run() { # binary index, without|swaps|control
  local port=${PORTS[$1]} swapper="" out url pause=0.25 log=/dev/null
  "${WRK[@]}" -d1s "http://127.0.0.1:$port/" >/dev/null
  case $2 in
    swaps) url="http://127.0.0.1:${ADMINS[$1]}/routes"; log="$WORK/put.$1" ;;
    control) url="http://127.0.0.1:$SINK/routes"; pause=$(control_pause "$1") ;;
  esac
  if [[ $2 != without ]]; then
    # Told to stop, the loop lets the PUT it is making finish (bash runs a trap once the
    # command in the foreground is done): no table is still being built in the next run.
    (trap 'exit 0' TERM; while :; do
      "${IDLE_CPU[@]}" curl -s -o /dev/null -w '%{time_total}\n' -X PUT --data-binary @"$WORK/big.json" \
        "$url" >>"$log"
      sleep "$pause"
    done) &
    swapper=$!
    # `run` is a command substitution: its swap loop is not in PIDS, so it ends with it.
    trap "kill $swapper 2>/dev/null || true" EXIT
    # The loop's own processes (bash, sleep) there too.
    taskset -pc 0 "$swapper" >/dev/null
    chrt -i -p 0 "$swapper"
  fi
  out=$("${WRK[@]}" -d"${DURATION}s" "http://127.0.0.1:$port/")
  if [[ -n $swapper ]]; then kill "$swapper"; wait "$swapper" 2>/dev/null || true; fi
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  echo "binary $1 $2: $rps req/s, p50 $p50, p99 $p99, $(wc -l <"$WORK/put.$1") tables put in force so far" >&2
  echo "$rps $(to_ms <<<"$p99")"
}

# Each round's runs in the order of the round before reversed, so that no kind of run always
# comes first after another; written down in one order.
ORDER=(without swaps control)
for _ in $(seq "$ROUNDS"); do
  for n in "${!PORTS[@]}"; do
    declare -A got=()
    for kind in "${ORDER[@]}"; do got[$kind]=$(run "$n" "$kind"); done
    echo "${got[without]} ${got[swaps]} ${got[control]}" >>"$WORK/rounds.$n"
  done
  ORDER=("${ORDER[2]}" "${ORDER[1]}" "${ORDER[0]}")
done
for n in "${!PORTS[@]}"; do
  python3 - "$WORK/rounds.$n" "$WORK/put.$n" "${@:$((n + 1)):1}" <<'EOF'
import random, sys, statistics as s
sys.path.insert(0, "benches")
from interval import median_interval
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
puts = [float(l) * 1000 for l in open(sys.argv[2]) if l.strip()]
rng = random.Random(1)
def ratio(i, j):  # columns i / j of each round
    return median_interval([x[i] / x[j] for x in rows], rng)
print(f"{sys.argv[3]}, medians of {len(rows)} per-round ratios [95% intervals]:")
for name, a, b in [("swaps / without", 2, 0), ("control / without", 4, 0), ("swaps / control", 2, 4)]:
    print(f"  {name:18} req/s {ratio(a, b)}, p99 {ratio(a + 1, b + 1)}")
print(f"  {len(puts)} tables put in force, PUT {s.median(puts):.0f} ms median, {max(puts):.0f} ms at most")
EOF
done
