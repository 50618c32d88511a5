#!/usr/bin/env bash
# What the defences at the door cost: accept throughput with 20 sessions
# (smtp-source -s 20), first with no admission controls, then with two DNS
# blocklists and an allowlist asked for every connection and SPF checked
# (spf = "tag": headers added) for every message, through a real DNS server
# on loopback (examples/bench_dns.rs). Mail queues for a primary that is
# down, as during an outage.
#
#   benches/admission.sh           5,000 messages, 5 runs each
#   benches/admission.sh --smoke   200 messages, 1 run
set -euo pipefail
cd "$(dirname "$0")/.."

MESSAGES=5000 RUNS=5 SIZE=5120
if [ "${1:-}" = "--smoke" ]; then MESSAGES=200 RUNS=1; fi
export PATH="$PATH:/usr/sbin"
for tool in smtp-source curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install postfix curl)" >&2; exit 1; }
done

cargo build --release --locked --quiet --bin mxspool --example bench_dns
TARGET="${CARGO_TARGET_DIR:-target}/release"
WORK=$(mktemp -d)
SMTP=127.0.0.1:2635 HTTP=127.0.0.1:9635
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

"$TARGET/examples/bench_dns" > "$WORK/dns.addr" & PIDS+=("$!")
until [ -s "$WORK/dns.addr" ]; do sleep 0.01; done
DNS=$(cat "$WORK/dns.addr")

now() { date +%s.%N; }
stats() { sort -g | awk '{a[NR]=$1} END {printf "%.0f (min %.0f, max %.0f)", a[int((NR+1)/2)], a[1], a[NR]}'; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# $1: extra [server] keys, $2: extra [[domain]] keys. Prints the median
# accept rate.
run() {
  rm -f "$WORK/spool.redb"
  cat > "$WORK/config.toml" <<CONF
[server]
hostname = "mx2.bench.test"
listen = ["$SMTP"]
max_connections_per_ip = 1000
$1
[spool]
path = "$WORK/spool.redb"
[delivery]
nameservers = ["$DNS"]
health_interval = "off"
[http]
listen = "$HTTP"
[log]
level = "warn"
[[domain]]
name = "example.com"
route = "[127.0.0.1]:9"
${2:-}
CONF
  "$TARGET/mxspool" serve -c "$WORK/config.toml" 2>>"$WORK/serve.log" & local server=$!
  until curl -sf "http://$HTTP/readyz" >/dev/null; do
    kill -0 "$server" 2>/dev/null || { echo "mxspool did not start:" >&2; cat "$WORK/serve.log" >&2; exit 1; }
    sleep 0.01
  done
  local rates=()
  for _ in $(seq "$RUNS"); do
    local t0 t1
    t0=$(now)
    smtp-source -s 20 -m "$MESSAGES" -l "$SIZE" -f bench@origin.test -t user@example.com "$SMTP"
    t1=$(now)
    rates+=("$(echo "$MESSAGES / ($t1 - $t0)" | bc -l)")
  done
  echo "$(printf '%s\n' "${rates[@]}" | stats)" >&2
  kill "$server"; wait "$server" 2>/dev/null || true
  printf '%s\n' "${rates[@]}" | median
}

echo "admission cost: $MESSAGES messages of $SIZE bytes, 20 sessions, $RUNS runs, $(nproc) cores"
printf 'no admission controls: ' >&2
off=$(run "")
printf 'dnsbl (2 zones) + dnswl (1 zone) + spf = "tag": ' >&2
on=$(run 'dnsbl = ["bl1.bench.test*2", "bl2.bench.test=127.0.0.2"]
dnswl = ["wl.bench.test*-1"]' 'spf = "tag"')
echo "with DNS lists and SPF: $(echo "100 * $on / $off" | bc -l | xargs printf '%.0f')% of the rate without"
