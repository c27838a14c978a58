#!/usr/bin/env bash
# The callback relay's benchmark, in one run on the same cores, loopback only:
#   1. ingest: `loadtest relay` posts N callbacks of SIZE bytes of payload (one real CMS
#      package for sim/demo/acquirer-cert.pem, a new requestId each) at concurrency C to a
#      gateway (embedded simulator, relay on) with fsync = "always", then to a fresh one
#      with fsync = "batch" (a temp data_dir each). Unrouted, so stored as orphans: the
#      ingest path alone. Then the same N at an offered RATE per second (open loop, at
#      most OPEN_C in flight, latency from when each callback was due): the issue's
#      target is p99 < 50 ms at 400/s with fsync = "always".
#   2. delivery: on the same gateway, `loadtest relay --deliver` routes N fresh requestIds
#      through document-request first, then posts them; the gateway pushes each to a sink
#      hosted by loadtest (the target of branch kyiv-001, per_target_concurrency default 8).
#   3. overload: on the "batch" gateway, `loadtest relay` at concurrency OVERLOAD_C
#      (default 512: 512 × 200 KiB is above max_in_flight_bytes = 64 MiB), to show the byte
#      budget answering 503 + Retry-After instead of growing the process.
#   4. the identification cache-hit path (wrk, one thread, 64 connections, one cached
#      document-identification POST, as compare-wrk.sh) on a gateway with the relay off and
#      one with the relay on (idle), alternated REPEATS times, medians.
# Prints one table; each gateway's peak RSS (VmHWM) is shown next to max_in_flight_bytes.
# Every process started here is stopped on exit; the temp directory is removed.
#
#   loadtest/relay-bench.sh
#   N=5000 C=64 SIZE=1048576 loadtest/relay-bench.sh
#   REPEATS=3 HIT_DURATION=10s loadtest/relay-bench.sh
#   RATE=600 loadtest/relay-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-2000}
C=${C:-32}
SIZE=${SIZE:-204800}
REPEATS=${REPEATS:-2}
HIT_DURATION=${HIT_DURATION:-8s}
MAX_IN_FLIGHT=${MAX_IN_FLIGHT:-67108864}
OVERLOAD_C=${OVERLOAD_C:-512}
RATE=${RATE:-400}
OPEN_C=${OPEN_C:-256}

command -v wrk >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
}
cargo build --release --workspace --quiet

