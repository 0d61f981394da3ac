#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: fleet-proxy beside nginx,
# the same backend, the same requests. Unlike the wall-clock numbers of benches/proxy.sh these
# repeat to the instruction on a loaded machine. Kernel work is not counted (both make the
# same socket calls: two writev and two recvfrom per request, checked with strace -c).
# The third row, the hyper floor (proxy/examples/hyper_floor.rs), is the least a proxy on
# hyper 1's HTTP/1 codec does per request: fleet-proxy cannot go below it while it uses hyper.
#
#   benches/instructions.sh                 # 16,000 requests on 16 keep-alive connections
#   REQUESTS=40000 benches/instructions.sh
#
# Needs valgrind, nginx, python3 (Debian: valgrind nginx python3).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/common.sh

REQUESTS=${REQUESTS:-16000}
need valgrind nginx python3 curl
build_fleet_proxy
fleet_binary

# N requests over 16 keep-alive connections, each waiting for its answer before the next.
cat >"$WORK/drive.py" <<'EOF'
import selectors, socket, sys
port, total = int(sys.argv[1]), int(sys.argv[2])
req = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n"
       b"Cookie: session=s3cr3t; fleet-bucket=4f2a9c0d11b2e3f4\r\n\r\n")
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
sel, left, done, buf = selectors.DefaultSelector(), len(socks), [0] * 16, [b""] * 16
for i, s in enumerate(socks):
    sel.register(s, selectors.EVENT_READ, i)
    s.sendall(req)
while left:
    for key, _ in sel.select():
        i = key.data
        buf[i] += socks[i].recv(65536)
        while b"ok\n" in buf[i]:
            buf[i] = buf[i].split(b"ok\n", 1)[1]
            done[i] += 1
            if done[i] < total // 16:
                socks[i].sendall(req)
            else:
                sel.unregister(socks[i])
                left -= 1
EOF

drive() { python3 "$WORK/drive.py" "$1" "$2"; }

start_backends

NGINX=$(free_port)
nginx_proxy_conf proxy "$BACKEND" "listen 127.0.0.1:$NGINX;"
# One process, so that callgrind sees the worker.
sed -i 's/^daemon off;/daemon off;\nmaster_process off;/' "$WORK/proxy/nginx.conf"
FLEET_PORT=$(free_port)
fleet_conf "$WORK/fleet.yaml" "$FLEET_PORT" "$(free_port)" "$BACKEND" "$BACKEND" ""

FLOOR=$(free_port)
# The same table with 10% of requests mirrored to the second nginx (the shadow track).
MIRRORED=$(free_port)
fleet_conf "$WORK/mirror.yaml" "$MIRRORED" "$(free_port)" "$BACKEND" "$SHADOW" "mirror: { to: shadow, percent: 10 }"
# And with each copy's answer compared with its primary's, bodies too.
COMPARED=$(free_port)
fleet_conf "$WORK/compare.yaml" "$COMPARED" "$(free_port)" "$BACKEND" "$SHADOW" "mirror: { to: shadow, percent: 10, compare: body }"

count nginx "$NGINX" nginx -c "$WORK/proxy/nginx.conf"; N=$COUNTED
count hyper-floor "$FLOOR" "$TARGET/release/examples/hyper_floor" "127.0.0.1:$FLOOR" "127.0.0.1:$BACKEND"; H=$COUNTED
count fleet-proxy "$FLEET_PORT" "$FLEET" --config "$WORK/fleet.yaml" --worker-threads 1; F=$COUNTED
count fleet-mirror "$MIRRORED" "$FLEET" --config "$WORK/mirror.yaml" --worker-threads 1; M=$COUNTED
count fleet-compare "$COMPARED" "$FLEET" --config "$WORK/compare.yaml" --worker-threads 1; C=$COUNTED
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo "| proxy | instructions per request (user space) |"
echo "|---|---:|"
echo "| nginx | $N |"
echo "| hyper floor (proxy/examples/hyper_floor.rs) | $H |"
echo "| fleet-proxy ($FLEET_BUILD build) | $F |"
echo "| fleet-proxy, 10% mirror | $M |"
echo "| fleet-proxy, 10% mirror, compared by body | $C |"
echo "| hyper floor / nginx | $(ratio "$H" "$N") |"
echo "| fleet-proxy / nginx | $(ratio "$F" "$N") |"
echo "| fleet-proxy / hyper floor | $(ratio "$F" "$H") |"
echo "| mirror on / off | $(ratio "$M" "$F") |"
echo "| mirror compared / not | $(ratio "$C" "$M") |"
