#!/usr/bin/env bash
# Cache-hit throughput and CPU cost per request, measured with an external closed-loop
# generator (wrk, one thread, 64 connections, a POST with a JSON body), in one run on the
# same cores, against:
#   bare       a bare hyper responder (1 thread): the floor
#   nginx      NGINX 1.22, 2 workers, POST cache keyed on URI + Authorization + body,
#              access log on (buffered, as NGINX users run it) and off
#   nginx-proxy NGINX as a plain proxy to the simulator (no cache), access log off
#   gateway    diia-gateway with server.workers = 1 (one single-threaded runtime, as the
#              bare responder), access log on (default `info`, JSON lines to a file) and off
#   gateway-mt-log  diia-gateway with the default work-stealing runtime, access log on
#   gateway-log-2w  diia-gateway with server.workers = 2 (one runtime per core, as NGINX's
#              two workers), access log on
# Each case runs REPEATS times (default 3) for DURATION (default 8s); the table shows medians
# of req/s, p99 and CPU µs per request (utime + stime of the server's processes from /proc),
# with the ratios to the bare responder and to NGINX's cache. Loopback only; every process
# started here is stopped on exit; wrk and nginx-light are installed from Debian if missing.
#
#   loadtest/compare-wrk.sh
#   REPEATS=5 DURATION=10s CASES="bare gateway-log" loadtest/compare-wrk.sh
#   MIX=zipf CASES="gateway-log nginx-log" loadtest/compare-wrk.sh
#   BEFORE=/path/to/older/diia-gateway CASES="bare gateway-log before-log" loadtest/compare-wrk.sh
#   BEFORE=/path/to/older/diia-gateway CASES="gateway-log before-log" REPEATS=5 loadtest/compare-wrk.sh
#   PIN=on SERVER_CORES=2 loadtest/compare-wrk.sh
# With both gateway-log and before-log measured (rounds alternate: run 1 of each, then
# run 2, ...), a verdict line says whether one wins beyond the spread of its rounds (how the
# batched log sink was judged against tracing-appender before it was removed).
# Pinning (PIN=auto, the default, pins when the machine has >= 6 cores; PIN=on / PIN=off
# force it): every server process (simulator, bare responder, NGINX, gateways) runs on
# cores 0..SERVER_CORES-1 (default 2) and wrk on the others, with WRK_THREADS threads
# (default: one per wrk core, at most 8). The pinning is printed before the first run;
# without it servers and wrk share the cores, and a ratio says so (shared-core only).
# BEFORE adds the cases before-log / before (an older gateway binary, same settings as
# gateway-log / gateway) for before/after rows measured in the same run.
# MIX=zipf draws each request's barcode from 10,000 keys with a Zipf (s = 1) distribution
# (a fresh key set per case) and also reports the calls that reached the simulator, which
# must equal the distinct keys requested.
set -euo pipefail
cd "$(dirname "$0")/.."

REPEATS=${REPEATS:-3}
DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-64}
CASES=${CASES:-"bare nginx-log nginx gateway-log gateway gateway-mt-log nginx-proxy"}

CORES=$(nproc)
SERVER_CORES=${SERVER_CORES:-2}
PIN=${PIN:-auto}
if [ "$PIN" = auto ]; then
  if [ "$CORES" -ge 6 ]; then PIN=on; else PIN=off; fi
fi
if [ "$PIN" = on ]; then
  if [ "$CORES" -le "$SERVER_CORES" ]; then
    echo "PIN=on needs more than SERVER_CORES=$SERVER_CORES cores (this machine: $CORES)" >&2
    exit 2
  fi
  server_cores="0-$((SERVER_CORES - 1))"
  wrk_cores="$SERVER_CORES-$((CORES - 1))"
  wrk_count=$((CORES - SERVER_CORES))
  WRK_THREADS=${WRK_THREADS:-$((wrk_count < 8 ? wrk_count : 8))}
  ON_SERVER_CORES=(taskset -c "$server_cores")
  ON_WRK_CORES=(taskset -c "$wrk_cores")
  echo "pinned: servers (simulator, bare, nginx, gateways) on cores $server_cores, wrk -t$WRK_THREADS on cores $wrk_cores ($CORES cores)" >&2
