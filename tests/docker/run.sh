#!/usr/bin/env bash
# Builds the Docker image from the repository's Dockerfile and proves that it
# works: mail through the published SMTP port reaches a primary, the image's
# HEALTHCHECK turns healthy, the server runs as uid 10025, the spool in a named
# volume survives `docker restart`, `docker stop` is graceful and loses nothing,
# a bad configuration exits 2 naming the file and the key, and
# `docker exec … mxspool queue list` works.
#
# Usage (as root, from anywhere):   bash tests/docker/run.sh
#
# Needs: Debian (bookworm or later) with apt, a Rust toolchain (rustup's
# stable, or whatever `rustc --print sysroot` names; or set RUST_SYSROOT) and
# python3 (installed if missing). Without a Docker engine that answers, it
# installs Debian's docker.io (and debootstrap) with apt-get and starts its own
# dockerd (vfs storage, no bridge, no iptables), stopped again at the end; a
# running engine is used as it is. Containers use the host network only.
# No registry is needed: the two base images the Dockerfile names are built
# locally when missing: debian:bookworm-slim with debootstrap from the Debian
# mirror of this machine's apt sources (or $DEBIAN_MIRROR), the Rust image
# from that plus this machine's toolchain and CA bundle ($SSL_CERT_FILE, else
# /etc/ssl/certs/ca-certificates.crt), so that cargo in the build reaches
# crates.io. Both are kept for the next run. The build stage and other
# dangling images this run made are removed at the end (vfs stores each layer
# in full); MXSPOOL_DOCKER_KEEP_CACHE=1 keeps them, so that the next build of
# unchanged sources takes seconds. MXSPOOL_DOCKER_SKIP_BUILD=1 tests the
# existing image (MXSPOOL_DOCKER_IMAGE, default mxspool:test) without building.
#
# Takes (2 cores): about 8 minutes without the base images (1 minute for them,
# 5 to 7 for the release build), about 5 minutes with them; the checks take
# 15 seconds. Docker's root peaks at about 13 GB during the build and keeps
# about 2.6 GB (base images and the test image) afterwards.
#
# Prints one PASS/FAIL line per check; exits 0 iff all passed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$REPO/tests/docker"
IMAGE=${MXSPOOL_DOCKER_IMAGE:-mxspool:test}
export PATH="$PATH:/usr/sbin:/sbin"
export DOCKER_BUILDKIT=0          # the classic builder: same on every engine, --network host works
T0=$SECONDS

WORK=$(mktemp -d /tmp/mxspool-docker.XXXXXX)
chmod 755 "$WORK"
NAME="mxspool-dtest-$$"
DOCKER=docker
DOCKERD_PID=""
SINK_PID=""
CONTAINERS=()
VOLUMES=()
DANGLING_BEFORE=""
FAILS=0
CHECKS=0
APT_UPDATED=0

