#!/usr/bin/env bash
# Builds fleet-proxy with profile-guided optimization (PGO): an instrumented build serves a
# training load, and the compiler lays out and inlines the final build by what that load ran.
# The binary lands at $OUT/fleet-proxy (target/pgo/fleet-proxy by default).
#
#   benches/pgo.sh                 # TRAIN=8 seconds per load
#   benches/ab.sh target/release/fleet-proxy target/pgo/fleet-proxy
#
# The training load is what a regional proxy serves: HTTP/1.1 keep-alive requests with a
# sticky cookie through the realistic table of proxy.sh (20 routes, header, regex and cookie
# rules, a 5% sticky split) with 10% of them mirrored; the same over TLS; HTTP/2 (h2c) on 16
# connections; and HTTP/1.1 again after a 1,000-route table was put in force by `PUT
# /routes`. Everything the proxy does is in the final binary; PGO only arranges it by how
# often each part ran. The deploy image (deploy/docker/Dockerfile) builds fleet-proxy so.
#
# Nothing is done when $OUT/fleet-proxy is newer than every source it is built from (FORCE=1
# builds anyway).
#
# Needs llvm-profdata of the compiler's own LLVM (`rustup component add llvm-tools`, which
# the script tries), nginx, wrk, h2load, openssl (Debian: nginx wrk nghttp2-client openssl),
# python3, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/common.sh

OUT=${OUT:-target/pgo}
TRAIN=${TRAIN:-8}
if [[ -z "${FORCE:-}" && -x "$OUT/fleet-proxy" ]] && [[ -z "$(find proxy fleet/yaml Cargo.toml Cargo.lock \
  benches/pgo.sh benches/common.sh -newer "$OUT/fleet-proxy" -print -quit)" ]]; then
  echo "$OUT/fleet-proxy is up to date" >&2
  echo "$OUT/fleet-proxy"
  exit 0
fi
need nginx wrk h2load openssl python3 curl

rustup component add llvm-tools >/dev/null 2>&1 || true
PROFDATA=$(find "$(rustc --print sysroot)/lib/rustlib" -name llvm-profdata -type f | head -1)
[[ -x "$PROFDATA" ]] || {
  echo "llvm-profdata not found in $(rustc --print sysroot): rustup component add llvm-tools" >&2
  exit 1
}

# Fixed paths: cargo rebuilds when RUSTFLAGS change, so a path that changed each time would
# rebuild the instrumented binary each time, and the final one is named by its profile's
# content, so that it is rebuilt exactly when that changes.
RAW="$PWD/$OUT/profraw"
rm -rf "$RAW"
echo "1/4 an instrumented build ($OUT/gen)" >&2
RUSTFLAGS="-Cprofile-generate=$RAW" CARGO_TARGET_DIR="$OUT/gen" \
  cargo build --release --locked -p fleet-proxy --bin fleet-proxy >&2

echo "2/4 the training load, ${TRAIN}s each" >&2
start_backends
PORT=$(free_port); ADMIN=$(free_port)
fleet_conf "$WORK/fleet.yaml" "$PORT" "$ADMIN" "$BACKEND" "$SHADOW" "mirror: { to: shadow, percent: 10 }"
# A second listener, with TLS.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
TLS=$(free_port)
sed -i "s|^listen: .*|listen: [ \"127.0.0.1:$PORT\", { addr: \"127.0.0.1:$TLS\", tls: { cert: \"$WORK/cert.pem\", key: \"$WORK/key.pem\" } } ]|" "$WORK/fleet.yaml"
start fleet "$OUT/gen/release/fleet-proxy" --config "$WORK/fleet.yaml" --worker-threads 1
PROXY=$LAST
wait_port "$PORT"
URL="http://127.0.0.1:$PORT/"
wrk -t1 -c64 -d"${TRAIN}s" -H "$COOKIE" -H 'User-Agent: bench' "$URL" | grep Requests/sec >&2
wrk -t1 -c64 -d"$((TRAIN / 2))s" -H "$COOKIE" "https://localhost:$TLS/" | grep Requests/sec >&2
h2load -n $((TRAIN * 40000)) -c 16 -m 16 -H "$COOKIE" "$URL" | grep 'finished in' >&2
h2load -n $((TRAIN * 10000)) -c 16 -m 16 -H "$COOKIE" "https://localhost:$TLS/" | grep 'finished in' >&2
big_table "$BACKEND" 1000 >"$WORK/table.json"
curl -sf -X PUT --data-binary @"$WORK/table.json" "http://127.0.0.1:$ADMIN/routes" >/dev/null
wrk -t1 -c64 -d"${TRAIN}s" -H "$COOKIE" -H 'Host: svc7.example.com' "${URL}p7/x" | grep Requests/sec >&2
# A clean exit writes the profile.
kill -TERM "$PROXY"
wait "$PROXY" || { echo "the instrumented proxy did not exit cleanly: see $WORK/fleet.log" >&2; exit 1; }

echo "3/4 merging the profile" >&2
"$PROFDATA" merge -o "$WORK/merged.profdata" "$RAW"
PROFILE="$PWD/$OUT/fleet-proxy-$(sha256sum "$WORK/merged.profdata" | cut -c1-16).profdata"
rm -f "$OUT"/fleet-proxy-*.profdata
mv "$WORK/merged.profdata" "$PROFILE"

echo "4/4 the optimized build ($OUT/use)" >&2
RUSTFLAGS="-Cprofile-use=$PROFILE" CARGO_TARGET_DIR="$OUT/use" \
  cargo build --release --locked -p fleet-proxy --bin fleet-proxy >&2
cp "$OUT/use/release/fleet-proxy" "$OUT/fleet-proxy"
echo "$OUT/fleet-proxy"
