#!/usr/bin/env bash
# Runs every dfos test: unit tests and end-to-end tests on a real Kafka
# broker and real FUSE mounts. Installs what is missing (fuse3, attr, Kafka
# into .cache/kafka), starts a broker only if none answers on DFOS_KAFKA_PORT,
# and stops only the broker it started.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"

ensure_toolchain
ensure_fuse
ensure_test_tools

started_kafka=0
cleanup() {
  if [ "$started_kafka" = 1 ]; then scripts/kafka.sh stop >&2 || true; fi
}
trap cleanup EXIT

if scripts/kafka.sh ready; then
  say "using the broker already answering on $DFOS_BROKERS"
else
  scripts/kafka.sh start
  started_kafka=1
fi

build
# End-to-end tests mount and spawn daemons; three at a time suits 2 cores.
# The 3-broker cluster test starts three more JVMs, so it runs alone after.
cluster_test=a_three_broker_cluster_survives_losing_a_broker_mid_copy
cargo test --release --workspace -- --test-threads="${DFOS_TEST_THREADS:-3}" --skip "$cluster_test" "$@"
cargo test --release --test replication -- --exact "$cluster_test" "$@"
