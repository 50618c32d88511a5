#!/usr/bin/env bash
# Drain across a slow link: mxspool and Postfix as backup MX, each with a
# backlog queued while the primary was down, draining to a primary that sits
# behind a latency proxy (benches/latency_proxy.py, default RTT 50 ms).
#
#   benches/wan.sh            2,000 messages of 5 KB, RTT 50 ms, both primaries,
#                             mxspool and Postfix side by side
#   benches/wan.sh --smoke    100 messages, RTT 20 ms; Postfix parts are skipped
#                             if the Postfix daemon cannot run here (not root)
#
# Environment: MESSAGES, RTT_MS, SIZE, RUNS (per figure, median reported),
# PRIMARIES ("sink chunking"), BACKUPS ("mxspool postfix"), MXSPOOL_BIN (a
# binary to measure instead of building this tree).
#
# Primaries: "sink" is Postfix's smtp-sink (PIPELINING, no CHUNKING);
# "chunking" is a throwaway Postfix instance (its smtpd offers PIPELINING and
# CHUNKING; all mail goes to the discard transport; queue on /dev/shm).
# The primary is "down" while the proxy is not running: connections to the
# routed port are refused. Time zero is the moment the proxy listens.
#
# Figures per run, all from the backup's own queue:
#   first     time zero -> first message gone from the backup's queue
#   all       time zero -> queue empty ("all delivered after")
#   drain     messages / (all - first)
#   RT/msg    bursts towards the primary seen at the proxy / messages, i.e.
#             round trips per message including connection setup, probes, QUIT
#   conns     connections to the primary: mean (connection-seconds at the
#             proxy / (all - first)) and peak
set -euo pipefail
cd "$(dirname "$0")/.."

MESSAGES=${MESSAGES:-2000} RTT_MS=${RTT_MS:-50} SIZE=${SIZE:-5120} RUNS=${RUNS:-1}
PRIMARIES=${PRIMARIES:-"sink chunking"} BACKUPS=${BACKUPS:-"mxspool postfix"}
SMOKE=0 DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-900}   # seconds; then exit 1
if [ "${1:-}" = "--smoke" ]; then
  SMOKE=1 MESSAGES=${SMOKE_MESSAGES:-100} RTT_MS=${SMOKE_RTT_MS:-20} RUNS=1
  DRAIN_TIMEOUT=${SMOKE_DRAIN_TIMEOUT:-120}
elif [ -n "${1:-}" ]; then
  sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2
fi

export PATH="$PATH:/usr/sbin"
for tool in smtp-source smtp-sink postfix postconf curl bc python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install postfix curl bc python3)" >&2; exit 1; }
done
SINK_USER=(); [ "$(id -u)" -eq 0 ] && SINK_USER=(-u nobody)

if [ -n "${MXSPOOL_BIN:-}" ]; then
  BIN=$MXSPOOL_BIN REV=$MXSPOOL_BIN
else
  cargo build --release --locked --quiet
  BIN="${CARGO_TARGET_DIR:-target}/release/mxspool"
  REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
fi

# Ports (all on 127.0.0.1): mxspool SMTP and HTTP, the proxy (every backup
# routes there), the two primaries, the Postfix backup's smtpd.
MX_SMTP=2711 MX_HTTP=2712 PROXY=2720 SINK=2721 CHUNKING=2722 PF_SMTP=2730
HOST=127.0.0.1

WORK=$(mktemp -d /tmp/mxspool-wan.XXXXXX); chmod 755 "$WORK"
# The CHUNKING primary's own queue writes are not what is measured: tmpfs.
SHM_BASE=/dev/shm; [ -d "$SHM_BASE" ] && [ -w "$SHM_BASE" ] || SHM_BASE=$WORK
PRIMARY_DIR=$(mktemp -d "$SHM_BASE/mxspool-wan-primary.XXXXXX"); chmod 755 "$PRIMARY_DIR"
PIDS=() POSTFIXES=() PROXY_PID="" SERVER=""