step() { echo; echo "=== [$(( SECONDS - T0 ))s] $*"; }
info() { echo "    $*"; }
pass() { CHECKS=$((CHECKS + 1)); echo "PASS: $*"; }
fail() { CHECKS=$((CHECKS + 1)); FAILS=$((FAILS + 1)); echo "FAIL: $*"; }
die() { echo "ERROR: $*" >&2; exit 1; }

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  step "cleanup"
  [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null && wait "$SINK_PID" 2>/dev/null
  local c v
  for c in "${CONTAINERS[@]}"; do
    if [ "$rc" -ne 0 ] || [ "$FAILS" -ne 0 ]; then
      if $DOCKER inspect "$c" >/dev/null 2>&1; then
        echo "--- last log lines of container $c"
        $DOCKER logs --tail 30 "$c" 2>&1 | sed 's/^/    /'
      fi
    fi
    $DOCKER rm -f -v "$c" >/dev/null 2>&1
  done
  for v in "${VOLUMES[@]}"; do $DOCKER volume rm -f "$v" >/dev/null 2>&1; done
  if [ -z "${MXSPOOL_DOCKER_KEEP_CACHE:-}" ] && $DOCKER info >/dev/null 2>&1; then
    # Dangling images this run left (the build stage, a replaced test image):
    # vfs stores every layer in full, so they are gigabytes.
    local now new=()
    now=$($DOCKER images -q --no-trunc -f dangling=true 2>/dev/null | sort -u)
    while read -r v; do
      [ -n "$v" ] && ! grep -qx "$v" <<<"$DANGLING_BEFORE" && new+=("$v")
    done <<<"$now"
    [ "${#new[@]}" -gt 0 ] && $DOCKER rmi "${new[@]}" >/dev/null 2>&1
    $DOCKER builder prune -f >/dev/null 2>&1
    info "removed ${#new[@]} dangling image(s) and the build cache (base images and $IMAGE kept)"
  fi
  if $DOCKER info >/dev/null 2>&1; then
    info "Docker disk use now:"
    $DOCKER system df | sed 's/^/      /'
    local root
    root=$($DOCKER info -f '{{.DockerRootDir}}' 2>/dev/null)
    [ -n "$root" ] && [ -d "$root" ] && info "du $root: $(du -sxh "$root" 2>/dev/null | cut -f1)"
  fi
  # debootstrap may leave /proc or /sys mounted in its target after a failure.
  if [ -d "$WORK" ]; then
    findmnt -rn -o TARGET 2>/dev/null | grep "^$WORK/" | sort -r | while read -r m; do umount -l "$m"; done
    rm -rf --one-file-system "$WORK"
  fi
  if [ -n "$DOCKERD_PID" ]; then
    info "stopping the dockerd this script started (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID"
  fi
  df -h / | sed 's/^/    /'
  echo
  if [ "$rc" -eq 0 ] && [ "$FAILS" -eq 0 ]; then
    echo "ALL $CHECKS CHECKS PASSED in $(( SECONDS - T0 ))s"
  else
    echo "FAILED: $FAILS of $CHECKS checks failed (exit status $rc) after $(( SECONDS - T0 ))s"
    [ "$rc" -eq 0 ] && rc=1
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

apt_install() {
  [ "$(id -u)" -eq 0 ] || die "need the Debian packages $* (run as root, or install them first)"
  export DEBIAN_FRONTEND=noninteractive
  if [ "$APT_UPDATED" -eq 0 ]; then apt-get update -qq; APT_UPDATED=1; fi
  info "apt-get install $*"
  apt-get install -y -qq --no-install-recommends "$@" >"$WORK/apt.log" 2>&1 \
    || { tail -n 30 "$WORK/apt.log"; die "apt-get install $* failed"; }
}

# Runs a command with its output in a log file, showing only the lines that
# match $2; on failure shows the log's tail.
run_logged() {
  local log=$1 show=$2 rc
  shift 2
  set +e
  "$@" 2>&1 | tee "$log" | grep --line-buffered -E "$show" | sed -u 's/^/    /'
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "--- last lines of $log"
    tail -n 60 "$log"
  fi
  return "$rc"
}

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------------------
step "1. Docker engine"
command -v python3 >/dev/null 2>&1 || apt_install python3
engine_ok() { "$1" version --format '{{.Server.Version}}' >/dev/null 2>&1; }
if engine_ok docker; then
  DOCKER=docker
elif [ -x /usr/bin/docker ] && engine_ok /usr/bin/docker; then
  DOCKER=/usr/bin/docker
else
  command -v dockerd >/dev/null 2>&1 || apt_install docker.io
  info "no Docker engine answers: starting dockerd (log: $WORK/dockerd.log)"
  dockerd --storage-driver=vfs --bridge=none --iptables=false >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 60); do
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    docker info >/dev/null 2>&1 && break
    /usr/bin/docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
    tail -n 30 "$WORK/dockerd.log"
    DOCKERD_PID=""
    die "dockerd exited at start (see the log above)"
  fi
  # Debian's client matches Debian's daemon; another client on PATH is used
  # only if it speaks to it too.
  if [ -x /usr/bin/docker ] && engine_ok /usr/bin/docker; then
    DOCKER=/usr/bin/docker
  elif engine_ok docker; then
    DOCKER=docker
  else
    tail -n 30 "$WORK/dockerd.log"
    die "dockerd started but no docker client can talk to it"
  fi
