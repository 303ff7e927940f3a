# Shared helpers for dfos scripts; sourced, not run.
# shellcheck shell=bash

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DFOS_KAFKA_PORT=${DFOS_KAFKA_PORT:-9092}
export DFOS_BROKERS=${DFOS_BROKERS:-127.0.0.1:$DFOS_KAFKA_PORT}

say() { printf '%s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Installs Debian packages, through sudo when not root.
apt_install() {
  local sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# FUSE mounts need /dev/fuse; fusermount3 (Debian's fuse3) is used for
# unmounting by non-root users and for auto_unmount.
ensure_fuse() {
  [ -e /dev/fuse ] || die "/dev/fuse is missing: load the fuse kernel module"
  if ! command -v fusermount3 >/dev/null; then
    say "installing fuse3 (fusermount3 missing)"
    apt_install fuse3
  fi
}

# The end-to-end tests set and read extended attributes with the shell's
# own tools (Debian's attr: setfattr, getfattr).
ensure_test_tools() {
  if ! command -v setfattr >/dev/null || ! command -v getfattr >/dev/null; then
    say "installing attr (setfattr/getfattr missing)"
    apt_install attr
  fi
  if ! command -v filefrag >/dev/null; then
    say "installing e2fsprogs (filefrag missing)"
    apt_install e2fsprogs
  fi
}

# librdkafka is built with OpenSSL, for TLS and SASL/SCRAM to the brokers:
# it needs the headers and pkg-config (Debian's libssl-dev, pkg-config).
ensure_openssl_dev() {
  if ! pkg-config --exists openssl 2>/dev/null; then
    say "installing libssl-dev and pkg-config (OpenSSL headers missing)"
    apt_install libssl-dev pkg-config
  fi
}

ensure_toolchain() {
  command -v cargo >/dev/null || die "cargo is required (install Rust with rustup)"
  command -v java >/dev/null || die "Java 17 or newer is required for the Kafka broker"
  command -v mvn >/dev/null || die "Maven is required to fetch Kafka from Maven Central"
}

build() {
  ensure_openssl_dev
  say "building dfos (release)"
  (cd "$repo" && cargo build --release --workspace --quiet)
}
