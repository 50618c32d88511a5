#!/usr/bin/env bash
# mxspool at scale: a backlog of N messages of 5 KB (the primary down while
# they arrive, then back), on one machine, driven by Postfix's smtp-source
# and smtp-sink. Reports what an operator of a small VPS needs to know:
#   - accept rate, per tenth of the backlog (does it degrade as the spool grows?)
#   - server RSS at rest, while `mxspool queue list` walks every message, and
#     while draining; /metrics scrape time
#   - restart time until SMTP answers, and until the first delivery
#   - drain rate; spool file size when full, after the drain, and after the
#     idle compaction
#
#   benches/scale.sh 100000       (also: benches/run.sh --scale 100000)
#   benches/scale.sh 1000000      (about 25 minutes and 12 GB of disk here)
#
# Needs Debian's postfix package (smtp-source, smtp-sink) and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:?usage: benches/scale.sh N}
SIZE=5120
SESSIONS=20

export PATH="$PATH:/usr/sbin"
SINK_USER=(); [ "$(id -u)" -eq 0 ] && SINK_USER=(-u nobody)
for tool in smtp-source smtp-sink curl bc; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install postfix curl bc)" >&2; exit 1; }
done
postfix stop >/dev/null 2>&1 || true

cargo build --release --locked --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/mxspool"
WORK=$(mktemp -d "${SCALE_DIR:-${TMPDIR:-/tmp}}/mxspool-scale.XXXXXX")
SMTP=127.0.0.1:2725 HTTP=127.0.0.1:9725 SINK=127.0.0.1:2726
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
max_size = 107374182400
[delivery]
# The primary is found again within a second of coming back.
probe_interval = "1s"
[http]
listen = "$HTTP"
admin_token_file = "$WORK/admin-token"
[log]
level = "warn,mxspool::spool=info"
[[domain]]
name = "example.com"
route = "[127.0.0.1]:${SINK##*:}"
CONF

now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc -l; }
metric() { curl -s "http://$HTTP/metrics" | awk -v m="$1" '$1==m {print $2}'; }
queued() { metric 'mxspool_queue_messages{domain="example.com"}'; }
rss_mib() { awk '/^VmRSS/ {printf "%.0f", $2/1024}' "/proc/$SERVER/status"; }
file_mib() { echo "$(stat -c %s "$WORK/spool.redb") / 1048576" | bc; }
# Blocks the file really has on disk (redb grows it in steps, sparsely).
disk_mib() { echo "$(stat -c '%b * %B' "$WORK/spool.redb") / 1048576" | bc; }
start_server() {
  MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX-2} MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_-131072} \
    "$BIN" serve -c "$WORK/config.toml" 2>>"$WORK/serve.log" &
  SERVER=$!; PIDS+=("$SERVER")
}
wait_smtp() {
  until (exec 3<>"/dev/tcp/${SMTP%:*}/${SMTP##*:}") 2>/dev/null; do
    kill -0 "$SERVER" 2>/dev/null || { echo "mxspool did not start:" >&2; cat "$WORK/serve.log" >&2; exit 1; }
    sleep 0.01
  done
}
wait_ready() { until curl -sf "http://$HTTP/readyz" >/dev/null; do sleep 0.01; done; }
stop_server() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; }
# Highest RSS (MiB) of the server while "$@" runs, sampled every 0.1 s.
PEAK=0
peak_during() {
  local sample="$WORK/peak"
  echo 0 > "$sample"
  ( peak=0
    while :; do
      r=$(awk '/^VmRSS/ {print $2}' "/proc/$SERVER/status" 2>/dev/null || echo 0)
      [ "${r:-0}" -gt "$peak" ] && { peak=$r; echo "$peak" > "$sample"; }
      sleep 0.1
    done ) & local sampler=$!
  "$@"
  kill "$sampler"; wait "$sampler" 2>/dev/null || true
  PEAK=$(( $(cat "$sample") / 1024 ))
}

echo "mxspool at scale: $N messages of $SIZE bytes, $SESSIONS sessions, $(nproc) cores"
start_server; wait_ready
echo "RSS empty: $(rss_mib) MiB"