work=$(mktemp -d)
gateway_pid=""
cleanup() {
  if [ -n "$gateway_pid" ]; then kill "$gateway_pid" 2>/dev/null || true; wait "$gateway_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

GW=18280 ADMIN=18281 SIM=18282 RELAY=18283 SINK=18284
RELAY_URL="http://127.0.0.1:$RELAY/diia/callback/$(tr -d '[:space:]' < config/demo/relay-token)"
printf 'whsec_%s\n' "$(head -c 32 /dev/urandom | base64 -w0)" > "$work/whsec"

config() { # name relay(on|off) fsync
  cat > "$work/$1.toml" <<CONF
[server]
listen = "127.0.0.1:$GW"
admin_listen = "127.0.0.1:$ADMIN"
[log]
filter = "warn"
[simulator]
listen = "127.0.0.1:$SIM"
acquirers = [
  { token = "demo_test_token_000001", auth_token = "YWNxdWlyZXJfMTpkZW1vX3Rlc3RfdG9rZW5fMDAwMDAx" },
]
auto_issue = false
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
CONF
  [ "$2" = on ] && cat >> "$work/$1.toml" <<CONF
[callback_relay]
enabled = true
listen = "127.0.0.1:$RELAY"
data_dir = "$work/relay-$1"
seal_key_file = "config/demo/relay-keys"
fsync = "$3"
max_in_flight_bytes = $MAX_IN_FLIGHT
[[callback_relay.acquirer]]
name = "demo"
path_token_file = "config/demo/relay-token"
recipient_cert_file = "sim/demo/acquirer-cert.pem"
[[callback_relay.target]]
name = "sink"
url = "http://127.0.0.1:$SINK/diia/documents"
signing_secret_file = "$work/whsec"
branch_ids = ["kyiv-001"]
CONF
  return 0
}

wait_port() {
  for _ in $(seq 1 150); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on :$1 (see $work/gateway.log)" >&2; cat "$work/gateway.log" >&2; exit 1
}
start_gateway() { # name relay fsync
  config "$@"
  target/release/diia-gateway --config "$work/$1.toml" >"$work/gateway.log" 2>&1 &
  gateway_pid=$!
  wait_port "$GW"; wait_port "$SIM"
  [ "$2" = on ] && wait_port "$RELAY"
  return 0
}
stop_gateway() {
  kill "$gateway_pid" 2>/dev/null || true
  wait "$gateway_pid" 2>/dev/null || true
  gateway_pid=""
}
peak_rss_mib() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$gateway_pid/status"; }
cpu_ticks() { local f; read -r -a f < <(sed 's/.*) //' "/proc/$gateway_pid/stat"); echo $((f[11] + f[12])); }
TICK=$(getconf CLK_TCK)

relay_run() { # label concurrency [--deliver ...]
  local label=$1 concurrency=$2 before; shift 2
  before=$(cpu_ticks)
  target/release/loadtest relay --url "$RELAY_URL" --callbacks "$N" --concurrency "$concurrency" \
    --size "$SIZE" --label "$label" --out "$work" "$@" >&2
  echo "$label $(peak_rss_mib) $(awk -v t=$(($(cpu_ticks) - before)) -v hz="$TICK" -v n="$N" 'BEGIN {printf "%.2f", t / hz * 1e3 / n}')" >> "$work/rss.txt"
}

for fsync in always batch; do
  echo "== relay on, fsync = $fsync" >&2
  start_gateway "$fsync" on "$fsync"
  relay_run "$fsync" "$C"
  relay_run "$fsync-rate" "$OPEN_C" --rate "$RATE"
  relay_run "$fsync-deliver" "$C" --deliver --sink "127.0.0.1:$SINK" \
    --gateway "http://127.0.0.1:$GW" --sim "http://127.0.0.1:$SIM"
  [ "$fsync" = batch ] && relay_run batch-overload "$OVERLOAD_C"
  stop_gateway
done

# The hit path: one session token and one fresh barcode per gateway, cached by three
# warm-up requests, then wrk.
hit_run() { # case run
  local relay=off token barcode body out
  [ "$1" = relay-on ] && relay=on
  start_gateway "hit-$1" "$relay" always
  token=$(curl -s -H 'Authorization: Basic YWNxdWlyZXJfMTpkZW1vX3Rlc3RfdG9rZW5fMDAwMDAx' \
    "http://127.0.0.1:$GW/api/v1/auth/acquirer/demo_test_token_000001" | sed 's/.*"token":"\([^"]*\)".*/\1/')
  barcode=$(curl -s -X POST "http://127.0.0.1:$SIM/sim/barcodes" | sed 's/.*"barcode":"\([^"]*\)".*/\1/')
  body="{\"branchId\":\"kyiv-001\",\"barcode\":\"$barcode\"}"
  cat > "$work/hit.lua" <<LUA
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $token"
LUA
  local url="http://127.0.0.1:$GW/api/v1/acquirers/document-identification"
  for _ in 1 2 3; do curl -s -o /dev/null -X POST -H 'Content-Type: application/json' -H "Authorization: Bearer $token" -d "$body" "$url"; done
  wrk -t1 -c64 -d1s -s "$work/hit.lua" "$url" >/dev/null
  out=$(wrk -t1 -c64 -d"$HIT_DURATION" --latency -s "$work/hit.lua" "$url")
  echo "$1 $2 $(echo "$out" | awk '/Requests\/sec/ {print $2}') $(echo "$out" | awk '$1=="99%" {print $2}') $(echo "$out" | awk '/Non-2xx/ {print $5}')" | tee -a "$work/hits.txt" >&2
  stop_gateway
}
echo "== identification hit path, relay off vs on (idle), $REPEATS rounds" >&2
for run in $(seq 1 "$REPEATS"); do
  hit_run relay-off "$run"
  hit_run relay-on "$run"
done

python3 - "$work" "$N" "$C" "$SIZE" "$MAX_IN_FLIGHT" "$RATE" <<'PY'
import collections, json, statistics, sys
work, n, c, size, max_in_flight, rate = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
rss = {line.split()[0]: line.split()[1:] for line in open(f"{work}/rss.txt")}
print(f"\ncallback relay: N={n} callbacks, {size} B payload per callback")
print(f"{'run':<16} {'conc':>7} {'cb/s':>8} {'MiB/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'non-200':>12} {'err':>4} {'deliv/s':>8} {'delivered':>10} {'peak RSS':>9} {'CPU ms/cb':>9}")
for label in ("always", "always-rate", "always-deliver", "batch", "batch-rate", "batch-deliver", "batch-overload"):
    r = json.load(open(f"{work}/relay-{label}.json"))
    a, d = r["ack_us"], r.get("delivery")
    non200 = " ".join(f"{k}:{v}" for k, v in r["non_200"].items()) or "0"
    deliv = f"{d['per_s']:.1f}" if d else "-"
    delivered = f"{d['delivered']}/{d['routed']}" if d else "-"
    conc = f"@{r['rate']:.0f}/s" if r.get("rate") else str(r["concurrency"])
    print(f"{label:<16} {conc:>7} {r['callbacks_per_s']:>8.1f} {r['mib_per_s']:>7.1f} {a['p50']/1e3:>7.2f} {a['p90']/1e3:>7.2f} {a['p99']/1e3:>7.2f} {a['max']/1e3:>7.2f} {non200:>12} {r['errors']:>4} {deliv:>8} {delivered:>10} {rss[label][0] + ' MiB':>9} {rss[label][1]:>9}")
    if r.get("first_error"):
        print(f"  {label}: first error: {r['first_error']}")
print(f"(conc: closed-loop concurrency, or @R/s: open loop at R offered per second, latency from when")
print(f" each callback was due; cb/s: 200s per second; latency over every answer; peak RSS: the gateway process's VmHWM so far,")
print(f" embedded simulator included; CPU ms/cb: the gateway process's user + system CPU per callback")
print(f" posted, routing and delivery included in the -deliver rows; max_in_flight_bytes = {max_in_flight // 1048576} MiB)")
rows = collections.defaultdict(list)
for line in open(f"{work}/hits.txt"):
    parts = line.split()
    case, rps, p99 = parts[0], float(parts[2]), parts[3]
    unit = 1e-3 if p99.endswith("us") else (1.0 if p99.endswith("ms") else 1e3)
    rows[case].append((rps, float(p99.rstrip("usm")) * unit, int(parts[4]) if len(parts) > 4 else 0))
print(f"\nidentification cache hits (wrk -t1 -c64, medians of {len(rows['relay-off'])})")
print(f"{'case':<10} {'req/s':>10} {'p99 ms':>8} {'non-2xx':>8}")
med = {}
for case in ("relay-off", "relay-on"):
    v = rows[case]
    med[case] = statistics.median(x[0] for x in v)
    print(f"{case:<10} {med[case]:>10.0f} {statistics.median(x[1] for x in v):>8.2f} {sum(x[2] for x in v):>8}")
print(f"relay on / off: {med['relay-on'] / med['relay-off']:.2f}")
PY
