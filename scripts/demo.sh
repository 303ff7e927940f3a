#!/usr/bin/env bash
# Starts everything for a demo: a Kafka broker, one storage daemon on
# storage/, and a mount of User1's store at mnt/User1. Runs in the
# foreground; Ctrl-C (or `scripts/demo.sh stop` from another shell)
# unmounts and stops what it started.
#
#   scripts/demo.sh         start and wait
#   scripts/demo.sh stop    stop a running demo
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"

run=$repo/.cache/demo
mnt=$repo/mnt/User1
mkdir -p "$run"

stop_pid() {
  local file=$1
  [ -f "$file" ] || return 0
  local pid; pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$file"
}

# Waits up to 120 s until `ready` (a shell test) holds for daemon `name`;
# if the daemon exits first, prints its log and fails.
await_ready() {
  local name=$1 pid=$2 ready=$3
  for _ in $(seq 1 1200); do
    bash -c "$ready" && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$run/$name.log" >&2; die "$name exited"; }
    sleep 0.1
  done
  die "$name was not ready within 120 s (see $run/$name.log)"
}

stop_all() {
  stop_pid "$run/mountd.pid"
  if grep -q " $mnt " /proc/mounts; then umount -l "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" || true; fi
  stop_pid "$run/storaged.pid"
  if [ -f "$run/started-kafka" ]; then scripts/kafka.sh stop >&2; rm -f "$run/started-kafka"; fi
  say "demo stopped"
}

if [ "${1:-}" = stop ]; then
  stop_all
  exit 0
fi

# A second demo would share this one's pid files, and stopping it would
# stop the first.
for daemon in mountd storaged; do
  if [ -f "$run/$daemon.pid" ] && kill -0 "$(cat "$run/$daemon.pid")" 2>/dev/null; then
    die "a demo is already running ($daemon pid $(cat "$run/$daemon.pid")); use it, or scripts/demo.sh stop first"
  fi
done

ensure_toolchain
ensure_fuse
build
if ! scripts/kafka.sh ready; then
  scripts/kafka.sh start
  touch "$run/started-kafka"
fi
trap stop_all EXIT
trap 'exit 0' INT TERM

RUST_LOG="${RUST_LOG:-info},storaged::service=info" target/release/storaged --brokers "$DFOS_BROKERS" --storage storage --credentials id_passwd.txt --trash-hours 24 \
  >"$run/storaged.log" 2>&1 &
storaged_pid=$!
echo $storaged_pid >"$run/storaged.pid"
# A storaged that cannot start (another one holds storage/, a broker it
# cannot use) says why in its log; show that rather than a mount that waits.
await_ready storaged "$storaged_pid" "grep -q op=start '$run/storaged.log'"

mkdir -p "$mnt"
DFOS_PASSWORD=${DFOS_PASSWORD:-1234} target/release/mountd --brokers "$DFOS_BROKERS" --user User1 "$mnt" \
  >"$run/mountd.log" 2>&1 &
mountd_pid=$!
echo $mountd_pid >"$run/mountd.pid"

await_ready mountd "$mountd_pid" "grep -q ' $mnt ' /proc/mounts"

cat >&2 <<MSG

dfos is running.
  broker:   $DFOS_BROKERS
  storaged: pid $(cat "$run/storaged.pid"), data in $repo/storage, log $run/storaged.log
  mount:    $mnt (User1), log $run/mountd.log

Try from another shell:  cp /etc/services $mnt/ && ls -l $mnt
Stop with Ctrl-C here, or: scripts/demo.sh stop
MSG
while kill -0 "$mountd_pid" 2>/dev/null; do sleep 1; done
