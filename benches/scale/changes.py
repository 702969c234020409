#!/usr/bin/env python3
"""What one change costs a worker that runs many resources (issue 20, reconcile cost).

One `weir run` worker on a generated manifest folder of `--streams` EventStreams (store +
broker, one database) and one Subscription per stream (to a closed local port: nothing is
published, so nothing is delivered). Once it is ready, two kinds of change, `--changes` of
each, spaced by `--gap` seconds (longer than the folder watch's 300 ms debounce):

- an unchanged reload: a comment appended to the manifest file (the folder is read again,
  nothing in it changed);
- one more pair: a new file with one more stream and its subscription.

For each kind, the worker's own time per sync from `weir_topology_sync_seconds{phase}` (load:
reading and parsing the folder; build: validating and planning; apply: moving the data plane)
and, where the worker exports it, the plans a build made and reused
(`weir_topology_plans_total`), averaged over the changes. Run it with two binaries (`--weir`
twice) to compare them in one run; the binaries alternate, `--rounds` times.

    benches/scale/changes.py --weir target/release/weir --streams 1000

Needs PostgreSQL (user postgres, trust) and RabbitMQ (guest/guest) on 127.0.0.1. Cleans up:
SIGTERM to the worker, its database dropped (FORCE), the manifest folder removed (kept, with
the worker's log, when a run fails), the run's queues and exchanges deleted through the
management API (127.0.0.1:15672) when it answers.
"""

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

NS = "changes"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def psql(sql):
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1",
                    "-qAtc", sql], check=True, capture_output=True, text=True)


def pair(tag, name):
    return f"""apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {{name: {name}, namespace: {NS}}}
spec:
  broker: {{urlSecretRef: {{name: mq, key: url}}, queueType: quorum, exchange: weir.{NS}.{tag}-{name}}}
  store: {{urlSecretRef: {{name: pg, key: url}}}}
---
apiVersion: weir.dev/v1alpha1
kind: Subscription
metadata: {{name: {tag}-sub-{name}, namespace: {NS}}}
spec:
  stream: {name}
  sink: {{uri: "http://127.0.0.1:9/closed"}}
"""


def manifests(folder, db, streams, tag):
    docs = [f"""apiVersion: v1
kind: Secret
metadata: {{name: pg, namespace: {NS}}}
stringData: {{url: "postgres://postgres@127.0.0.1:5432/{db}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: mq, namespace: {NS}}}
stringData: {{url: "amqp://guest:guest@127.0.0.1:5672/%2f"}}
"""]
    docs += [pair(tag, f"s{i:04}") for i in range(streams)]
    with open(os.path.join(folder, "all.yaml"), "w") as f:
        f.write("---\n".join(docs))


def scrape(admin_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for m in re.finditer(r'^(weir_topology_\w+)\{\w+="(\w+)"\} (\S+)$', text, re.M):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def per_sync(before, after):
    n = after.get(("weir_topology_sync_seconds_count", "build"), 0) - \
        before.get(("weir_topology_sync_seconds_count", "build"), 0)
    row = {"syncs": n}
    for phase in ("load", "build", "apply"):
        key = ("weir_topology_sync_seconds_sum", phase)
        row[f"{phase}_ms"] = 1e3 * (after.get(key, 0) - before.get(key, 0)) / max(n, 1)
    for outcome in ("planned", "reused"):
        key = ("weir_topology_plans_total", outcome)
        if key in after:
            row[outcome] = (after[key] - before.get(key, 0)) / max(n, 1)
    return row


def wait_ready(admin_port, expected, deadline):
    """Until `/v1/status` lists `expected` resources, every one Ready."""
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/v1/status",
                                        timeout=5) as r:
                body = json.load(r)
            ok = sum(1 for x in body.get("resources", [])
                     if x.get("namespace") == NS and x.get("ready") is True)
            if ok >= expected:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"not every one of {expected} resources Ready in time")


def sweep(tag):
    auth = base64.b64encode(b"guest:guest").decode()
    base = "http://127.0.0.1:15672/api"

    def call(method, path):
        req = urllib.request.Request(base + path, method=method,
                                     headers={"authorization": f"Basic {auth}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()
    try:
        for kind in ("queues", "exchanges"):
            for x in json.loads(call("GET", f"/{kind}/%2F?columns=name")):
                if tag in x["name"]:
                    call("DELETE", f"/{kind}/%2F/{urllib.parse.quote(x['name'], safe='')}")
    except OSError as e:
        log(f"queues and exchanges of run {tag} not deleted: {e}")


def run(args, weir, tag):
    db = f"weir_changes_{tag}"
    psql(f"CREATE DATABASE {db}")
    folder = tempfile.mkdtemp(prefix="weir-changes-")
    manifests(folder, db, args.streams, tag)
    port, admin = 18600, 18601
    log_path = os.path.join(os.path.dirname(folder), f"weir-changes-{tag}.log")
    ok = False
    with open(log_path, "w") as worker_log:
        proc = subprocess.Popen([weir, "run", "-f", folder, "--listen", f"127.0.0.1:{port}",
                                 "--admin-listen", f"127.0.0.1:{admin}",
                                 "--allow-loopback-sinks"],
                                stdout=worker_log, stderr=subprocess.STDOUT)
        try:
            started = time.time()
            wait_ready(admin, 2 * args.streams, started + 300)
            log(f"{weir}: {2 * args.streams} resources Ready in {time.time() - started:.1f} s")
            time.sleep(2)
            rows = {}
            before = scrape(admin)
            for i in range(args.changes):
                with open(os.path.join(folder, "all.yaml"), "a") as f:
                    f.write(f"\n# change {i}\n")
                time.sleep(args.gap)
            after = scrape(admin)
            rows["unchanged reload"] = per_sync(before, after)
            before = after
            for i in range(args.changes):
                with open(os.path.join(folder, f"extra{i}.yaml"), "w") as f:
                    f.write(pair(tag, f"x{i:04}"))
                time.sleep(args.gap)
            wait_ready(admin, 2 * (args.streams + args.changes), time.time() + 60)
            after = scrape(admin)
            rows["one more pair"] = per_sync(before, after)
            ok = True
            return rows
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            sweep(tag)
            if ok:
                shutil.rmtree(folder, ignore_errors=True)
                os.remove(log_path)
            else:
                log(f"kept {folder} and {log_path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weir", action="append", required=True,
                    help="the binary (twice to compare two)")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--gap", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    for r in range(args.rounds):
        for weir in args.weir:
            tag = secrets.token_hex(3)
            for change, row in run(args, weir, tag).items():
                results.append({"weir": weir, "round": r, "change": change, **row})
    print(f"\n{args.streams} streams + {args.streams} subscriptions; per sync, "
          f"mean of {args.changes} changes")
    print(f"{'binary':<28} {'change':<18} {'syncs':>5} {'load ms':>8} {'build ms':>9} "
          f"{'apply ms':>9} {'planned':>8} {'reused':>7}")
    for x in results:
        planned = f"{x['planned']:.0f}" if "planned" in x else "-"
        reused = f"{x['reused']:.0f}" if "reused" in x else "-"
        print(f"{x['weir'][-28:]:<28} {x['change']:<18} {x['syncs']:>5.0f} {x['load_ms']:>8.2f} "
              f"{x['build_ms']:>9.2f} {x['apply_ms']:>9.2f} {planned:>8} {reused:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
