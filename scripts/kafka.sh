#!/usr/bin/env bash
# Runs a real Apache Kafka (KRaft) for dfos: one combined broker+controller
# node by default, or a cluster of N such nodes on 127.0.0.1.
#
# Why a script: CI and fresh clones must get a real broker with nothing but
# Java 17 and Maven. The jars come from Maven Central into a git-ignored
# cache (.cache/kafka) and are reused on later runs.
#
#   scripts/kafka.sh start|stop|status|ready|fetch
#   scripts/kafka.sh kill-node I | start-node I     (cluster tests)
#   scripts/kafka.sh tls-ca      path of the CA certificate (PEM) to trust
#   ready: some broker on the port answers metadata requests, ours or not
#
# Environment:
#   DFOS_KAFKA_PORT   client port of node 1 (default 9092); node I listens on
#                     port+I-1, its controller on port+1000+I-1, and TLS
#                     clients on port+2000+I-1 (certificate for 127.0.0.1
#                     and localhost, signed by the test CA that
#                     `scripts/kafka.sh tls-ca` prints the path of)
#   DFOS_KAFKA_NODES  number of nodes (default 1; 3 for a replicated cluster)
#   DFOS_KAFKA_HOME   cache directory (default <repo>/.cache/kafka)
#   DFOS_KAFKA_PROPS  extra server.properties lines, appended last so they win
#   KAFKA_VERSION     Apache Kafka version from Maven Central (default 4.1.1)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=${KAFKA_VERSION:-4.1.1}
port=${DFOS_KAFKA_PORT:-9092}
nodes=${DFOS_KAFKA_NODES:-1}
home=${DFOS_KAFKA_HOME:-$repo/.cache/kafka}
libs=$home/libs-$version
if [ "$nodes" = 1 ]; then cluster=$home/node-$port; else cluster=$home/cluster-$nodes-$port; fi

die() { echo "kafka.sh: $*" >&2; exit 1; }

node_dir() { if [ "$nodes" = 1 ]; then echo "$cluster"; else echo "$cluster/node-$1"; fi; }
node_port() { echo $((port + $1 - 1)); }
controller_port() { echo $((port + 1000 + $1 - 1)); }
tls_port() { echo $((port + 2000 + $1 - 1)); }
tls=$home/tls
tls_password=dfos-test-only
pidfile() { echo "$(node_dir "$1")/kafka.pid"; }

need_tools() {
  command -v java >/dev/null || die "Java 17 or newer is required (java not found on PATH)"
  command -v mvn >/dev/null || die "Maven is required to fetch Kafka (mvn not found on PATH)"
}

fetch() {
  [ -f "$libs/.complete" ] && return 0
  need_tools
  mkdir -p "$libs"
  echo "kafka.sh: fetching Apache Kafka $version from Maven Central into $libs" >&2
  cat > "$home/pom-$version.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dfos</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$version</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$version</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.24.3</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>2.24.3</version></dependency>
  </dependencies>
</project>
POM
  mvn -q -B -f "$home/pom-$version.xml" dependency:copy-dependencies \
      -DoutputDirectory="$libs" -DincludeScope=runtime >"$home/mvn.log" 2>&1 \
    || { tail -30 "$home/mvn.log" >&2; die "mvn could not fetch Kafka $version (log: $home/mvn.log)"; }
  ls "$libs"/kafka_2.13-*.jar >/dev/null 2>&1 || die "Kafka jars missing after mvn run"
  touch "$libs/.complete"
}

java_run() { java -Xms64m -Xmx256m -Dlog4j2.configurationFile="$home/log4j2.properties" -cp "$libs/*" "$@"; }

write_log_config() {
  cat > "$home/log4j2.properties" <<'L4J'
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.kafka.name = org.apache.kafka
logger.kafka.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
L4J
}

# A throwaway CA and a broker certificate it signs, made once with openssl:
# enough for clients to verify the broker (ssl.ca.location) as they would
# a real one. Not for production, where the admin brings their own.
ensure_tls_material() {
  [ -f "$tls/.complete" ] && return 0
  command -v openssl >/dev/null || die "openssl is required to make the test broker's TLS certificate"
  mkdir -p "$tls"
  (
    cd "$tls"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=dfos test CA" \
      -keyout ca.key -out ca.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout broker.key -out broker.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >broker.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile broker.ext -out broker.pem
    openssl pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem -name broker \
      -passout "pass:$tls_password" -out broker.p12
  ) >"$home/tls.log" 2>&1 || { cat "$home/tls.log" >&2; die "making the test TLS certificate failed"; }
  touch "$tls/.complete"
}

write_config() {
  local i=$1 dir; dir=$(node_dir "$i")
  mkdir -p "$dir/data"
  local replicas=$((nodes < 3 ? nodes : 3))
  local min_isr=$((nodes < 3 ? 1 : 2))
  local quorum
  if [ "$nodes" = 1 ]; then
    quorum="controller.quorum.bootstrap.servers=127.0.0.1:$(controller_port 1)"
  else
    quorum="controller.quorum.voters=$(for j in $(seq 1 "$nodes"); do printf '%s@127.0.0.1:%s,' "$j" "$(controller_port "$j")"; done | sed 's/,$//')"
  fi
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=$i
$quorum
listeners=PLAINTEXT://127.0.0.1:$(node_port "$i"),CONTROLLER://127.0.0.1:$(controller_port "$i"),SSL://127.0.0.1:$(tls_port "$i")
advertised.listeners=PLAINTEXT://127.0.0.1:$(node_port "$i"),SSL://127.0.0.1:$(tls_port "$i")
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL
ssl.keystore.type=PKCS12
ssl.keystore.location=$tls/broker.p12
ssl.keystore.password=$tls_password
ssl.key.password=$tls_password
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=1
default.replication.factor=$replicas
min.insync.replicas=$min_isr
offsets.topic.replication.factor=$replicas
transaction.state.log.replication.factor=$replicas
transaction.state.log.min.isr=$min_isr
transaction.state.log.num.partitions=3
offsets.topic.num.partitions=3
share.coordinator.state.topic.replication.factor=$replicas
share.coordinator.state.topic.min.isr=$min_isr
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
message.max.bytes=1048588
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000
# Reply topics keep their data 10 s; checking often frees it soon after
# (see REPLY_TOPIC_CONFIG in mountd/src/rpc.rs).
log.retention.check.interval.ms=5000
${DFOS_KAFKA_PROPS:-}
PROPS
}