fi
info "client $DOCKER $($DOCKER version --format '{{.Client.Version}}'), engine $($DOCKER version --format '{{.Server.Version}}') ($($DOCKER info --format '{{.Driver}}') storage)"
DANGLING_BEFORE=$($DOCKER images -q --no-trunc -f dangling=true | sort -u)
df -h / | sed 's/^/    /'

# ---------------------------------------------------------------------------
step "2. Base images"
RUNTIME_BASE=$(awk 'toupper($1)=="FROM" && tolower($3)!="as" {print $2}' "$REPO/Dockerfile" | tail -n 1)
BUILD_BASE=$(awk 'toupper($1)=="FROM" && tolower($3)=="as" && $4=="build" {print $2}' "$REPO/Dockerfile")
[ -n "$RUNTIME_BASE" ] && [ -n "$BUILD_BASE" ] || die "cannot find the base images in the Dockerfile"
info "Dockerfile: build stage FROM $BUILD_BASE, runtime FROM $RUNTIME_BASE"
case "$RUNTIME_BASE$BUILD_BASE" in
  *@sha256:*) die "the Dockerfile pins a digest: a local stand-in cannot match it; pull the images first" ;;
esac

# The Debian mirror this machine's apt uses (deb822 .sources first, then
# sources.list), never a security mirror.
apt_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; uris = ""; on = 1
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^Types:/) types = $i
          if ($i ~ /^URIs:/) uris = $i
          if ($i ~ /^Enabled:[ \t]*no/) on = 0
        }
        if (!on || types !~ /[ \t]deb([ \t]|$)/) next
        sub(/^URIs:[ \t]*/, "", uris)
        n = split(uris, u, /[ \t]+/)
        for (k = 1; k <= n; k++)
          if (u[k] ~ /^https?:\/\// && u[k] !~ /security/ && u[k] ~ /debian\/?$/) { print u[k]; exit }
      }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    awk '$1 == "deb" {
        for (i = 2; i <= NF; i++) {
          if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; continue }
          if ($i ~ /^https?:\/\// && $i !~ /security/ && $i ~ /debian\/?$/) print $i
          break
        }
      }' "$f"
  done
}

if $DOCKER image inspect "$RUNTIME_BASE" >/dev/null 2>&1; then
  info "$RUNTIME_BASE: present"
