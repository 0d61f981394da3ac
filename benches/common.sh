# Shared by the benchmark scripts: tools, a work directory cleaned up on exit, processes
# started and ended by PID, ports, and the configs of the proxies under test.
# Sourced, not run.

TARGET=${CARGO_TARGET_DIR:-target}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  [[ -n "${KEEP_LOGS:-}" ]] && cp -r "$WORK" /tmp/bench-logs
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Installs the Debian packages of the commands named that are missing.
need() {
  local missing=() tool
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  ((${#missing[@]})) || return 0
  echo "installing: ${missing[*]}" >&2
  local packages=()
  for tool in "${missing[@]}"; do
    case $tool in
      h2load) packages+=(nghttp2-client) ;;
      callgrind_annotate | callgrind_control) packages+=(valgrind) ;;
      chrt | taskset) packages+=(util-linux) ;;
      pgrep) packages+=(procps) ;;
      *) packages+=("$tool") ;;
    esac
  done
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}" >/dev/null
}

# fleet-proxy, and the hyper floor it is compared with (proxy/examples/hyper_floor.rs).
build_fleet_proxy() { CARGO_TARGET_DIR="$TARGET" cargo build --release -p fleet-proxy --bins --example hyper_floor >&2; }

# The fleet-proxy the benchmarks measure, in FLEET: by default the one the deploy image ships,
# built with profile-guided optimization by benches/pgo.sh (FLEET_BUILD=pgo); with PGO=0 a
# plain `cargo build --release` (FLEET_BUILD=plain). Call after build_fleet_proxy.
fleet_binary() {
  if [[ "${PGO:-1}" == 1 ]]; then
    FLEET=$(OUT="$TARGET/pgo" benches/pgo.sh); FLEET_BUILD=pgo
  else
    FLEET="$TARGET/release/fleet-proxy"; FLEET_BUILD=plain
  fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port, [tries of 0.1 s]
  for _ in $(seq "${2:-100}"); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "port $1 never opened" >&2; return 1
}

nginx_conf() { # name, body of the server block, listen lines
  mkdir -p "$WORK/$1"
  cat >"$WORK/$1/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/$1/body; proxy_temp_path $WORK/$1/proxy;
  fastcgi_temp_path $WORK/$1/fcgi; uwsgi_temp_path $WORK/$1/uwsgi; scgi_temp_path $WORK/$1/scgi;
  $2
}
EOF
}

# nginx as the proxy under test: plain proxy_pass with pooled upstream connections.
nginx_proxy_conf() { # name, backend port, listen directives
  nginx_conf "$1" "upstream be { server 127.0.0.1:$2; keepalive 128; }
  server { $3
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
}

start() { # name, command...; sets LAST
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  LAST=$!
  PIDS+=("$LAST")
}

# The header every load run sends: a session cookie and a sticky bucket.
COOKIE='Cookie: session=s3cr3t; fleet-bucket=4f2a9c0d11b2e3f4'

# User plus system CPU time of a process, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# The backend and the mirror's shadow: two nginx answering 200 "ok" themselves, one worker
# each, started under the command prefix given (say, `taskset -c 1`); the shadow also under
# $SHADOW_PREFIX if set. The shadow speaks HTTP/1.1 on one port and HTTP/2 (prior knowledge,
# h2c) on another. Sets BACKEND, SHADOW, SHADOW_H2C (ports) and SHADOW_PID.
start_backends() { # command prefix...
  BACKEND=$(free_port); SHADOW=$(free_port); SHADOW_H2C=$(free_port)
  nginx_conf backend "server { listen 127.0.0.1:$BACKEND; location / { return 200 'ok\n'; } }"
  nginx_conf shadow "server { listen 127.0.0.1:$SHADOW; listen 127.0.0.1:$SHADOW_H2C http2;
    location / { return 200 'ok\n'; } }"
  start backend "$@" nginx -c "$WORK/backend/nginx.conf"
  # shellcheck disable=SC2086 # a command prefix, split on purpose
  start shadow "$@" ${SHADOW_PREFIX:-} nginx -c "$WORK/shadow/nginx.conf"; SHADOW_PID=$LAST
  wait_port "$BACKEND"; wait_port "$SHADOW"; wait_port "$SHADOW_H2C"
}

# Writes to FILE a client that opens N connections to 127.0.0.1:PORT at once, makes one request
# on each, and once every answer is in writes the seconds that took to READY, then keeps the
# connections open, idle: `python3 FILE PORT N READY`.
idle_client() { # file
  cat >"$1" <<'EOF'
import os, socket, sys, time
port, n, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
started = time.monotonic()
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: fleet-bucket=1\r\n\r\n")
    socks.append(s)
for s in socks:
    s.recv(4096)
with open(ready + ".tmp", "w") as f:
    f.write(f"{time.monotonic() - started:.1f}")
os.rename(ready + ".tmp", ready)
time.sleep(600)
EOF
}

