#!/usr/bin/env bash
# Peer comparison: the same cache-hit and duplicate-request load against diia-gateway and
# NGINX (a caching, rate-limiting reverse proxy) in front of the same simulator, in one run.
# Everything listens on loopback; the script installs nginx (Debian) if missing, and stops
# every process it started on exit.
#
#   loadtest/compare-nginx.sh            # defaults
#   RATES=1000,2000,4000 DURATION=3s loadtest/compare-nginx.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release --workspace --quiet

work=$(mktemp -d)
pids=()
cleanup() {
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

SIM=127.0.0.1:18090 GW=127.0.0.1:18080 ADMIN=127.0.0.1:18091 PEER=127.0.0.1:18081

cat > "$work/sim.toml" <<CONF
listen = "$SIM"
auto_issue = true
[faults]
latency = "2ms"
CONF
cat > "$work/gateway.toml" <<CONF
[server]
listen = "$GW"
admin_listen = "$ADMIN"
[upstream]
base_url = "http://$SIM"
[limits.branch]
per_minute = 100000000
burst = 1000000
[limits.client]
per_minute = 100000000
burst = 1000000
diia_share = 1.0
[limits.diia]
per_second = 1000000
burst = 100000
[log]
filter = "warn"
CONF
# NGINX as a caching, rate-limiting reverse proxy, configured as well as it can be for this
# job: the POST body and Authorization are part of the cache key (so it caches per acquirer
# and barcode like the gateway), cache lock coalesces concurrent misses, keep-alive upstream.
# NGINX cannot key a rate limit on a JSON body field, so it limits per client address.
mkdir -p "$work/cache"
# NGINX workers run as an unprivileged user: let them into the work directory.
chmod -R a+rwx "$work"
cat > "$work/nginx.conf" <<CONF
worker_processes auto;
pid $work/nginx.pid;
error_log $work/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  proxy_cache_path $work/cache keys_zone=diia:32m max_size=256m inactive=60s use_temp_path=off;
  limit_req_zone \$binary_remote_addr zone=branch:10m rate=1000000r/s;
  upstream diia { server $SIM; keepalive 256; }
  server {
    listen $PEER;
    client_body_buffer_size 128k;
    location / {
      limit_req zone=branch burst=1000000 nodelay;
      proxy_pass http://diia;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache diia;
      proxy_cache_methods GET HEAD POST;
      proxy_cache_key "\$request_method\$request_uri|\$http_authorization|\$request_body";
      proxy_cache_valid 200 60s;
      proxy_cache_valid 400 404 10s;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 10s;
      add_header Cache-Status "nginx; \$upstream_cache_status";
    }
  }
}
CONF

target/release/diia-sim --config "$work/sim.toml" >/dev/null 2>&1 & pids+=($!)
target/release/diia-gateway --config "$work/gateway.toml" >/dev/null 2>&1 & pids+=($!)
"$NGINX" -c "$work/nginx.conf" -p "$work" -e "$work/error.log"
for port in 18090 18080 18081; do
  for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
    sleep 0.1
  done
done

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); nginx: $("$NGINX" -v 2>&1 | cut -d/ -f2)"
target/release/loadtest compare \
  --gateway "http://$GW" --peer "http://$PEER" --peer-name nginx --sim "http://$SIM" \
  ${RATES:+--rates "$RATES"} ${DURATION:+--duration "$DURATION"} "$@"
