#!/usr/bin/env bash
# Two fleet-proxy binaries against each other on the clock: the same table, the same backend,
# runs interleaved A, B, A, B… so that the machine's drifting load falls on both alike. For
# telling whether a change helped when single runs vary by ±20% (see README.md).
#
#   benches/ab.sh OLD_BINARY NEW_BINARY            # ROUNDS=6 DURATION=4
#   MIRROR="mirror: { to: shadow, percent: 10 }" benches/ab.sh A B
#   H2=1 benches/ab.sh A B                          # h2c under h2load (-c 16 -m 16)
#
# Prints each round and the median of the per-round B/A ratios of req/s, p99 and CPU per
# request, each with a 95% bootstrap interval (interval.py). Odd rounds run A first, even
# rounds B first. With H2=1, h2load reports no p99: the mean request time stands in for it.
# Needs nginx, wrk, python3 (Debian: nginx wrk python3); h2load (nghttp2-client) for H2=1.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/common.sh

A=${1:?usage: benches/ab.sh BINARY_A BINARY_B}
B=${2:?usage: benches/ab.sh BINARY_A BINARY_B}
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-4}
need nginx wrk python3 curl
[[ "${H2:-0}" == 1 ]] && need h2load
CLK=$(getconf CLK_TCK)

start_backends taskset -c 1

# One run of a binary: prints "req/s cpu-µs-per-request p99-ms".
run() {
  local port; port=$(free_port)
  fleet_conf "$WORK/ab.yaml" "$port" "$(free_port)" "$BACKEND" "$SHADOW" "${MIRROR:-}"
  start proxy taskset -c 0 "$1" --config "$WORK/ab.yaml" --worker-threads 1
  local pid=$LAST
  wait_port "$port" 300
  if [[ "${H2:-0}" == 1 ]]; then
    local load=(taskset -c 1 h2load -c 16 -m 16 -H "$COOKIE")
    "${load[@]}" -D 1 "http://127.0.0.1:$port/" >/dev/null
    local before after out
    before=$(cpu_ticks "$pid")
    out=$("${load[@]}" -D "$DURATION" "http://127.0.0.1:$port/")
    after=$(cpu_ticks "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    # "finished in 4.00s, 51234.50 req/s, ..."; "requests: N total, N started, N done,
    # N succeeded, ..."; "time for request: min max mean sd ..." (mean in ms or us).
    awk -v t=$((after - before)) -v clk="$CLK" '
      /finished in/ { r = $4 } /^requests:/ { n = $8 }
      /time for request:/ { m = $6; if (m ~ /us$/) m = m / 1000; else if (m ~ /ms$/) m = m + 0; else m = m * 1000 }
      END { printf "%s %.1f %.3f\n", r, t * 1000000 / clk / n, m }' <<<"$out"
    return
  fi
  local wrk=(taskset -c 1 wrk -t1 -c64 --latency -H "$COOKIE")
  "${wrk[@]}" -d1s "http://127.0.0.1:$port/" >/dev/null
  local before after out
  before=$(cpu_ticks "$pid")
  out=$("${wrk[@]}" -d"${DURATION}s" "http://127.0.0.1:$port/")
  after=$(cpu_ticks "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local p99; p99=$(awk '$1=="99%" {print $2}' <<<"$out" | to_ms)
  awk -v t=$((after - before)) -v clk="$CLK" -v p99="$p99" '
    /requests in/ { n = $1 } /Requests\/sec/ { r = $2 }
    END { printf "%s %.1f %s\n", r, t * 1000000 / clk / n, p99 }' <<<"$out"
}

for round in $(seq "$ROUNDS"); do
  if ((round % 2)); then a=$(run "$A"); b=$(run "$B"); else b=$(run "$B"); a=$(run "$A"); fi
  echo "round $round (req/s cpu-us p99-ms): A $a | B $b" >&2
  echo "$a $b" >>"$WORK/ab.runs"
done
python3 - "$WORK/ab.runs" <<'PY'
import random, sys
sys.path.insert(0, "benches")
from interval import median_interval
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
rng = random.Random(1)
ratio = lambda i: median_interval([r[3 + i] / r[i] for r in rows], rng)
print(f"B / A, median of {len(rows)} per-round ratios [95% interval]: "
      f"req/s {ratio(0)}, CPU per request {ratio(1)}, p99 {ratio(2)}")
PY