postfix_stop() {   # DIR
  local dir=$1 pid
  pid=$(cat "$dir/queue/pid/master.pid" 2>/dev/null | tr -d ' ') || true
  postfix -c "$dir/etc" stop >/dev/null 2>&1 || true
  [ -n "$pid" ] || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  postfix -c "$dir/etc" abort >/dev/null 2>&1 || true
}
cleanup() {
  local p d
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  for d in "${POSTFIXES[@]:-}"; do [ -n "$d" ] && postfix_stop "$d"; done
  rm -rf "$WORK" "$PRIMARY_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
fmt() { printf "%.${2:-2}f" "$1"; }
fail() { echo "wan.sh: $*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 500); do port_open "$1" && return 0; sleep 0.02; done; fail "nothing listens on $1"; }
forget() { local p=$1 i; for i in "${!PIDS[@]}"; do [ "${PIDS[$i]}" = "$p" ] && unset 'PIDS[i]'; done; true; }
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; forget "$1"; }

# A Postfix instance of its own: DIR/etc, DIR/queue, DIR/data, DIR/maillog.
# ROLE "primary": accept everything for example.com and discard it.
# ROLE "backup":  relay example.com to the proxy, Postfix defaults otherwise.
postfix_start() {   # DIR ROLE PORT
  local dir=$1 role=$2 port=$3
  mkdir -p "$dir/etc" "$dir/queue" "$dir/data"
  cp /etc/postfix/master.cf "$dir/etc/master.cf"
  cat > "$dir/etc/main.cf" <<CONF
compatibility_level = 3.6
queue_directory = $dir/queue
data_directory = $dir/data
maillog_file = $dir/maillog
maillog_file_prefixes = $dir
syslog_name = postfix-wan-$role
myhostname = $role.bench.test
inet_interfaces = loopback-only
inet_protocols = ipv4
mydestination =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
relay_domains = example.com
smtpd_peername_lookup = no
smtpd_tls_security_level = none
smtp_tls_security_level = none
CONF
  if [ "$role" = primary ]; then
    cat >> "$dir/etc/main.cf" <<CONF
relay_transport = discard:
default_transport = discard:
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
default_process_limit = 200
CONF
  else
    echo "transport_maps = inline:{ example.com=relay:[$HOST]:$PROXY }" >> "$dir/etc/main.cf"
  fi
  postconf -c "$dir/etc" -F '*/*/chroot = n'
  postconf -c "$dir/etc" -MX smtp/inet
  postconf -c "$dir/etc" -M "$HOST:$port/inet = $HOST:$port inet n - n - - smtpd"
  [ "$(id -u)" -eq 0 ] || { echo "not root" >&2; return 1; }
  chown postfix "$dir/data" || return 1
  POSTFIXES+=("$dir")
  postfix -c "$dir/etc" start >/dev/null 2>&1 || { cat "$dir/maillog" >&2 2>/dev/null; return 1; }
  wait_port "$port"
}
postfix_queued() {   # DIR: messages in the queue (not the defer logs)
  local q=$1/queue d n=0
  for d in incoming active deferred hold maildrop; do
    [ -d "$q/$d" ] && n=$((n + $(find "$q/$d" -type f | wc -l)))
  done
  echo "$n"
}

# The proxy: started when the primary "comes back", stopped after the drain.
proxy_start() {   # TARGET_PORT
  rm -f "$WORK/proxy.ready" "$WORK/proxy.json"
  python3 benches/latency_proxy.py --listen "$HOST:$PROXY" --target "$HOST:$1" \
    --rtt-ms "$RTT_MS" --stats "$WORK/proxy.json" --ready "$WORK/proxy.ready" &
  PROXY_PID=$!; PIDS+=("$PROXY_PID")
  for _ in $(seq 500); do [ -s "$WORK/proxy.ready" ] && return 0; sleep 0.01; done
  fail "the latency proxy did not start"
}
proxy_stop() { stop_pid "$PROXY_PID"; [ -s "$WORK/proxy.json" ] || fail "the proxy wrote no statistics"; }
proxy_stat() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, d))' "$WORK/proxy.json" "$1"; }

# Waits for COUNT-command to fall below TOTAL, then to reach 0; sets FIRST, ALL.
measure_drain() {   # T0 TOTAL COUNT-COMMAND...
  local t0=$1 total=$2 deadline n; shift 2
  deadline=$(echo "$t0 + $DRAIN_TIMEOUT" | bc)
  FIRST="" ALL=""
  while :; do
    n=$("$@")
    if [ -z "$FIRST" ] && [ -n "$n" ] && [ "$n" -lt "$total" ]; then FIRST=$(now); fi
    if [ "$n" = 0 ]; then ALL=$(now); break; fi
    if [ "$(echo "$(now) > $deadline" | bc)" = 1 ]; then
      echo "wan.sh: drain not complete after ${DRAIN_TIMEOUT}s, $n of $total still queued" >&2
      return 1
    fi
    sleep 0.02
  done
  [ -n "$FIRST" ] || FIRST=$ALL
}