else
  WRK_THREADS=${WRK_THREADS:-1}
  ON_SERVER_CORES=()
  ON_WRK_CORES=()
  echo "not pinned: servers and wrk -t$WRK_THREADS share all $CORES cores (ratios are shared-core only)" >&2
fi
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
{ command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release --workspace --quiet

work=$(mktemp -d)
chmod a+rwx "$work"
pids=()
cleanup() {
  for pidfile in "$work"/nginx*.pid; do [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

SIM=127.0.0.1:18190
declare -A PORT=([bare]=18170 [gateway]=18180 [gateway-log]=18181 [nginx]=18182 [nginx-log]=18183 [nginx-proxy]=18184 [gateway-mt-log]=18187 [before]=18191 [before-log]=18192 [gateway-log-2w]=18195)

printf 'listen = "%s"\nauto_issue = true\n' "$SIM" > "$work/sim.toml"
"${ON_SERVER_CORES[@]}" target/release/diia-sim --config "$work/sim.toml" >/dev/null 2>&1 & pids+=($!)
"${ON_SERVER_CORES[@]}" target/release/bare-hyper --listen "127.0.0.1:${PORT[bare]}" >/dev/null 2>&1 & pids+=($!)
declare -A PID=([bare]=$!)

gateway() { # name port admin filter workers [binary]
  cat > "$work/$1.toml" <<CONF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
workers = $5
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
filter = "$4"
CONF
  "${ON_SERVER_CORES[@]}" "${6:-target/release/diia-gateway}" --config "$work/$1.toml" 2>"$work/$1.log" >/dev/null & pids+=($!)
  PID[$1]=$!
}
gateway gateway "${PORT[gateway]}" 18185 warn 1
gateway gateway-log "${PORT[gateway-log]}" 18186 info 1
gateway gateway-mt-log "${PORT[gateway-mt-log]}" 18188 info 0
gateway gateway-log-2w "${PORT[gateway-log-2w]}" 18196 info 2
if [ -n "${BEFORE:-}" ]; then
  gateway before "${PORT[before]}" 18193 warn 1 "$BEFORE"
  gateway before-log "${PORT[before-log]}" 18194 info 1 "$BEFORE"
fi

nginx_conf() { # name port access_log(on|off) cache(on|off)
  local access="access_log off;"
  [ "$3" = on ] && access="access_log $work/$1.access.log combined buffer=64k flush=1s;"
  local cache=""
  [ "$4" = on ] && cache='proxy_cache diia; proxy_cache_methods POST; proxy_cache_key "$request_uri|$http_authorization|$request_body"; proxy_cache_valid 200 60s; proxy_cache_lock on;'
  mkdir -p "$work/$1-cache"
  cat > "$work/$1.conf" <<CONF
worker_processes 2;
pid $work/$1.pid;
error_log $work/$1.error.log warn;
events { worker_connections 4096; }
http {
  $access
  proxy_cache_path $work/$1-cache keys_zone=diia:32m max_size=256m inactive=60s use_temp_path=off;
  upstream sim { server $SIM; keepalive 128; }
  server {
    listen 127.0.0.1:$2;
    client_body_buffer_size 16k;
    location / {
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      $cache
    }
  }
}
CONF
  "${ON_SERVER_CORES[@]}" "$NGINX" -c "$work/$1.conf" -p "$work" -e "$work/$1.error.log"
}
nginx_conf nginx "${PORT[nginx]}" off on
nginx_conf nginx-log "${PORT[nginx-log]}" on on
nginx_conf nginx-proxy "${PORT[nginx-proxy]}" off off

[ -n "${BEFORE:-}" ] || unset 'PORT[before]' 'PORT[before-log]'
for port in 18190 "${PORT[@]}"; do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done

# One session token (through a gateway; the simulator accepts it from NGINX too) and one
# barcode: every case answers the same POST, a cache hit after the first.
TOKEN=$(curl -s -H 'Authorization: Basic YWNxdWlyZXJfMTpkZW1vX3Rlc3RfdG9rZW5fMDAwMDAx' \
  "http://127.0.0.1:${PORT[gateway]}/api/v1/auth/acquirer/demo_test_token_000001" | sed 's/.*"token":"\([^"]*\)".*/\1/')
# A fresh valid barcode per case (EAN-13 over a 12-digit base): each case's first request
# uses it at the simulator and caches Diia's 200.
barcode() { python3 -c "
b='$1'; s=sum(int(d)*(3 if i%2 else 1) for i,d in enumerate(b)); print(b+str((10-s%10)%10))"; }
body() { echo "{\"branchId\":\"kyiv-001\",\"barcode\":\"$(barcode "$1")\"}"; }
post_script() { # case body
  cat > "$work/$1.lua" <<LUA
wrk.method = "POST"
wrk.body = '$2'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
LUA
}
zipf_script() { # case key-base
  cat > "$work/$1.lua" <<LUA
local keys, base = 10000, $2
local cdf, total = {}, 0
for i = 1, keys do total = total + 1 / i; cdf[i] = total end
for i = 1, keys do cdf[i] = cdf[i] / total end
local function ean(n)
  local digits, sum = string.format("%.0f", n), 0
  for i = 1, 12 do
    local d = tonumber(digits:sub(i, i))
    if i % 2 == 0 then sum = sum + 3 * d else sum = sum + d end
  end
  return digits .. tostring((10 - sum % 10) % 10)
end
local bodies = {}
for i = 1, keys do bodies[i] = '{"branchId":"kyiv-001","barcode":"' .. ean(base + i) .. '"}' end
local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer $TOKEN" }
request = function()
  local r, lo, hi = math.random(), 1, keys
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < r then lo = mid + 1 else hi = mid end
  end
  return wrk.format("POST", nil, headers, bodies[lo])
end
LUA
}
sim_calls() { curl -s "http://$SIM/sim/stats" | sed 's/.*"total":\([0-9]*\).*/\1/'; }

# Server processes of a case: the listed PID (and its children, for NGINX's workers).
pids_of() {
  case $1 in
    nginx*) local master; master=$(cat "$work/$1.pid"); echo "$master $(pgrep -P "$master" | tr '\n' ' ')";;
    *) echo "${PID[$1]}";;
  esac
}
cpu_ticks() { local total=0; for p in $1; do
    [ -r "/proc/$p/stat" ] || continue # NGINX's cache loader exits after its first minute
    read -r -a f < <(sed 's/.*) //' "/proc/$p/stat"); total=$((total + f[11] + f[12])); done; echo $total; }
TICK=$(getconf CLK_TCK)
url() { echo "http://127.0.0.1:${PORT[$1]}/api/v1/acquirers/document-identification"; }

results="$work/results.txt"
prepare() { # case base: a fresh key (and Zipf key set), cache and pools warmed up
  BODY=$(body "$2")
  post_script "$1" "$BODY"
  if [ "${MIX:-one}" = zipf ]; then
    zipf_script "$1" "$((300000000000 + ($2 - 338979807200) * 20000))"
  fi
  for _ in 1 2 3; do curl -s -o /dev/null -X POST -H 'Content-Type: application/json' -H "Authorization: Bearer $TOKEN" -d "$BODY" "$(url "$1")"; done
  "${ON_WRK_CORES[@]}" wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d1s -s "$work/$1.lua" "$(url "$1")" >/dev/null
}
measure() { # case run
  local procs before after out rps p99 requests non2xx cpu_us
  procs=$(pids_of "$1")
  before=$(cpu_ticks "$procs")
  out=$("${ON_WRK_CORES[@]}" wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$work/$1.lua" "$(url "$1")")
  after=$(cpu_ticks "$procs")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $5}')
  cpu_us=$(awk -v t=$((after - before)) -v hz="$TICK" -v n="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
  echo "$1 $2 $rps $p99 $cpu_us ${non2xx:-0}" | tee -a "$results" >&2
}
base=338979807200
if [ "${MIX:-one}" = zipf ]; then
  # One case at a time: the calls each case makes to the simulator are counted apart
  # (the count includes the warm-up's one fresh key).
  for case in $CASES; do
    base=$((base + 1))
    calls_before=$(sim_calls)
    prepare "$case" "$base"
    for run in $(seq 1 "$REPEATS"); do measure "$case" "$run"; done
    echo "$case: $(( $(sim_calls) - calls_before )) calls reached the simulator (10000 Zipf keys + 1 warm-up key; ≤ distinct keys requested + 1)" >&2
  done
else
  # Runs interleaved (run 1 of every case, then run 2...), so a noisy minute on these
  # shared cores hits every case alike instead of one case's whole series. Each run
  # takes a fresh key, so no answer outlives its TTL (or its barcode) mid-series.
  for run in $(seq 1 "$REPEATS"); do
    for case in $CASES; do
      base=$((base + 1))
      prepare "$case" "$base"
      measure "$case" "$run"
    done
  done
fi

python3 - "$results" <<'PY'
import statistics, sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    case, run, rps, p99, cpu, non2xx = line.split()
    unit = 1e-3 if p99.endswith("us") else (1.0 if p99.endswith("ms") else 1e3)
    rows[case].append((float(rps), float(p99.rstrip("usm")) * unit, float(cpu), int(non2xx)))
med = {c: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v),
           statistics.median(r[2] for r in v), sum(r[3] for r in v)) for c, v in rows.items()}
bare = med.get("bare", (None,))[0]
pair = {c: rows[c] for c in ("gateway-log", "before-log") if c in rows}
nginx = med.get("nginx-log", (None,))[0]
print(f"\n{'case':<12} {'req/s':>10} {'p99 ms':>8} {'CPU µs/req':>11} {'vs bare':>8} {'vs nginx-log':>12} {'non-2xx':>8}")
for case, (rps, p99, cpu, bad) in med.items():
    vb = f"{rps / bare * 100:.0f} %" if bare else "-"
    vn = f"{rps / nginx:.2f}x" if nginx else "-"
    print(f"{case:<12} {rps:>10.0f} {p99:>8.2f} {cpu:>11.2f} {vb:>8} {vn:>12} {bad:>8}")
if len(pair) == 2:
    def spread(name, index):
        values = [r[index] for r in pair[name]]
        return min(values), max(values)
    def verdict(index, higher_wins):
        (lo_now, hi_now), (lo_then, hi_then) = spread("gateway-log", index), spread("before-log", index)
        if min(len(pair["gateway-log"]), len(pair["before-log"])) < 3:
            return "fewer than 3 rounds each: no verdict"
        now_better = lo_now > hi_then if higher_wins else hi_now < lo_then
        then_better = lo_then > hi_now if higher_wins else hi_then < lo_now
        return ("this build wins beyond the noise" if now_better else
                "the older build wins beyond the noise" if then_better else
                "within the noise (the rounds overlap)")
    print()
    for label, index, higher_wins in (("req/s", 0, True), ("CPU µs/req", 2, False)):
        (a, b), (c, d) = spread("gateway-log", index), spread("before-log", index)
        print(f"{label}: this build {a:.2f}..{b:.2f}, older build {c:.2f}..{d:.2f} "
              f"({len(pair['gateway-log'])} rounds each): {verdict(index, higher_wins)}")
PY
