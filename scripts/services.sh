#!/usr/bin/env bash
# Starts and prepares the services the test suite needs (run by .ci/run; run it yourself before
# `cargo test` on a fresh machine). Idempotent: a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*"; }

# PostgreSQL (trust auth on 127.0.0.1:5432).
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  log "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
for _ in $(seq 1 60); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
pg_isready -h 127.0.0.1 -p 5432

# RabbitMQ (guest/guest on 127.0.0.1:5672).
# `ping` only proves the Erlang node answers; a node can be up with its AMQP listener wedged,
# so also check that an AMQP handshake gets its Connection.Start.
amqp_ok() {
  python3 - <<'PY' 2>/dev/null
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", 5672), timeout=5)
    s.settimeout(5)
    s.sendall(b"AMQP\x00\x00\x09\x01")
    sys.exit(0 if len(s.recv(8)) > 0 else 1)
except OSError:
    sys.exit(1)
PY
}
rabbit_up() {
  for _ in $(seq 1 90); do rabbitmq-diagnostics -q ping >/dev/null 2>&1 && amqp_ok && return 0; sleep 1; done
  return 1
}
# Each quorum queue reserves file handles in RabbitMQ's file handle cache; with the 1,024 the
# node gets by default here, a few hundred queues (the scale tests declare 400) leave no handle
# for a new connection and the AMQP listener stops answering. Give the node 20,000.
if [ ! -f /etc/security/limits.d/weir-rabbitmq.conf ]; then
  printf 'rabbitmq soft nofile 20000\nrabbitmq hard nofile 20000\n' > /etc/security/limits.d/weir-rabbitmq.conf
fi
beam=$(pgrep -f 'beam.smp.*rabbit' | head -n1 || true)
if [ -n "$beam" ] && [ "$(awk '/Max open files/ {print $4}' "/proc/$beam/limits")" -lt 20000 ]; then
  log "restarting RabbitMQ with a higher open-files limit"
  timeout 60 rabbitmqctl stop >/dev/null 2>&1 || pkill -9 -f 'beam.smp.*rabbit' || true
  sleep 2
fi
if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  log "starting RabbitMQ"
  rabbitmq-server -detached
fi
# A test may have stopped the app (broker restart tests) and died before restarting it.
rabbitmqctl -q start_app >/dev/null 2>&1 || true
if ! rabbit_up; then
  log "RabbitMQ does not answer AMQP: restarting it"
  timeout 60 rabbitmqctl stop >/dev/null 2>&1 || pkill -9 -f 'beam.smp.*rabbit' || true
  sleep 2
  rabbitmq-server -detached
  if ! rabbit_up; then
    # Only test data lives here: start from an empty node rather than fail the run.
    log "RabbitMQ still wedged: starting it on a fresh data directory"
    pkill -9 -f 'beam.smp.*rabbit' || true
    sleep 2
    mv /var/lib/rabbitmq/mnesia "/var/lib/rabbitmq/mnesia.wedged.$(date +%s)" || true
    rabbitmq-server -detached
    rabbit_up
  fi
fi
rabbitmq-diagnostics -q check_running
# Subscriptions with `ordering: perKey` hash keys over partition queues with this plugin
# (it ships with RabbitMQ; enabling it is idempotent and works while the node runs).
rabbitmq-plugins -q enable rabbitmq_consistent_hash_exchange
# A subscription's status.backlog counts unacknowledged messages (every replica's), which only
# the management API reports (tests/subscriptions.rs checks it). Wait for its listener.
rabbitmq-plugins -q enable rabbitmq_management
for _ in $(seq 1 60); do
  curl -fsS -u guest:guest http://127.0.0.1:15672/api/overview >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS -u guest:guest -o /dev/null http://127.0.0.1:15672/api/overview

# Queues left behind by earlier runs (tests use unique names and most delete theirs; a test
# that failed or was killed may not have). Thousands of idle quorum queues slow the node.
python3 - <<'PY'
import json, urllib.parse, urllib.request
api = "http://127.0.0.1:15672/api/queues/%2F"
auth = urllib.request.HTTPPasswordMgrWithDefaultRealm()
auth.add_password(None, "http://127.0.0.1:15672/", "guest", "guest")
open_ = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(auth)).open
names = [q["name"] for q in json.load(open_(api + "?columns=name")) if q["name"].startswith("weir")]
for n in names:
    req = urllib.request.Request(api + "/" + urllib.parse.quote(n, safe=""), method="DELETE")
    try:
        open_(req).close()
    except OSError:
        pass
if names:
    print(f"== deleted {len(names)} queues left by earlier runs")
PY

# promtool (Debian's prometheus package) checks the /metrics exposition (tests/metrics.rs).
if ! command -v promtool >/dev/null 2>&1; then
  log "installing promtool"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi

# Databases left behind by earlier test runs (each test creates its own).
for db in $(psql -h 127.0.0.1 -U postgres -tAc "SELECT datname FROM pg_database WHERE datname LIKE 'weir\_t\_%' OR datname LIKE 'weir\_bench\_%' OR datname LIKE 'weir\_peer\_%'"); do
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" || true
done

