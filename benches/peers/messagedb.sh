#!/usr/bin/env bash
# Message DB (the SQL of the @eventide/message-db npm package) on the same PostgreSQL, same
# durability settings and the same 512-byte events as `weir bench ingest`.
#   bulk/server-loop : 100 write_message calls per transaction, in a server-side loop
#   bulk/client-calls: 100 write_message calls per transaction, each a client statement
#   single           : one write_message per transaction, 64 concurrent connections
# Prints one JSON object per line: {"system","mode","events_per_s",...}.
# Env: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres), SECONDS_PER_RUN (10).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$here/.work/messagedb"
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
secs="${SECONDS_PER_RUN:-10}"
version="1.3.1"

mkdir -p "$work"
if [ ! -d "$work/node_modules/@eventide/message-db" ]; then
  (cd "$work" && npm install --silent --no-audit --no-fund "@eventide/message-db@$version" >&2)
fi
db="weir_peer_mdb_$$"
export DATABASE_NAME="$db" PGOPTIONS='-c client_min_messages=warning'
bash "$work/node_modules/@eventide/message-db/database/install.sh" >/dev/null
trap 'dropdb --if-exists "$db" >/dev/null 2>&1 || true' EXIT

# Message DB's functions call each other unqualified: its own role sets this search path.
export PGOPTIONS='-c client_min_messages=warning -c search_path=message_store,public'
pad=$(printf 'x%.0s' $(seq 1 440))
data="{\"orderId\": \"o-1\", \"amount\": 1, \"note\": \"$pad\"}"
scripts="$(mktemp -d)"
cat > "$scripts/server.sql" <<SQL
DO \$\$ BEGIN
  FOR i IN 1..100 LOOP
    PERFORM message_store.write_message(gen_random_uuid()::varchar, 'order-' || (random()*1000)::int, 'OrderCreated', '$data'::jsonb);
  END LOOP;
END \$\$;
SQL
{
  echo "BEGIN;"
  for _ in $(seq 1 100); do
    echo "SELECT message_store.write_message(gen_random_uuid()::varchar, 'order-' || (random()*1000)::int, 'OrderCreated', '$data'::jsonb);"
  done
  echo "COMMIT;"
} > "$scripts/client.sql"
echo "SELECT message_store.write_message(gen_random_uuid()::varchar, 'order-' || (random()*1000)::int, 'OrderCreated', '$data'::jsonb);" > "$scripts/single.sql"

tps() { # script clients -> transactions per second (excluding connection time)
  pgbench -n -f "$1" -c "$2" -j 2 -T "$secs" "$db" 2>/dev/null \
    | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | tail -n 1
}
emit() { # mode clients events_per_txn tps
  python3 -c "import json,sys; print(json.dumps({'system': 'message-db $version', 'mode': sys.argv[1], 'connections': int(sys.argv[2]), 'events_per_s': float(sys.argv[4]) * int(sys.argv[3])}))" "$@"
}
emit bulk/server-loop 4 100 "$(tps "$scripts/server.sql" 4)"
emit bulk/client-calls 4 100 "$(tps "$scripts/client.sql" 4)"
emit single 64 1 "$(tps "$scripts/single.sql" 64)"
rm -rf "$scripts"
