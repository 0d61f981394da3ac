#!/usr/bin/env bash
# User-space instructions per h2c request of two fleet-proxy binaries (say main's and a
# change's), counted by callgrind, with h2load as the client (4 connections, 8 streams each)
# and an nginx backend. For changes to the HTTP/2 path, which instructions.sh does not take.
#
#   benches/h2-instructions.sh OLD_BINARY NEW_BINARY        # REQUESTS=20000
#
# UPSTREAM=h2c sends the proxies' requests on to the backend over HTTP/2 too (an nginx
# listening with `http2`, tracks with `protocol: h2c`), for changes to the HTTP/2 upstream
# path (`proxy/src/upstream/h2.rs`).
#
# Needs valgrind, nginx, h2load (Debian: valgrind nginx nghttp2-client).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/common.sh
A_BIN=${1:?usage: benches/h2-instructions.sh BINARY_A BINARY_B}
B_BIN=${2:?usage: benches/h2-instructions.sh BINARY_A BINARY_B}
need valgrind nginx h2load python3
for bin in "$A_BIN" "$B_BIN"; do [[ -x "$bin" ]] || { echo "not an executable: $bin (paths are from the repository's root)" >&2; exit 1; }; done
REQUESTS=${REQUESTS:-20000}
drive() { # port, requests
  local out; out=$(h2load -n "$2" -c 4 -m 8 "http://127.0.0.1:$1/")
  grep -q "status codes: $2 2xx" <<<"$out" || echo "warning: $(grep 'status codes' <<<"$out")" >&2
}

start_backends
P=$(free_port)
fleet_conf "$WORK/fleet.yaml" "$P" "$(free_port)" "$BACKEND" "$BACKEND" ""
if [[ ${UPSTREAM:-http1} == h2c ]]; then
  sed -i "s/127.0.0.1:$BACKEND\"\], protocol: http1/127.0.0.1:$SHADOW_H2C\"], protocol: h2c/" "$WORK/fleet.yaml"
  grep -q "protocol: h2c" "$WORK/fleet.yaml" || { echo "no h2c track in $WORK/fleet.yaml" >&2; exit 1; }
fi
count a "$P" "$A_BIN" --config "$WORK/fleet.yaml" --worker-threads 1; A=$COUNTED
count b "$P" "$B_BIN" --config "$WORK/fleet.yaml" --worker-threads 1; B=$COUNTED
echo "A $A  B $B  B/A $(awk -v a="$A" -v b="$B" 'BEGIN { printf "%.3f", b / a }')"