# fleet-proxy with a realistic table: 20 routes, header and cookie rules, a 5% sticky split.
fleet_conf() { # file, port, admin, stable/canary backend, shadow backend, mirror line, [shadow protocol]
  {
    echo "listen: 127.0.0.1:$2"
    echo "admin: 127.0.0.1:$3"
    echo "limits: { max_connections: 30000 }"
    echo "tracks:"
    # The backends speak HTTP/1.1 only, as nginx and HAProxy are configured to use them.
    echo "  stable: { backends: [\"127.0.0.1:$4\"], protocol: http1 }"
    echo "  canary: { backends: [\"127.0.0.1:$4\"], protocol: http1 }"
    echo "  shadow: { backends: [\"127.0.0.1:$5\"], protocol: ${7:-http1} }"
    echo "routes:"
    for i in $(seq 1 18); do
      echo "  - { host: \"svc$i.example.com\", path_prefix: /, split: { stable: 9500, canary: 500 }, sticky: { cookie: fleet-bucket } }"
    done
    echo "  - { host: \"*.internal\", path_prefix: /admin, split: { stable: 10000 } }"
    echo "  - host: \"*\""
    echo "    path_prefix: /"
    echo "    rules:"
    echo "      - { match: { header: { name: x-canary, exact: \"true\" } }, to: canary }"
    echo "      - { match: { header: { name: x-build, prefix: rc- } }, to: canary }"
    echo "      - { match: { header: { name: x-tenant, regex: \"t-(1|2|3)[0-9]*\" } }, to: canary }"
    echo "      - { match: { cookie: { name: ab-test-group, exact: version-b } }, to: canary }"
    echo "    split: { stable: 9500, canary: 500 }"
    echo "    sticky: { cookie: fleet-bucket }"
    if [[ -n "$6" ]]; then echo "    $6"; fi
  } >"$1"
}

# A table of N (10,000 unless given) routes and a catch-all as `PUT /routes` takes it (JSON).
# The catch-all, last, takes every other host, so traffic keeps flowing while it is swapped.
big_table() { # backend port, [N]
  python3 - "$1" "${2:-10000}" <<'EOF'
import json, sys
b = f"127.0.0.1:{sys.argv[1]}"
routes = [{"host": f"svc{i}.example.com", "path_prefix": f"/p{i % 50}",
           "rules": [{"match": {"header": {"name": "x-canary", "exact": "true"}}, "to": "canary"},
                     {"match": {"cookie": {"name": "ab", "regex": "version-[bc]"}}, "to": "canary"}],
           "split": {"stable": 9500, "canary": 500}, "sticky": {"cookie": "fleet-bucket"}}
          for i in range(int(sys.argv[2]))]
routes.append({"host": "*", "path_prefix": "/", "split": {"stable": 10000}})
print(json.dumps({"tracks": {"stable": {"backends": [b]}, "canary": {"backends": [b]}}, "routes": routes}))
EOF
}

# The `build_ms` of a `PUT /routes` answer read on stdin: the table read, checked and built,
# as the proxy timed it on its background thread.
build_ms() { python3 -c 'import json, sys; print(json.load(sys.stdin)["build_ms"])'; }

# A latency as wrk prints it (850.00us, 1.20ms, 1.02s) in milliseconds.
to_ms() { awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); v/=1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v) } else if (v ~ /s$/) { sub(/s$/,"",v); v*=1000 } printf "%.3f", v }'; }

# Runs a proxy under callgrind, warms it up with `drive PORT 2000`, counts REQUESTS requests
# sent by `drive PORT REQUESTS` (a function of the calling script); sets COUNTED to the
# instructions per request. Not to be run in a subshell: the proxy's PID must reach PIDS,
# for the cleanup if the script is stopped mid-count.
count() { # name, port, command...
  local name=$1 port=$2; shift 2
  valgrind --tool=callgrind --callgrind-out-file="$WORK/$name.cg" "$@" >"$WORK/$name.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  wait_port "$port" 300
  drive "$port" 2000
  callgrind_control -z "$pid" >/dev/null 2>&1
  drive "$port" "$REQUESTS"
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local total
  total=$(callgrind_annotate "$WORK/$name.cg".1 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
  [[ -n "$total" ]] || { echo "callgrind counted nothing for $name: see $WORK/$name.log" >&2; exit 1; }
  COUNTED=$(awk -v t="$total" -v n="$REQUESTS" 'BEGIN { printf "%.0f", t / n }')
}
