#!/usr/bin/env python3
"""What a second worker adds (issue 20): one worker against two, same streams, same load.

`--streams` EventStreams (store + broker, one database) in a generated manifest folder. First
one `weir run` worker, then two on the same folder and database (a fresh database each time).
`--threads` publishers post batches of `--batch` events (512-byte JSON payloads, unique ids)
as fast as they are answered for `--duration` seconds, each walking the streams round-robin
from stream k. Publisher k posts to worker k mod W (every worker appends to every stream), or
with `--affinity` each stream's requests go to worker (stream mod W). Reported per set-up: events stored per second
(201s only), request p50/p99, each worker's appends by path (`weir_store_appends_total`) and
the events each worker's relays published (`weir_relay_events_total`): which worker owns which
stream's relay. Python 3 stdlib only; the publishers share one interpreter, so compare the two
set-ups of one run, not absolute rates.

    benches/scale/workers.py --weir target/release/weir --streams 8 --duration 20

Needs PostgreSQL (user postgres, trust) and RabbitMQ (guest/guest) on 127.0.0.1. Cleans up:
SIGTERM to the workers, the databases dropped (FORCE), the manifest folder removed (kept, with
the workers' logs, when a run fails). The streams' exchanges (the namespace's
defaults, no queue bound) are left to RabbitMQ and reused by the next run.
"""

import argparse
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

NS = "workers"
PAYLOAD = json.dumps({"orderId": "x" * 480, "amount": 1})


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def psql(sql):
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1",
                    "-qAtc", sql], check=True, capture_output=True, text=True)


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
    for i in range(streams):
        docs.append(f"""apiVersion: weir.dev/v1alpha1
kind: EventStream
metadata: {{name: s{i}, namespace: {NS}}}
spec:
  broker: {{urlSecretRef: {{name: mq, key: url}}, queueType: quorum}}
  store: {{urlSecretRef: {{name: pg, key: url}}}}
  batching: {{maxEvents: 200, maxDelay: 5ms}}
  validation: {{allowUnknownTypes: true}}
""")
    with open(os.path.join(folder, "streams.yaml"), "w") as f:
        f.write("---\n".join(docs))


def metrics(admin_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    paths, relayed = {}, {}
    for line in text.splitlines():
        m = re.match(r'weir_store_appends_total\{.*path="(\w+)".*\} (\S+)', line)
        if m:
            paths[m.group(1)] = paths.get(m.group(1), 0) + int(float(m.group(2)))
        m = re.match(r'weir_relay_events_total\{.*stream="(\w+)".*\} (\S+)', line)
        if m and float(m.group(2)) > 0:
            relayed[m.group(1)] = relayed.get(m.group(1), 0) + int(float(m.group(2)))
    return paths, relayed


def ready(admin_port, deadline):
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"worker on admin port {admin_port} not ready")


def publisher(k, ports, streams, batch, affinity, stop, out):
    # Without affinity publisher k keeps to worker k mod W (as a load balancer spreading
    # connections would); with it, each request goes to worker (stream mod W).
    conns = [http.client.HTTPConnection("127.0.0.1", p, timeout=30) for p in ports]
    # One body template per publisher; `@@` becomes the request's unique prefix.
    template = json.dumps([{"type": "order.created", "id": f"@@-{i}", "subject": f"o-{i}",
                            "data": json.loads(PAYLOAD)} for i in range(batch)]).encode()
    stored, lat, r = 0, [], 0
    while not stop.is_set():
        stream = (k + r) % streams
        body = template.replace(b"@@", f"p{k}-{r}".encode())
        conn = conns[stream % len(conns)] if affinity else conns[k % len(conns)]
        t0 = time.perf_counter()
        conn.request("POST", f"/v1/namespaces/{NS}/streams/s{stream}/events", body,
                     {"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        lat.append(time.perf_counter() - t0)
        if resp.status == 201:
            stored += batch
        r += 1
    out[k] = (stored, lat)


def guarded(errors, f, *args):
    try:
        f(*args)
    except Exception as e:  # reported by the caller, with the workers' logs
        errors.append(repr(e))


def run(args, workers, tag):
    db = f"weir_workers_{tag}_{workers}"
    psql(f"CREATE DATABASE {db}")
    folder = tempfile.mkdtemp(prefix="weir-workers-")
    manifests(folder, db, args.streams, tag)
    procs, ports, logs = [], [], []
    done = False
    try:
        for w in range(workers):
            port, admin = 18500 + 2 * w, 18501 + 2 * w
            logs.append(open(os.path.join(folder, f"w{w}.log"), "w"))
            procs.append(subprocess.Popen(
                [args.weir, "run", "-f", folder, "--listen", f"127.0.0.1:{port}",
                 "--admin-listen", f"127.0.0.1:{admin}"],
                stdout=subprocess.DEVNULL, stderr=logs[-1]))
            ports.append((port, admin))
        for _, admin in ports:
            ready(admin, time.time() + 60)
        time.sleep(2)  # every relay owned, every stream Ready
        stop, out, threads = threading.Event(), {}, []
        errors = []
        for k in range(args.threads):
            t = threading.Thread(target=guarded, args=(errors, publisher,
                k, [p for p, _ in ports], args.streams, args.batch, args.affinity, stop, out))
            t.start()
            threads.append(t)
        started = time.perf_counter()
        time.sleep(args.duration)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        if errors:
            raise SystemExit(f"a publisher failed: {errors[0]} (logs in {folder})")
        time.sleep(2)  # relays catch up
        stored = sum(v[0] for v in out.values())
        lat = sorted(x for v in out.values() for x in v[1])
        per_worker = [metrics(admin) for _, admin in ports]
        done = True
        return {
            "workers": workers,
            "events_per_s": stored / elapsed,
            "p50_ms": 1e3 * lat[len(lat) // 2] if lat else None,
            "p99_ms": 1e3 * lat[int(len(lat) * 0.99)] if lat else None,
            "paths": [p for p, _ in per_worker],
            "relayed": [r for _, r in per_worker],
        }
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
        psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        # The folder (manifests, the workers' logs) is kept when the run failed.
        if done:
            shutil.rmtree(folder, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weir", required=True)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--affinity", action="store_true",
                    help="send each stream's requests to one worker (stream mod workers)")
    ap.add_argument("--json")
    args = ap.parse_args()
    tag = secrets.token_hex(3)
    results = []
    for workers in (1, 2):
        log(f"{workers} worker(s), {args.streams} streams, {args.threads} publishers")
        results.append(run(args, workers, tag))
    print("| workers | events/s | p50 ms | p99 ms | appends by path, per worker | "
          "streams relayed, per worker |")
    print("|---|---|---|---|---|---|")
    for r in results:
        paths = "; ".join(", ".join(f"{k} {v}" for k, v in sorted(p.items()) if v)
                          for p in r["paths"])
        relayed = "; ".join(str(len(x)) for x in r["relayed"])
        print(f"| {r['workers']} | {r['events_per_s']:.0f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {paths} | {relayed} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
