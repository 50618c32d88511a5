#!/usr/bin/env bash
# Soak run: a release mxspool under steady load for DURATION while its primary
# flaps and SIGHUP reloads happen; checks that every acknowledged message was
# delivered (or bounced, for the users the primary refuses), that the queue
# drains, that RSS and open fds stay flat, and that the log has no panic or
# ERROR. Exits non-zero if any check fails. See benches/soak.py for the details.
#
#   benches/soak.sh DURATION [soak.py options]   e.g. 120, 20m, 1h
#   benches/soak.sh 120                          CI smoke run
#   benches/soak.sh 1h --seed 7 --rate 50        the documented run
#
# Needs python3 (standard library only). MXSPOOL_BIN=path measures another build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: benches/soak.sh DURATION [options] (e.g. 120, 20m, 1h)" >&2; exit 2; }
DURATION=$1; shift
if [ -z "${MXSPOOL_BIN:-}" ]; then
  cargo build --release --locked --quiet
  MXSPOOL_BIN="${CARGO_TARGET_DIR:-target}/release/mxspool"
fi
exec python3 benches/soak.py --bin "$MXSPOOL_BIN" --duration "$DURATION" "$@"