# One line per run into $WORK/results:
#   BACKUP PRIMARY first all drain rt/msg connections mean-open peak-open
record() {   # BACKUP PRIMARY T0
  local first all span drain rtpm mean
  first=$(echo "$FIRST - $3" | bc -l); all=$(echo "$ALL - $3" | bc -l)
  span=$(awk -v a="$ALL" -v f="$FIRST" 'BEGIN { d = a - f; print (d < 0.02 ? 0.02 : d) }')
  drain=$(echo "$MESSAGES / $span" | bc -l)
  rtpm=$(proxy_stat "c2s['bursts'] / $MESSAGES")
  mean=$(proxy_stat "connection_seconds / $span")
  echo "$1 $2 $first $all $drain $rtpm $(proxy_stat connections) $mean $(proxy_stat max_concurrent_connections)" >> "$WORK/results"
  printf '  %-8s -> %-8s first %5.2f s  all %6.2f s  drain %7.1f msg/s  %5.2f RT/msg  %s connections, %.1f open on average, %s at most\n' \
    "$1" "$2" "$first" "$all" "$drain" "$rtpm" "$(proxy_stat connections)" "$mean" \
    "$(proxy_stat max_concurrent_connections)"
}

primary_port() { [ "$1" = sink ] && echo "$SINK" || echo "$CHUNKING"; }

# --- mxspool as the backup MX
metric() { curl -s "http://$HOST:$MX_HTTP/metrics" | awk -v m="$1" '$1==m {print $2}'; }
mx_queued() { metric 'mxspool_queue_messages{domain="example.com"}'; }
run_mxspool() {   # PRIMARY
  local dir="$WORK/mxspool" t0 delivered
  rm -rf "$dir"; mkdir -p "$dir"
  # Defaults apart from addresses, the route and the inbound per-IP cap
  # (smtp-source's 20 sessions come from one address).
  cat > "$dir/config.toml" <<CONF
[server]
hostname = "mx2.bench.test"
listen = ["$HOST:$MX_SMTP"]
max_connections_per_ip = 1000
[spool]
path = "$dir/spool.redb"
[http]
listen = "$HOST:$MX_HTTP"
[log]
level = "warn"
[[domain]]
name = "example.com"
route = "[$HOST]:$PROXY"
CONF
  MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX-2} MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_-131072} "$BIN" serve -c "$dir/config.toml" 2>>"$dir/serve.log" &
  SERVER=$!; PIDS+=("$SERVER")
  until curl -sf "http://$HOST:$MX_HTTP/readyz" >/dev/null; do
    kill -0 "$SERVER" 2>/dev/null || { cat "$dir/serve.log" >&2; fail "mxspool did not start"; }
    sleep 0.01
  done
  smtp-source -s 20 -m "$MESSAGES" -l "$SIZE" -f bench@origin.test -t user@example.com "$HOST:$MX_SMTP"
  [ "$(mx_queued)" = "$MESSAGES" ] || fail "mxspool queued $(mx_queued) of $MESSAGES"
  sleep 1   # let the first attempts find the primary down
  proxy_start "$(primary_port "$1")"; t0=$(now)
  measure_drain "$t0" "$MESSAGES" mx_queued || { proxy_stop; tail "$dir/serve.log" >&2; exit 1; }
  proxy_stop
  delivered=$(metric 'mxspool_recipients_delivered_total{domain="example.com"}')
  [ "$delivered" = "$MESSAGES" ] || { tail "$dir/serve.log" >&2; fail "mxspool delivered $delivered of $MESSAGES"; }
  record mxspool "$1" "$t0"
  stop_pid "$SERVER"
}

