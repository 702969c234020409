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
# TLS listener on 127.0.0.1:5671 for tests/broker_tls.rs. The test PKI lives in $TLS_DIR (made
# once, kept across runs so a running node and the tests agree on it):
#   ca.pem/ca.key              test CA, signs the server and client certificates
#   server.pem/server.key      server certificate for localhost and 127.0.0.1
#   client.pem/client.key      client certificate (CN=weir-test-client) for mutual TLS
#   other-ca.pem/other-ca.key  an unrelated CA (the "wrong CA" case)
# The listener verifies a client certificate when one is presented (verify_peer) but does not
# require one (fail_if_no_peer_cert=false), so CA-only and mutual-TLS clients both connect.
# The management API also answers HTTPS on 127.0.0.1:15671 (what Weir uses for an amqps://
# broker), beside plain HTTP on 15672 (naming the TLS port alone would turn 15672 off).
TLS_DIR=/var/lib/weir-test-tls
tls_pki() {
  local d=$TLS_DIR
  install -d -m 0755 "$d"
  if [ ! -s "$d/ca.pem" ] || [ ! -s "$d/other-ca.pem" ] || [ ! -s "$d/server.pem" ] || [ ! -s "$d/client.pem" ]; then
    log "generating the test TLS CA and certificates in $d"
    local t
    t=$(mktemp -d)
    for ca in ca other-ca; do
      openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=weir test $ca" \
        -keyout "$t/$ca.key" -out "$t/$ca.pem" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        2>/dev/null
    done
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$t/server.ext"
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > "$t/client.ext"
    for leaf in server:localhost client:weir-test-client; do
      local name=${leaf%%:*} cn=${leaf#*:}
      openssl req -new -newkey rsa:2048 -nodes -subj "/CN=$cn/O=weir test" \
        -keyout "$t/$name.key" -out "$t/$name.csr" 2>/dev/null
      openssl x509 -req -in "$t/$name.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
        -days 3650 -extfile "$t/$name.ext" -out "$t/$name.pem" 2>/dev/null
    done
    install -m 0644 "$t"/ca.pem "$t"/other-ca.pem "$t"/server.pem "$t"/client.pem "$d/"
    # Keys: readable by the rabbitmq user (the server key) and by the test runner; test-only.
    install -m 0640 -g rabbitmq "$t"/ca.key "$t"/other-ca.key "$t"/server.key "$t"/client.key "$d/"
    rm -rf "$t"
  fi
}
tls_pki
# The listener settings live between markers in rabbitmq.conf; the rest of the file is kept.
rabbit_conf=/etc/rabbitmq/rabbitmq.conf
tls_conf="# weir-test-tls begin (scripts/services.sh)
listeners.ssl.local = 127.0.0.1:5671
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/server.pem
ssl_options.keyfile = $TLS_DIR/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
management.tcp.port = 15672
management.ssl.ip = 127.0.0.1
management.ssl.port = 15671
management.ssl.cacertfile = $TLS_DIR/ca.pem
management.ssl.certfile = $TLS_DIR/server.pem
management.ssl.keyfile = $TLS_DIR/server.key
# weir-test-tls end"
touch "$rabbit_conf"
wanted=$(sed '/^# weir-test-tls begin/,/^# weir-test-tls end/d' "$rabbit_conf"; printf '%s\n' "$tls_conf")
rabbit_conf_changed=0
if [ "$wanted" != "$(cat "$rabbit_conf")" ]; then
  log "writing the TLS listener (5671) into $rabbit_conf"
  printf '%s\n' "$wanted" > "$rabbit_conf"
  rabbit_conf_changed=1
fi
if [ "$rabbit_conf_changed" = 1 ] && rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  # The node reads rabbitmq.conf only at boot: stop it here, the start below picks the file up.
  log "restarting RabbitMQ for the TLS listener"
  timeout 60 rabbitmqctl stop >/dev/null 2>&1 || pkill -9 -f 'beam.smp.*rabbit' || true
  sleep 2
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
for _ in $(seq 1 60); do
  rabbitmq-diagnostics -q check_port_listener 5671 >/dev/null 2>&1 && break
  sleep 1
done
rabbitmq-diagnostics -q check_port_listener 5671
# A subscription's status.backlog counts unacknowledged messages (every replica's), which only
# the management API reports (tests/subscriptions.rs checks it). Wait for its listener.
rabbitmq-plugins -q enable rabbitmq_management
for _ in $(seq 1 60); do
  curl -fsS -u guest:guest http://127.0.0.1:15672/api/overview >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS -u guest:guest -o /dev/null http://127.0.0.1:15672/api/overview
for _ in $(seq 1 60); do
  curl -fsS --cacert "$TLS_DIR/ca.pem" -u guest:guest https://127.0.0.1:15671/api/overview >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS --cacert "$TLS_DIR/ca.pem" -u guest:guest -o /dev/null https://127.0.0.1:15671/api/overview

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

