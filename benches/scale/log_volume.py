#!/usr/bin/env python3
"""Log volume of events nobody takes (issue 23).

One stream with `store` and `broker` and no subscription: every event the relay publishes
comes back from RabbitMQ unroutable. The worker runs with `RUST_LOG=info` explicitly (the
setting that used to log each returned message, ~2.4 KB a line); the script publishes
`--events` events (batches of 100, JSON array bodies, 3 keep-alive connections in threads),
waits until `weir_relay_events_total{outcome="unroutable"}` reaches the number published, and
reports the log's size in bytes and lines and the publish rate. Python 3 stdlib only.

    benches/scale/log_volume.py --weir /tmp/weir-release --events 1000000

Needs PostgreSQL (user postgres, trust) and RabbitMQ (guest/guest, management API on
:15672) on 127.0.0.1. Cleans up after itself: SIGTERM to the worker, database dropped, the
stream's exchange deleted.
"""

import argparse
import base64
import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
MGMT = "http://127.0.0.1:15672"
MGMT_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def psql(sql, db="postgres"):
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1",
         "-qAtc", sql],
        check=True, capture_output=True, text=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def mgmt(method, path):
    req = urllib.request.Request(MGMT + path, method=method,
                                 headers={"authorization": MGMT_AUTH})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def unroutable(admin):
    """Sum of weir_relay_events_total{outcome="unroutable"} on the admin port's /metrics."""
    _, body = get(f"http://{admin}/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("weir_relay_events_total{") and 'outcome="unroutable"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weir", default="/tmp/weir-release")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rust-log", default="info")
    ap.add_argument("--relay-timeout", type=float, default=900.0,
                    help="seconds to wait for the unroutable counter after publishing")
    ap.add_argument("--keep-log", default=None, help="copy the worker's log here")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    a = ap.parse_args()

    tag = secrets.token_hex(4)
    db = f"weir_logvol_{tag}"
    exchange = f"weir.logvol-{tag}"
    ns, stream = "logvol", "unrouted"
    workdir = tempfile.mkdtemp(prefix="weir-logvol-")
    mdir = os.path.join(workdir, "manifests")
    os.mkdir(mdir)
    log_path = os.path.join(workdir, "worker.log")
    port, admin_port = free_port(), free_port()
    listen, admin = f"127.0.0.1:{port}", f"127.0.0.1:{admin_port}"

    psql(f"CREATE DATABASE {db}")
    with open(os.path.join(mdir, "pipeline.yaml"), "w") as f:
        f.write(
            f"apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {ns}}}\n"
            f"stringData: {{url: \"{AMQP_URL}\"}}\n---\n"
            f"apiVersion: v1\nkind: Secret\nmetadata: {{name: pg, namespace: {ns}}}\n"
            f"stringData: {{url: \"postgres://postgres@127.0.0.1:5432/{db}\"}}\n---\n"
            f"apiVersion: weir.dev/v1alpha1\nkind: EventStream\n"
            f"metadata: {{name: {stream}, namespace: {ns}}}\nspec:\n"
            f"  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, exchange: {exchange}}}\n"
            f"  store: {{urlSecretRef: {{name: pg, key: url}}}}\n")

    env = dict(os.environ, RUST_LOG=a.rust_log)
    env.pop("WEIR_LOG_FORMAT", None)
    logf = open(log_path, "wb")
    proc = subprocess.Popen(
        [a.weir, "run", "-f", mdir, "--listen", listen, "--admin-listen", admin],
        stdout=logf, stderr=logf, env=env)
    result = {"events": a.events, "batch": a.batch, "clients": a.clients,
              "rust_log": a.rust_log, "db": db, "exchange": exchange}
    try:
        t0 = time.monotonic()
        while True:
            try:
                if get(f"http://{admin}/readyz", timeout=2)[0] == 200:
                    break
            except (OSError, urllib.error.URLError):
                pass
            if proc.poll() is not None:
                raise SystemExit(f"weir exited with {proc.returncode} before /readyz")
            if time.monotonic() - t0 > 120:
                raise SystemExit("/readyz not 200 within 120 s")
            time.sleep(0.2)
        print(f"ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        log_ready = os.path.getsize(log_path)

        path = f"/v1/namespaces/{ns}/streams/{stream}/events"
        batches = (a.events + a.batch - 1) // a.batch
        next_batch = [0]
        lock = threading.Lock()
        stats = {"requests": 0, "retries": 0, "errors": []}

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while True:
                with lock:
                    b = next_batch[0]
                    if b >= batches:
                        break
                    next_batch[0] += 1
                lo, hi = b * a.batch, min(a.events, (b + 1) * a.batch)
                body = json.dumps([{"type": "t", "data": {"i": i}} for i in range(lo, hi)])
                for attempt in range(20):
                    try:
                        conn.request("POST", path, body=body,
                                     headers={"content-type": "application/json"})
                        r = conn.getresponse()
                        data = r.read()
                    except (OSError, http.client.HTTPException) as e:
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                        err = f"{type(e).__name__}: {e}"
                    else:
                        if 200 <= r.status < 300:
                            with lock:
                                stats["requests"] += 1
                            break
                        err = f"{r.status}: {data[:200]!r}"
                    with lock:
                        stats["retries"] += 1
                    time.sleep(min(2.0, 0.05 * 2 ** attempt))
                else:
                    with lock:
                        stats["errors"].append(f"batch {b}: {err}")
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        t_pub = time.monotonic()
        for t in threads:
            t.start()
        last = time.monotonic()
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            if time.monotonic() - last >= 10:
                last = time.monotonic()
                done = stats["requests"] * a.batch
                print(f"  published {done:,} ({done / (last - t_pub):,.0f} ev/s), "
                      f"log {os.path.getsize(log_path):,} B", file=sys.stderr)
        publish_s = time.monotonic() - t_pub
        published = min(a.events, stats["requests"] * a.batch)
        print(f"published {published:,} in {publish_s:.1f} s "
              f"({published / publish_s:,.0f} ev/s), retries {stats['retries']}, "
              f"failed batches {len(stats['errors'])}", file=sys.stderr)

        t_relay = time.monotonic()
        seen = 0
        while True:
            try:
                seen = unroutable(admin)
            except (OSError, urllib.error.URLError):
                pass
            if seen >= published:
                break
            if time.monotonic() - t_relay > a.relay_timeout:
                print(f"unroutable counter at {seen:,} of {published:,} after "
                      f"{a.relay_timeout:.0f} s", file=sys.stderr)
                break
            time.sleep(1)
        relay_done_s = time.monotonic() - t_pub
        size = os.path.getsize(log_path)
        with open(log_path, "rb") as f:
            text = f.read()
        lines = text.count(b"\n")
        levels = {}
        for m in re.finditer(rb"\b(TRACE|DEBUG|INFO|WARN|ERROR)\b", text):
            levels[m.group(1).decode()] = levels.get(m.group(1).decode(), 0) + 1
        result.update({
            "published": published,
            "publish_s": round(publish_s, 2),
            "publish_rate_ev_s": round(published / publish_s),
            "publish_retries": stats["retries"],
            "failed_batches": len(stats["errors"]),
            "failed_examples": stats["errors"][:5],
            "unroutable": seen,
            "unroutable_reached_s": round(relay_done_s, 2),
            "log_bytes": size,
            "log_lines": lines,
            "log_bytes_at_ready": log_ready,
            "log_level_words": levels,
        })
        if a.keep_log:
            with open(a.keep_log, "wb") as f:
                f.write(text)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()
        try:
            psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        except subprocess.CalledProcessError as e:
            print(f"drop database: {e.stderr}", file=sys.stderr)
        code = mgmt("DELETE", "/api/exchanges/%2F/" + urllib.parse.quote(exchange, safe=""))
        result["exchange_deleted"] = code
    result["log_file_after_stop_bytes"] = os.path.getsize(log_path)
    print(json.dumps(result, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"log: {result.get('log_bytes', 0):,} bytes, {result.get('log_lines', 0):,} lines "
          f"for {result.get('unroutable', 0):,} unroutable events "
          f"(target < 1 MB: {'met' if result.get('log_bytes', 1 << 30) < 1_000_000 else 'MISSED'})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