# --- Postfix as the backup MX
run_postfix() {   # PRIMARY
  local dir="$WORK/postfix" t0 sent
  postfix_start "$dir" backup "$PF_SMTP" || fail "the Postfix backup MX did not start"
  smtp-source -s 20 -m "$MESSAGES" -l "$SIZE" -f bench@origin.test -t user@example.com "$HOST:$PF_SMTP"
  # Wait until every message has been tried once and deferred.
  for _ in $(seq 3000); do
    [ "$(find "$dir/queue/deferred" -type f | wc -l)" = "$MESSAGES" ] && break; sleep 0.1
  done
  [ "$(postfix_queued "$dir")" = "$MESSAGES" ] || fail "Postfix queued $(postfix_queued "$dir") of $MESSAGES"
  sleep 1
  proxy_start "$(primary_port "$1")"; t0=$(now)
  postqueue -c "$dir/etc" -f
  measure_drain "$t0" "$MESSAGES" postfix_queued "$dir" || { proxy_stop; tail "$dir/maillog" >&2; exit 1; }
  proxy_stop
  sleep 0.5   # postlogd writes the log asynchronously
  sent=$(grep -c "relay=$HOST\[$HOST\]:$PROXY,.*status=sent" "$dir/maillog" || true)
  [ "$sent" = "$MESSAGES" ] || fail "Postfix delivered $sent of $MESSAGES"
  record postfix "$1" "$t0"
  postfix_stop "$dir"; rm -rf "$dir"
}

# --- primaries
echo "WAN drain benchmark: $MESSAGES messages of $SIZE bytes, RTT $RTT_MS ms, $RUNS run(s), $(nproc) cores, mxspool at $REV"
smtp-sink "${SINK_USER[@]}" "$HOST:$SINK" 1000 >/dev/null 2>&1 & PIDS+=($!)
wait_port "$SINK"
POSTFIX_OK=1
if ! postfix_start "$PRIMARY_DIR" primary "$CHUNKING" 2>"$WORK/postfix-start.err"; then
  POSTFIX_OK=0
  if [ "$SMOKE" = 1 ]; then
    echo "the Postfix daemon cannot run here ($(head -c 300 "$WORK/postfix-start.err")): smoke run without Postfix" >&2
    PRIMARIES=sink BACKUPS=mxspool
  else
    cat "$WORK/postfix-start.err" >&2; fail "the Postfix daemon cannot run here (it needs root)"
  fi
fi
if [ "$POSTFIX_OK" = 1 ]; then
  ehlo=$(python3 - "$CHUNKING" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
f = s.makefile("rwb")
f.readline(); f.write(b"EHLO wan.bench.test\r\n"); f.flush()
words = []
while True:
    line = f.readline().decode()
    words.append(line[4:].split(" ")[0].strip().upper())
    if line[3:4] != "-": break
f.write(b"QUIT\r\n"); f.flush(); print(" ".join(words[1:]))
PY
)
  echo "CHUNKING primary (Postfix smtpd) offers: $ehlo"
  case " $ehlo " in *" CHUNKING "*) ;; *) fail "the Postfix primary does not offer CHUNKING";; esac
  case " $ehlo " in *" PIPELINING "*) ;; *) fail "the Postfix primary does not offer PIPELINING";; esac
fi

: > "$WORK/results"
for primary in $PRIMARIES; do
  for backup in $BACKUPS; do
    for _ in $(seq "$RUNS"); do "run_$backup" "$primary"; done
  done
done

# --- summary: medians per (backup, primary), and mxspool / Postfix
echo
echo "Drain across a $RTT_MS ms link, $MESSAGES messages of $SIZE bytes (median of $RUNS; mxspool at $REV)"
python3 - "$WORK/results" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
res = {}
for b, p, first, all_, drain, rtpm, conns, mean, peak in rows:
    res.setdefault((b, p), []).append(
        (float(first), float(all_), float(drain), float(rtpm), float(mean), int(peak)))
def med(v, i): return statistics.median(x[i] for x in v)
print(f"{'backup':8} {'primary':9} {'drain msg/s':>11} {'RT/msg':>7} {'first s':>8} {'all s':>7} {'conns mean/peak':>16}")
for (b, p), v in res.items():
    conns = f"{med(v,4):.1f}/{med(v,5):.0f}"
    print(f"{b:8} {p:9} {med(v,2):11.1f} {med(v,3):7.2f} {med(v,0):8.2f} {med(v,1):7.2f} {conns:>16}")
for p in dict.fromkeys(p for _, p in res):
    if ("mxspool", p) in res and ("postfix", p) in res:
        m, f = res[("mxspool", p)], res[("postfix", p)]
        print(f"mxspool/Postfix, {p}: drain {med(m,2)/med(f,2):.2f}x, all delivered after {med(m,1)/med(f,1):.2f}x the time")
PY