else
  MIRROR=${DEBIAN_MIRROR:-$(apt_mirror | head -n 1)}
  [ -n "$MIRROR" ] || die "no Debian mirror in /etc/apt/sources.list{,.d/*}: set DEBIAN_MIRROR"
  SUITE=${RUNTIME_BASE#*:}; SUITE=${SUITE%%-*}          # debian:bookworm-slim -> bookworm
  command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
  info "building $RUNTIME_BASE: debootstrap --variant=minbase $SUITE from $MIRROR (log: $WORK/debootstrap.log)"
  t=$SECONDS
  ROOTFS="$WORK/rootfs"
  run_logged "$WORK/debootstrap.log" '^I: (Retrieving Release|Installing core|Base system)' \
    debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR"
  # As in the official slim image: no package cache, no lists.
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/lib/apt/lists/*
  tar -C "$ROOTFS" -c . | $DOCKER import \
    --change 'CMD ["bash"]' \
    --change "LABEL org.opencontainers.image.description=\"local stand-in for $RUNTIME_BASE (debootstrap, tests/docker/run.sh)\"" \
    - "$RUNTIME_BASE" >/dev/null
  rm -rf --one-file-system "$ROOTFS"
  info "$RUNTIME_BASE built in $(( SECONDS - t ))s"
fi

if $DOCKER image inspect "$BUILD_BASE" >/dev/null 2>&1; then
  info "$BUILD_BASE: present"
else
  SYSROOT=${RUST_SYSROOT:-}
  if [ -z "$SYSROOT" ]; then
    if [ -d "${HOME:-/root}/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/bin" ]; then
      SYSROOT="${HOME:-/root}/.rustup/toolchains/stable-x86_64-unknown-linux-gnu"
    else
      SYSROOT=$(rustc --print sysroot 2>/dev/null) || die "no Rust toolchain (rustup stable, or rustc on PATH)"
    fi
  fi
  [ -x "$SYSROOT/bin/cargo" ] && [ -x "$SYSROOT/bin/rustc" ] || die "$SYSROOT has no bin/cargo and bin/rustc"
  HOST=$("$SYSROOT/bin/rustc" -vV | sed -n 's/^host: //p')
  RUST_VERSION=$("$SYSROOT/bin/rustc" -vV | sed -n 's/^release: //p')
  WANT=${BUILD_BASE#*:}; WANT=${WANT%%-*}               # rust:1.95-slim-bookworm -> 1.95
  case "$RUST_VERSION" in
    "$WANT" | "$WANT".*) ;;
    *) echo "WARNING: the Dockerfile asks for Rust $WANT, this machine has $RUST_VERSION: $BUILD_BASE gets $RUST_VERSION" ;;
  esac
  CA=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
  [ -r "$CA" ] || die "no CA bundle at $CA (set SSL_CERT_FILE)"
  info "building $BUILD_BASE FROM $RUNTIME_BASE with Rust $RUST_VERSION ($SYSROOT) and $CA"
  t=$SECONDS
  CTX="$WORK/rust-image"
  mkdir -p "$CTX/rootfs/usr/local/rust/bin" "$CTX/rootfs/usr/local/rust/lib/rustlib" "$CTX/rootfs/etc/ssl/certs"
  # Only what cargo and rustc need (no docs, sources, clippy, rustfmt);
  # hard links where possible, so nothing is copied on the same filesystem.
  copy() { cp -al "$@" 2>/dev/null || cp -a "$@"; }
  copy "$SYSROOT/bin/cargo" "$SYSROOT/bin/rustc" "$CTX/rootfs/usr/local/rust/bin/"
  copy "$SYSROOT"/lib/*.so* "$CTX/rootfs/usr/local/rust/lib/"
  copy "$SYSROOT/lib/rustlib/$HOST" "$CTX/rootfs/usr/local/rust/lib/rustlib/"
  cp -L "$CA" "$CTX/rootfs/etc/ssl/certs/ca-certificates.crt"
  chmod 644 "$CTX/rootfs/etc/ssl/certs/ca-certificates.crt"
  cat >"$CTX/Dockerfile" <<EOF
FROM $RUNTIME_BASE
LABEL org.opencontainers.image.description="local stand-in for $BUILD_BASE (tests/docker/run.sh)"
COPY rootfs/ /
ENV CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=$RUST_VERSION \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \\
    CARGO_HTTP_CAINFO=/etc/ssl/certs/ca-certificates.crt
RUN apt-get update \\
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config \\
 && rm -rf /var/lib/apt/lists/* \\
 && cargo --version && rustc --version
EOF
  run_logged "$WORK/rust-image.log" '^(Step [0-9]+/|Successfully|cargo [0-9]|rustc [0-9])' \
    $DOCKER build --network host --force-rm -t "$BUILD_BASE" "$CTX"
  rm -rf "$CTX"
  info "$BUILD_BASE built in $(( SECONDS - t ))s"
fi

# ---------------------------------------------------------------------------
step "3. docker build -t $IMAGE ."
# The build context is what .dockerignore leaves of the repository: target/
# alone is tens of GB. Check what it excludes and measure the rest before
# anything is sent to the engine.
python3 - "$REPO" <<'PY'
import os, re, sys
root = sys.argv[1]
pats = []
for line in open(os.path.join(root, ".dockerignore")):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    neg = line.startswith("!")
    line = os.path.normpath(line[1:] if neg else line).lstrip("/")
    rx, i = "", 0
    while i < len(line):
        if line.startswith("**/", i): rx += "(?:.*/)?"; i += 3
        elif line.startswith("**", i): rx += ".*"; i += 2
        elif line[i] == "*": rx += "[^/]*"; i += 1
        elif line[i] == "?": rx += "[^/]"; i += 1
        else: rx += re.escape(line[i]); i += 1
    pats.append((re.compile(rx + r"\Z"), neg))

def excluded(rel):
    parts, out = rel.split("/"), False
    for rx, neg in pats:
        if any(rx.match("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            out = not neg
    return out

must = ["target", "target/release/mxspool", "fuzz/target", "fuzz/corpus", "tests/console/node_modules",
        "data", "data/spool.redb", "spool.redb", "benches/spool.redb", ".git"]
missing = [p for p in must if not excluded(p)]
if missing:
    sys.exit("FAIL: .dockerignore does not exclude: " + ", ".join(missing))
total, sizes = 0, {}
for d, dirs, files in os.walk(root):
    reld = os.path.relpath(d, root)
    reld = "" if reld == "." else reld + "/"
    dirs[:] = [x for x in dirs if not excluded(reld + x)]
    for f in files:
        if not excluded(reld + f):
            n = os.lstat(os.path.join(d, f)).st_size
            total += n
            top = (reld + f).split("/")[0]
            sizes[top] = sizes.get(top, 0) + n
print("    build context: %.1f MB (%s)" % (total / 1e6, ", ".join(
    "%s %.1f MB" % kv for kv in sorted(((k, v / 1e6) for k, v in sizes.items()), key=lambda kv: -kv[1])[:4])))
if total > 50e6:
    sys.exit("FAIL: the build context is over 50 MB: extend .dockerignore")
PY
pass ".dockerignore keeps the build context small (target/, fuzz/, data/, *.redb excluded)"
t=$SECONDS
if [ -n "${MXSPOOL_DOCKER_SKIP_BUILD:-}" ] && $DOCKER image inspect "$IMAGE" >/dev/null 2>&1; then
  info "MXSPOOL_DOCKER_SKIP_BUILD: testing the existing $IMAGE"
else
  run_logged "$WORK/build.log" '^(Step [0-9]+/|Successfully|Sending build context|error)' \
    $DOCKER build --network host --force-rm -t "$IMAGE" "$REPO"
  info "built in $(( SECONDS - t ))s: $($DOCKER image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
fi
df -h / | sed 's/^/    /'

# ---------------------------------------------------------------------------
step "4. Run the image"
SMTP_PORT=$(free_port); HTTP_PORT=$(free_port); SINK_PORT=$(free_port)
while [ "$HTTP_PORT" = "$SMTP_PORT" ]; do HTTP_PORT=$(free_port); done
while [ "$SINK_PORT" = "$SMTP_PORT" ] || [ "$SINK_PORT" = "$HTTP_PORT" ]; do SINK_PORT=$(free_port); done
info "ports on 127.0.0.1: SMTP $SMTP_PORT, HTTP $HTTP_PORT, primary (sink) $SINK_PORT"
mkdir -p "$WORK/conf" "$WORK/sink"
CONFIG="$WORK/conf/config.toml"
cat >"$CONFIG" <<EOF
# tests/docker/run.sh: backup MX for example.com, primary on loopback.
[server]
hostname = "mx2.test"
listen = ["127.0.0.1:$SMTP_PORT"]

[spool]
path = "/var/lib/mxspool/spool.redb"

[delivery]
probe_interval = "1s"
tls = "none"

[http]
listen = "127.0.0.1:$HTTP_PORT"
admin_token_file = "/var/lib/mxspool/admin-token"

[log]
format = "json"

[[domain]]
name = "example.com"
route = "[127.0.0.1]:$SINK_PORT"
EOF
sed 's/^\[server\]$/[server]\ncommand_timeout = "soon"/' "$CONFIG" >"$WORK/conf/bad.toml"
grep -q '^command_timeout = "soon"$' "$WORK/conf/bad.toml" || die "cannot write the bad config"
chmod 644 "$CONFIG" "$WORK/conf/bad.toml"

sink_start() {
  rm -f "$WORK/sink/.ready"
  python3 "$HERE/smtp_helper.py" sink 127.0.0.1 "$SINK_PORT" "$WORK/sink" >>"$WORK/sink.log" 2>&1 &
  SINK_PID=$!
  for _ in $(seq 1 50); do [ -f "$WORK/sink/.ready" ] && return 0; sleep 0.1; done
  die "the SMTP sink did not start (see $WORK/sink.log)"
}
sink_stop() {
  [ -n "$SINK_PID" ] || return 0
  kill "$SINK_PID" 2>/dev/null || true
  wait "$SINK_PID" 2>/dev/null || true
  SINK_PID=""
}
# Distinct messages with X-Test-Id TAG or TAG-<n> the primary received.
delivered() {
  { grep -rhaE --include='*.eml' "^X-Test-Id: $1(-[0-9]+)?"$'\r?$' "$WORK/sink" || true; } | tr -d '\r' | sort -u | wc -l
}
# wait_delivered TAG COUNT SECONDS
wait_delivered() {
  local end=$((SECONDS + $3))
  while [ "$SECONDS" -lt "$end" ]; do
    [ "$(delivered "$1")" -ge "$2" ] && return 0
    sleep 0.5
  done
  return 1
}
# send TAG COUNT: through the published SMTP port; every message must get 250.
send() {
  python3 "$HERE/smtp_helper.py" send 127.0.0.1 "$SMTP_PORT" "$1" "$2" >"$WORK/send-$1.log" 2>&1
}
queue_ids() {
  $DOCKER exec "$1" mxspool queue list --json \
    | python3 -c 'import json, sys; [print(m["id"]) for m in json.load(sys.stdin)["messages"]]'
}
start_container() {
  local name=$1
  $DOCKER run -d --name "$name" --network host \
    -v "$VOLUME:/var/lib/mxspool" -v "$CONFIG:/etc/mxspool/config.toml:ro" \
    --health-interval=2s --health-timeout=5s --health-start-period=30s --health-retries=3 \
    "$IMAGE" >/dev/null
  CONTAINERS+=("$name")
}
# Until `mxspool health` answers inside the container (the server is up).
wait_up() {
  local end=$((SECONDS + ${2:-30}))
  while [ "$SECONDS" -lt "$end" ]; do
    $DOCKER exec "$1" mxspool health >/dev/null 2>&1 && return 0
    [ "$($DOCKER inspect -f '{{.State.Running}}' "$1")" = true ] || return 1
    sleep 0.5
  done
  return 1
}

VOLUME="$NAME-spool"
$DOCKER volume create "$VOLUME" >/dev/null
VOLUMES+=("$VOLUME")
sink_start
C1="$NAME-1"
start_container "$C1"
info "container $C1 with volume $VOLUME"

# HEALTHCHECK: the image's own command, on a shorter interval.
t=$SECONDS; status=""
while [ $((SECONDS - t)) -lt 60 ]; do
  status=$($DOCKER inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$C1")
  [ "$status" = healthy ] && break
  [ "$($DOCKER inspect -f '{{.State.Running}}' "$C1")" = true ] || break
  sleep 1
done
image_test=$($DOCKER image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMAGE")
run_test=$($DOCKER inspect -f '{{json .Config.Healthcheck.Test}}' "$C1")
if [ "$status" = healthy ] && [ "$image_test" = '["CMD","mxspool","health"]' ] \
   && { [ "$run_test" = "$image_test" ] || [ "$run_test" = null ] || [ "$run_test" = '[]' ]; }; then
  pass "HEALTHCHECK $image_test turned healthy after $((SECONDS - t))s"
else
  fail "HEALTHCHECK: status '$status' after $((SECONDS - t))s (image test $image_test, container test $run_test)"
  $DOCKER inspect -f '{{json .State.Health}}' "$C1" | head -c 2000; echo
fi

# Unprivileged: the exec'd shell and PID 1 (the server) as seen by the host.
exec_uid=$($DOCKER exec "$C1" id -u || echo "?")
pid=$($DOCKER inspect -f '{{.State.Pid}}' "$C1")
proc_uids="(not visible)"; proc_comm=""
if [ -r "/proc/$pid/status" ]; then
  proc_uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")
  proc_comm=$(cat "/proc/$pid/comm")
fi
if [ "$exec_uid" = 10025 ] && { [ "$proc_uids" = "10025 10025 10025 10025" ] || [ "$proc_uids" = "(not visible)" ]; }; then
  pass "runs as uid 10025: docker exec id -u = $exec_uid; PID 1 ($proc_comm, host pid $pid) real/effective/saved/fs uid = $proc_uids"
else
  fail "runs as uid 10025: docker exec id -u = $exec_uid; PID 1 ($proc_comm) uids = $proc_uids"
fi

# The admin token made at first start, used by `docker exec … queue list`.
token_mode=$($DOCKER exec "$C1" stat -c '%a %u' /var/lib/mxspool/admin-token 2>&1 || true)
if out=$($DOCKER exec "$C1" mxspool queue list 2>&1) && [ "$token_mode" = "600 10025" ]; then
  pass "docker exec $C1 mxspool queue list works (admin token created at first start, mode/owner $token_mode): $(echo "$out" | tail -n 1)"
else
  fail "docker exec mxspool queue list: $out (admin token: $token_mode)"
fi

# Mail through the published port reaches the primary.
TAG="first-$$"
if command -v swaks >/dev/null 2>&1; then
  swaks --server "127.0.0.1:$SMTP_PORT" --from sender@example.org --to user@example.com \
    --header "Subject: mxspool docker test $TAG" --header "X-Test-Id: $TAG" >"$WORK/send-$TAG.log" 2>&1 \
    && grep -qE '^<[-~] +250 .*queued as' "$WORK/send-$TAG.log" && sent=0 || sent=1
else
  send "$TAG" 1 && sent=0 || sent=1
fi
reply=$(grep -oE '250 .*queued as [0-9A-Z]+' "$WORK/send-$TAG.log" | tail -n 1 || true)
if [ "$sent" -eq 0 ] && wait_delivered "$TAG" 1 30; then
  pass "a message sent to 127.0.0.1:$SMTP_PORT got '$reply' and reached the primary"
else
  fail "a message through the SMTP port: sent=$sent reply='$reply', delivered=$(delivered "$TAG")"
  cat "$WORK/send-$TAG.log"
fi

# The spool lives in the volume: a queued message survives `docker restart`.
sink_stop
TAG="restart-$$"
if send "$TAG" 1; then
  id=$(grep -oE 'queued as [0-9A-Z]+' "$WORK/send-$TAG.log" | awk '{print $3}')
  before=$(queue_ids "$C1" || true)
  $DOCKER restart -t 40 "$C1" >/dev/null
  if wait_up "$C1" 30; then
    after=$(queue_ids "$C1" || true)
    sink_start
    $DOCKER exec "$C1" mxspool queue flush >/dev/null || true
    if [ -n "$id" ] && grep -qx "$id" <<<"$before" && grep -qx "$id" <<<"$after" && wait_delivered "$TAG" 1 30; then
      pass "message $id queued while the primary was down survived docker restart and was delivered after flush"
    else
      fail "restart: id '$id' queued before: $(grep -cx "$id" <<<"$before"), after: $(grep -cx "$id" <<<"$after"), delivered: $(delivered "$TAG")"
    fi
  else
    sink_start
    fail "restart: the server did not come back within 30 s"
  fi
else
  sink_start
  fail "restart: the message was not accepted while the primary was down: $(tail -n 3 "$WORK/send-$TAG.log")"
fi

# `docker stop` is graceful and loses nothing: 50 messages queued, stop,
# a new container on the same volume delivers them all.
sink_stop
TAG="batch-$$"
N=50
if send "$TAG" "$N"; then accepted=$N; else accepted=$(grep -c ' 250 ' "$WORK/send-$TAG.log" || true); fi
queued=$(queue_ids "$C1" | wc -l || true)
t=$SECONDS
$DOCKER stop -t 40 "$C1" >/dev/null
stop_secs=$((SECONDS - t))
exit_code=$($DOCKER inspect -f '{{.State.ExitCode}}' "$C1")
logs=$($DOCKER logs "$C1" 2>&1 | tail -n 20)
if [ "$accepted" -eq "$N" ] && [ "$exit_code" = 0 ] && [ "$stop_secs" -lt 30 ] \
   && grep -q '"shutting down"' <<<"$logs" && grep -q '"stopped"' <<<"$logs" \
   && ! grep -q 'grace period' <<<"$logs"; then
  pass "docker stop with $queued messages queued: exit code 0 after ${stop_secs}s, logs 'shutting down' then 'stopped'"
else
  fail "docker stop: accepted $accepted/$N, exit code $exit_code after ${stop_secs}s; last log lines:"
  echo "$logs" | tail -n 5
fi
C2="$NAME-2"
start_container "$C2"
if wait_up "$C2" 30; then
  still=$(queue_ids "$C2" | wc -l || true)
  sink_start
  $DOCKER exec "$C2" mxspool queue flush >/dev/null || true
  if wait_delivered "$TAG" "$N" 60; then
    pass "all $N messages queued before docker stop were in the spool of a new container on the same volume ($still queued) and reached the primary"
  else
    fail "after docker stop: $still queued in the new container, $(delivered "$TAG")/$N delivered"
  fi
  end=$((SECONDS + 15))
  while left=$(queue_ids "$C2" | wc -l || true); [ "$left" -ne 0 ] && [ "$SECONDS" -lt "$end" ]; do sleep 0.5; done
  if [ "$left" -eq 0 ]; then
    pass "the queue is empty after delivery"
  else
    fail "$left message(s) still queued 15 s after delivery:"
    $DOCKER exec "$C2" mxspool queue list | sed 's/^/    /'
  fi
else
  sink_start
  fail "a new container on the same volume did not come up"
fi

# A bad configuration: exit status 2, the file and the key in the logs.
C3="$NAME-bad"
$DOCKER run -d --name "$C3" --network host -v "$WORK/conf/bad.toml:/etc/mxspool/config.toml:ro" "$IMAGE" >/dev/null
CONTAINERS+=("$C3")
code=$(timeout 60 $DOCKER wait "$C3" || echo timeout)
msg=$($DOCKER logs "$C3" 2>&1 | tail -n 3)
if [ "$code" = 2 ] && grep -q '/etc/mxspool/config.toml' <<<"$msg" && grep -q 'server.command_timeout' <<<"$msg"; then
  pass "a bad config exits 2: $msg"
else
  fail "bad config: exit '$code', logs: $msg"
fi
