# Shared helpers for dfos scripts; sourced, not run.
# shellcheck shell=bash

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DFOS_KAFKA_PORT=${DFOS_KAFKA_PORT:-9092}
export DFOS_BROKERS=${DFOS_BROKERS:-127.0.0.1:$DFOS_KAFKA_PORT}

say() { printf '%s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# FUSE mounts need /dev/fuse; fusermount3 (Debian's fuse3) is used for
# unmounting by non-root users and for auto_unmount.
ensure_fuse() {
  [ -e /dev/fuse ] || die "/dev/fuse is missing: load the fuse kernel module"
  if ! command -v fusermount3 >/dev/null; then
    say "installing fuse3 (fusermount3 missing)"
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
    else
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
    fi
  fi
}

ensure_toolchain() {
  command -v cargo >/dev/null || die "cargo is required (install Rust with rustup)"
  command -v java >/dev/null || die "Java 17 or newer is required for the Kafka broker"
  command -v mvn >/dev/null || die "Maven is required to fetch Kafka from Maven Central"
}

build() {
  say "building dfos (release)"
  (cd "$repo" && cargo build --release --workspace --quiet)
}
