#!/usr/bin/env bash
# Weir beside the peer event stores, in one run on this machine:
#   bulk   — Weir: 100 events per HTTP request; eventsourcing: 100 events per save();
#            Message DB: 100 write_message per transaction (server-side loop and client calls)
#   single — one event per request/save/call, 64 concurrent writers for every system
# Usage: benches/peers/run.sh [--json FILE]   (WEIR=path/to/weir, default target/release/weir)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
weir="${WEIR:-$root/target/release/weir}"
[ -x "$weir" ] || { echo "build first: cargo build --release (or set WEIR=...)" >&2; exit 1; }
out="$(mktemp -d)"
echo "== weir bench ingest (batch 100, batch 1 × 64 clients)" >&2
"$weir" bench ingest --events "${EVENTS:-100000}" --json "$out/weir.json" >&2
echo "== eventsourcing" >&2
"$here/eventsourcing.sh" > "$out/eventsourcing.jsonl"
echo "== message-db" >&2
"$here/messagedb.sh" > "$out/messagedb.jsonl"
json_out=""; [ "${1:-}" = "--json" ] && json_out="${2:-}"
python3 "$here/combine.py" "$out" "$json_out"
rm -rf "$out"