# Accept in tenths, the primary down (nothing listens on the route).
CHUNK=$(( N / 10 ))
rates=()
t_all=$(now)
for i in $(seq 10); do
  t0=$(now)
  smtp-source -s "$SESSIONS" -m "$CHUNK" -l "$SIZE" -f bench@origin.test -t user@example.com "$SMTP"
  t1=$(now)
  rates+=("$(echo "$CHUNK / ($t1 - $t0)" | bc -l | xargs printf '%.0f')")
done
t_end=$(now)
TOTAL=$(( CHUNK * 10 ))
echo "accept: $(echo "$TOTAL / ($t_end - $t_all)" | bc -l | xargs printf '%.0f') msg/s overall; per tenth: ${rates[*]}"
until [ "$(queued)" = "$TOTAL" ]; do sleep 0.1; done
sleep 5
PAYLOAD=$(( TOTAL * SIZE / 1048576 ))
FULL=$(disk_mib)
echo "queued: $(queued); spool file $FULL MiB on disk ($(file_mib) MiB long) for $PAYLOAD MiB of messages ($(echo "$FULL / $PAYLOAD" | bc -l | xargs printf '%.2f')x)"
echo "RSS at rest: $(rss_mib) MiB"
scrapes=()
for _ in 1 2 3 4 5; do scrapes+=("$(curl -s -o /dev/null -w '%{time_total}' "http://$HTTP/metrics")"); done
echo "/metrics scrape: $(printf '%s\n' "${scrapes[@]}" | sort -g | sed -n 3p | xargs -I{} echo "{} * 1000" | bc -l | xargs printf '%.1f') ms (median of 5)"

# Listing every message through the CLI, as an operator would.
list() { "$BIN" queue list -c "$WORK/config.toml" > "$WORK/list.txt"; }
t0=$(now)
peak_during list
t1=$(now)
echo "queue list of every message: $(elapsed "$t0" "$t1" | xargs printf '%.1f') s, $(wc -l < "$WORK/list.txt") lines; server RSS peak $PEAK MiB, after $(rss_mib) MiB"

# Restart with the backlog, the primary up: SMTP, then the first delivery.
stop_server
smtp-sink "${SINK_USER[@]}" "$SINK" 1000 >/dev/null 2>&1 & SINKPID=$!; PIDS+=("$SINKPID")
t0=$(now)
start_server
wait_smtp
t1=$(now)
wait_ready
until [ "$(queued)" -lt "$TOTAL" ] 2>/dev/null; do sleep 0.01; done
t2=$(now)
echo "restart with $TOTAL queued: SMTP answers after $(elapsed "$t0" "$t1" | xargs printf '%.2f') s, first delivery after $(elapsed "$t0" "$t2" | xargs printf '%.2f') s"

# The drain, from that first delivery.
# Queued messages every 10 s of the drain, to see whether it slows down.
CURVE=()
drain() {
  local last=$SECONDS
  until [ "$(queued)" = "0" ]; do
    sleep 0.1
    if [ $((SECONDS - last)) -ge 10 ]; then last=$SECONDS; CURVE+=("$(queued)"); fi
  done
}
peak_during drain
t3=$(now)
echo "drain: $(echo "$TOTAL / ($t3 - $t2)" | bc -l | xargs printf '%.0f') msg/s; server RSS peak $PEAK MiB; queued every 10 s: ${CURVE[*]:-}"
echo "spool file after the drain: $(disk_mib) MiB on disk ($(file_mib) MiB long)"
for _ in $(seq 60); do sleep 1; [ "$(file_mib)" -le 64 ] && break; done
sleep 2   # the filesystem frees a large truncated file's blocks in the background
echo "spool file 60 s later (idle compaction): $(disk_mib) MiB on disk ($(file_mib) MiB long); RSS $(rss_mib) MiB"
grep -h "spool compacted" "$WORK/serve.log" | tail -1 | sed 's/^/compaction: /' || true
stop_server
echo "spool file after stop: $(disk_mib) MiB on disk"