running() { local f; f=$(pidfile "$1"); [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }

bootstrap() { for i in $(seq 1 "$nodes"); do printf '127.0.0.1:%s,' "$(node_port "$i")"; done | sed 's/,$//'; }

answers_metadata() {
  java_run org.apache.kafka.tools.TopicCommand --bootstrap-server "$1" --list >/dev/null 2>&1
}

# Topics with replication factor N can only be created once N brokers are
# registered and unfenced; the metadata answer alone comes with the first.
unfenced_brokers() {
  java_run org.apache.kafka.tools.BrokerApiVersionsCommand --bootstrap-server "$1" 2>/dev/null | grep -c 'isFenced: false'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

format_storage() {
  local i=$1 dir; dir=$(node_dir "$i")
  [ -f "$dir/data/meta.properties" ] && return 0
  local mode=()
  [ "$nodes" = 1 ] && mode=(--standalone)
  java_run kafka.tools.StorageTool format "${mode[@]}" -t "$cluster_id" -c "$dir/server.properties" \
    >"$dir/format.log" 2>&1 || { cat "$dir/format.log" >&2; die "formatting KRaft storage of node $i failed"; }
}

launch() {
  local i=$1 dir; dir=$(node_dir "$i")
  if running "$i"; then return 0; fi
  local heap=1g; [ "$nodes" = 1 ] || heap=512m
  nohup java -Xms$heap -Xmx$heap -XX:+AlwaysPreTouch -XX:+UseG1GC -XX:G1HeapRegionSize=4M -XX:MaxGCPauseMillis=20 -Dlog4j2.configurationFile="$home/log4j2.properties" \
    -cp "$libs/*" kafka.Kafka "$dir/server.properties" >>"$dir/kafka.log" 2>&1 </dev/null &
  echo $! >"$(pidfile "$i")"
}

wait_ready() {
  local deadline=$((SECONDS + 180))
  until port_open "$(node_port 1)" && answers_metadata "$(bootstrap)" \
    && [ "$(unfenced_brokers "$(bootstrap)")" -ge "$nodes" ]; do
    for i in $(seq 1 "$nodes"); do
      running "$i" || { tail -30 "$(node_dir "$i")/kafka.log" >&2; die "node $i exited during start-up"; }
    done
    [ $SECONDS -lt $deadline ] || { stop; die "Kafka not ready after 180 s (logs in $cluster)"; }
    sleep 1
  done
}

start() {
  command -v java >/dev/null || die "Java 17 or newer is required (java not found on PATH)"
  fetch
  write_log_config
  local all_running=1
  for i in $(seq 1 "$nodes"); do running "$i" || all_running=0; done
  if [ $all_running = 1 ]; then
    echo "kafka.sh: already running ($nodes node(s), bootstrap $(bootstrap))"
    return 0
  fi
  mkdir -p "$cluster"
  ensure_tls_material
  [ -f "$cluster/cluster.id" ] || java_run kafka.tools.StorageTool random-uuid >"$cluster/cluster.id"
  cluster_id=$(cat "$cluster/cluster.id")
  for i in $(seq 1 "$nodes"); do
    running "$i" && continue
    port_open "$(node_port "$i")" && die "port $(node_port "$i") is taken by another process; set DFOS_KAFKA_PORT"
    port_open "$(tls_port "$i")" && die "port $(tls_port "$i") (TLS) is taken by another process; set DFOS_KAFKA_PORT"
    write_config "$i"
    format_storage "$i"
    launch "$i"
  done
  wait_ready
  echo "kafka.sh: ready, $nodes node(s), bootstrap $(bootstrap)"
}

stop_node() {
  local i=$1 signal=${2:-TERM} f; f=$(pidfile "$i")
  if ! running "$i"; then rm -f "$f"; return 0; fi
  local pid; pid=$(cat "$f")
  kill -s "$signal" "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$f"
  echo "kafka.sh: stopped node $i (pid $pid)"
}

stop() {
  for i in $(seq "$nodes" -1 1); do stop_node "$i"; done
}

status() {
  local any=0
  for i in $(seq 1 "$nodes"); do
    if running "$i"; then echo "node $i running pid $(cat "$(pidfile "$i")") port $(node_port "$i")"; any=1
    else echo "node $i stopped"; fi
  done
  [ $any = 1 ]
}

ready() {
  [ -f "$libs/.complete" ] || return 1
  write_log_config
  port_open "$port" && answers_metadata "127.0.0.1:$port"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  ready) ready ;;
  fetch) fetch ;;
  kill-node) stop_node "${2:?node number}" KILL ;;
  start-node) write_log_config; cluster_id=$(cat "$cluster/cluster.id"); launch "${2:?node number}" ;;
  bootstrap) bootstrap ;;
  tls-ca) echo "$tls/ca.pem" ;;
  *) echo "usage: $0 start|stop|status|ready|fetch|kill-node I|start-node I|bootstrap|tls-ca" >&2; exit 2 ;;
esac
