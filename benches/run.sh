#!/usr/bin/env bash
# mxspool benchmark: accept rate at 1/20/100 sessions, drain rate, first
# delivery after the primary returns, RSS, restart time and /metrics latency,
# driven by Postfix's own load tools (smtp-source, smtp-sink).
#
#   benches/run.sh            full run (5,000 messages, 5 runs, 100,000 queued)
#   benches/run.sh --smoke    tiny counts, one run (CI uses this)
#   benches/run.sh --scale N  a backlog of N messages (benches/scale.sh)
#
# Needs Debian's postfix package for smtp-source and smtp-sink; the Postfix
# daemon itself is not used (and is stopped if the package started it).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--scale" ]; then exec benches/scale.sh "${2:?usage: benches/run.sh --scale N}"; fi

MESSAGES=5000 RUNS=5 BACKLOG=100000 SIZE=5120
if [ "${1:-}" = "--smoke" ]; then MESSAGES=200 RUNS=1 BACKLOG=2000; fi

export PATH="$PATH:/usr/sbin"   # where Debian puts smtp-source and smtp-sink
# smtp-sink drops root privileges to this user; it cannot as anyone else.
SINK_USER=(); [ "$(id -u)" -eq 0 ] && SINK_USER=(-u nobody)
for tool in smtp-source smtp-sink curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install postfix curl)" >&2; exit 1; }
done
postfix stop >/dev/null 2>&1 || true

cargo build --release --locked --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/mxspool"
WORK=$(mktemp -d)
SMTP=127.0.0.1:2625 HTTP=127.0.0.1:9625 SINK=127.0.0.1:2626
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

cat > "$WORK/config.toml" <<CONF
[server]
hostname = "mx2.bench.test"
listen = ["$SMTP"]
max_connections_per_ip = 1000
[spool]
path = "$WORK/spool.redb"
[http]
listen = "$HTTP"
[log]
level = "warn"
[[domain]]
name = "example.com"
route = "[127.0.0.1]:${SINK##*:}"
CONF

now() { date +%s.%N; }
metric() { curl -s "http://$HTTP/metrics" | awk -v m="$1" '$1==m {print $2}'; }
queued() { metric 'mxspool_queue_messages{domain="example.com"}'; }
start_server() {
  # As in the Docker image (see Dockerfile); MALLOC_ARENA_MAX= to compare.
  MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX-2} MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_-131072} "$BIN" serve -c "$WORK/config.toml" 2>>"$WORK/serve.log" &
  SERVER=$!; PIDS+=("$SERVER")
  until curl -sf "http://$HTTP/readyz" >/dev/null; do
    kill -0 "$SERVER" 2>/dev/null || { echo "mxspool did not start:" >&2; cat "$WORK/serve.log" >&2; exit 1; }
    sleep 0.01
  done
}
stop_server() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
stats() { sort -g | awk '{a[NR]=$1} END {printf "%.0f (min %.0f, max %.0f)", a[int((NR+1)/2)], a[1], a[NR]}'; }
wait_empty() { until [ "$(queued)" = "0" ]; do sleep 0.02; done; }

echo "mxspool benchmark: $MESSAGES messages of $SIZE bytes, $RUNS runs, $(nproc) cores"
start_server
for sessions in 1 20 100; do
  rates=()
  for _ in $(seq "$RUNS"); do
    t0=$(now)
    smtp-source -s "$sessions" -m "$MESSAGES" -l "$SIZE" -f bench@origin.test -t user@example.com "$SMTP"
    t1=$(now)
    rates+=("$(echo "$MESSAGES / ($t1 - $t0)" | bc -l)")
  done
  echo "accept, $sessions session(s): $(printf '%s\n' "${rates[@]}" | stats) msg/s"
done

# Drain and recovery: the primary comes back with mail waiting; no flush.
drains=() firsts=()
for _ in $(seq "$RUNS"); do
  smtp-source -s 20 -m "$MESSAGES" -l "$SIZE" -f bench@origin.test -t user@example.com "$SMTP"
  sleep 1   # let the first attempts find the primary down
  total=$(queued)
  t0=$(now)
  smtp-sink "${SINK_USER[@]}" "$SINK" 1000 >/dev/null 2>&1 & SINKPID=$!; PIDS+=("$SINKPID")
  until [ "$(queued)" -lt "$total" ]; do sleep 0.01; done
  t1=$(now)
  wait_empty
  t2=$(now)
  kill "$SINKPID"; wait "$SINKPID" 2>/dev/null || true
  firsts+=("$(echo "$t1 - $t0" | bc -l)")
  drains+=("$(echo "$total / ($t2 - $t1)" | bc -l)")
done
echo "drain to smtp-sink: $(printf '%s\n' "${drains[@]}" | stats) msg/s"
echo "first delivery after the primary returns: $(printf '%s\n' "${firsts[@]}" | median | xargs printf '%.2f') s"

# A large backlog: memory, scrape latency, restart time.
smtp-source -s 50 -m "$BACKLOG" -l "$SIZE" -f bench@origin.test -t user@example.com "$SMTP"
echo "queued: $(queued) messages"
echo "RSS with the backlog: $(( $(ps -o rss= -p "$SERVER") / 1024 )) MiB"
scrape=$(curl -s -o /dev/null -w '%{time_total}' "http://$HTTP/metrics")
echo "/metrics scrape: $(echo "$scrape * 1000" | bc -l | xargs printf '%.1f') ms"
stop_server
t0=$(now)
start_server
until (exec 3<>"/dev/tcp/${SMTP%:*}/${SMTP##*:}") 2>/dev/null; do sleep 0.01; done
t1=$(now)
echo "restart with the backlog until SMTP accepts: $(echo "$t1 - $t0" | bc -l | xargs printf '%.2f') s"
stop_server
