#!/usr/bin/env bash
# Runs a real Apache Kafka (KRaft, combined broker+controller) for dfos.
#
# Why a script: CI and fresh clones must get a real broker with nothing but
# Java 17 and Maven. The jars come from Maven Central into a git-ignored
# cache (.cache/kafka) and are reused on later runs.
#
#   scripts/kafka.sh start|stop|status|ready|fetch
#   (ready: some broker on the port answers metadata requests, ours or not)
#
# Environment:
#   DFOS_KAFKA_PORT   client port (default 9092); controller uses port+1000
#   DFOS_KAFKA_HOME   cache directory (default <repo>/.cache/kafka)
#   KAFKA_VERSION     Apache Kafka version from Maven Central (default 4.1.1)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=${KAFKA_VERSION:-4.1.1}
port=${DFOS_KAFKA_PORT:-9092}
controller_port=$((port + 1000))
home=${DFOS_KAFKA_HOME:-$repo/.cache/kafka}
libs=$home/libs-$version
inst=$home/node-$port
pidfile=$inst/kafka.pid
logfile=$inst/kafka.log

die() { echo "kafka.sh: $*" >&2; exit 1; }

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

java_run() { java -Xms128m -Xmx512m -Dlog4j2.configurationFile="$home/log4j2.properties" -cp "$libs/*" "$@"; }

write_config() {
  mkdir -p "$inst/data"
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
  cat > "$inst/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$inst/data
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
log.retention.hours=168
PROPS
}

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

answers_metadata() {
  java_run org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$port" --list >/dev/null 2>&1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

start() {
  fetch
  if running; then
    echo "kafka.sh: already running (pid $(cat "$pidfile"), port $port)"
    return 0
  fi
  port_open && die "port $port is taken by another process; set DFOS_KAFKA_PORT"
  write_config
  if [ ! -f "$inst/data/meta.properties" ]; then
    java_run kafka.tools.StorageTool format --standalone -t "$(java_run kafka.tools.StorageTool random-uuid)" \
      -c "$inst/server.properties" >"$inst/format.log" 2>&1 \
      || { cat "$inst/format.log" >&2; die "formatting KRaft storage failed"; }
  fi
  nohup java -Xms256m -Xmx1g -XX:+UseG1GC -Dlog4j2.configurationFile="$home/log4j2.properties" \
    -cp "$libs/*" kafka.Kafka "$inst/server.properties" >"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
  local deadline=$((SECONDS + 120))
  until port_open && answers_metadata; do
    running || { tail -30 "$logfile" >&2; die "broker exited during start-up (log: $logfile)"; }
    [ $SECONDS -lt $deadline ] || { stop; die "broker not ready after 120 s (log: $logfile)"; }
    sleep 1
  done
  echo "kafka.sh: broker ready on 127.0.0.1:$port (pid $(cat "$pidfile"))"
}

stop() {
  if ! running; then echo "kafka.sh: not running"; rm -f "$pidfile"; return 0; fi
  local pid; pid=$(cat "$pidfile")
  kill "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$pidfile"
  echo "kafka.sh: stopped pid $pid"
}

status() {
  if running; then echo "running pid $(cat "$pidfile") port $port"; else echo "stopped"; return 1; fi
}

ready() {
  [ -f "$libs/.complete" ] || return 1
  port_open && answers_metadata
}

case "${1:-}" in
  start) start ;;
  ready) ready ;;
  stop) stop ;;
  status) status ;;
  fetch) fetch ;;
  *) echo "usage: $0 start|stop|status|ready|fetch" >&2; exit 2 ;;
esac
