#!/usr/bin/env python3
"""Combines one run's results (weir.json, eventsourcing.jsonl, messagedb.jsonl in DIR) into
the peers table: Weir's rate over each peer's in the matching shape."""

import json
import pathlib
import sys

d = pathlib.Path(sys.argv[1])
weir = json.loads((d / "weir.json").read_text())
weir = weir if isinstance(weir, list) else [weir]
rate = {}
for r in weir:
    shape = "single" if r["variant"].startswith("batch=1 ") else "bulk"
    rate[shape] = r["weir"]["events_per_s"]
peers = []
for f in ("eventsourcing.jsonl", "messagedb.jsonl"):
    for line in (d / f).read_text().splitlines():
        if line.strip():
            peers.append(json.loads(line))
# conns: concurrent writers (HTTP clients for Weir, connections or threads for the peers).
rows = [("weir", "bulk (100/request, 8 clients)", 8, rate.get("bulk", 0)), ("weir", "single (1/request, 64 clients)", 64, rate.get("single", 0))]
for p in peers:
    rows.append((p["system"], p["mode"], p["connections"], p["events_per_s"]))
print(f"{'system':<22} {'shape':<32} {'conns':>5} {'events/s':>10} {'weir ÷ this':>12}")
for system, mode, conns, eps in rows:
    shape = "single" if mode.startswith("single") else "bulk"
    ratio = "" if system == "weir" else f"{rate.get(shape, 0) / max(eps, 1e-9):.1f}×"
    print(f"{system:<22} {mode:<32} {conns:>5} {eps:>10.0f} {ratio:>12}")
if len(sys.argv) > 2 and sys.argv[2]:
    pathlib.Path(sys.argv[2]).write_text(json.dumps({"weir": weir, "peers": peers}, indent=2))
