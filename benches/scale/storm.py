#!/usr/bin/env python3
"""Memory and log during a storm of failures (issue 23).

One worker with `--streams` EventStreams (store + broker, one database owned by a role of
its own, `CONNECTION LIMIT 20`) and one Subscription per stream delivering to a small HTTP
sink run by this script (200 to every POST). Once every resource is Ready, PostgreSQL refuses
the role for `--outage` seconds (`ALTER ROLE … CONNECTION LIMIT 0` and its sessions
terminated); every `--sample` seconds the script records the worker's RSS, open fds and CPU,
the EventStreams that say Ready=false with reason StoreUnavailable, the `/v1/status` answer
time and the log lines so far. Then the limit is restored, and it waits for every resource to
be Ready again. One event is published to every stream before the outage and after the
recovery; both rounds must reach the sink. Python 3 stdlib only.

    benches/scale/storm.py --weir /tmp/weir-release --streams 1000 --outage 300

Needs PostgreSQL (user postgres, trust) and RabbitMQ (guest/guest, management API on
:15672) on 127.0.0.1. Cleans up: SIGTERM to the worker, database dropped (FORCE), role
dropped, the run's queues and exchanges deleted (their names carry the run's tag).
"""

import argparse
import base64
import http.client
import http.server
import json
import os
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
NS = "storm"
TICK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def psql(sql, db="postgres"):
    r = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1",
         "-qAtc", sql],
        check=True, capture_output=True, text=True)
    return r.stdout.strip()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def amqp_answers(timeout=5.0):
    """A raw AMQP handshake: RabbitMQ answers the protocol header with Connection.Start."""
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=timeout) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            return len(s.recv(8)) > 0
    except OSError:
        return False


def mgmt(method, path):
    req = urllib.request.Request(MGMT + path, method=method,
                                 headers={"authorization": MGMT_AUTH})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def delete_broker_objects(tag):
    """Deletes the queues and exchanges whose names contain the run's tag."""
    deleted = {"queues": 0, "exchanges": 0}
    for kind in ("queues", "exchanges"):
        try:
            code, body = mgmt("GET", f"/api/{kind}/%2F?columns=name")
        except OSError as e:
            log(f"management API: {e}")
            continue
        if code != 200:
            continue
        for o in json.loads(body):
            name = o.get("name", "")
            if tag in name:
                c, _ = mgmt("DELETE", f"/api/{kind}/%2F/" + urllib.parse.quote(name, safe=""))
                if c in (200, 204):
                    deleted[kind] += 1
    return deleted


class Proc:
    def __init__(self, pid):
        self.pid = pid

    def rss_mb(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return None

    def fds(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self):
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def cpu_s(self):
        with open(f"/proc/{self.pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / TICK


def status(admin, timeout=10.0):
    """(seconds to answer, resources) of /v1/status; (elapsed, None) without an answer."""
    t = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://{admin}/v1/status", timeout=timeout) as r:
            body = r.read()
        return time.monotonic() - t, json.loads(body).get("resources", [])
    except (OSError, urllib.error.URLError, ValueError):
        return time.monotonic() - t, None


def not_ready_reasons(rs):
    """{kind: {reason of the first False condition: count}} of the resources not Ready."""
    out = {}
    for r in rs:
        if r.get("ready"):
            continue
        reason = next((c.get("reason") for c in r.get("conditions", [])
                       if c.get("status") == "False"), "?")
        k = out.setdefault(r.get("kind", "?"), {})
        k[reason] = k.get(reason, 0) + 1
    return out


def store_unavailable(rs):
    return sum(1 for r in rs
               if r.get("kind") == "EventStream" and r.get("ready") is False
               and any(c.get("reason") == "StoreUnavailable" for c in r.get("conditions", [])))


def count_lines(path):
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def wait_all_ready(admin, want, within, proc, trace=None):
    """Polls /v1/status (1 s apart) until `want` resources are all Ready; answers
    (seconds, worst answer, polls, polls without an answer once it answered, last reasons). With `trace` (a list), appends
    every 5 s: Ready per kind, RSS, threads."""
    t0 = time.monotonic()
    worst, polls, misses, reasons = 0.0, 0, 0, {}
    p, next_trace, answered = Proc(proc.pid), 0.0, False
    while True:
        took, rs = status(admin)
        polls += 1
        worst = max(worst, took)
        if rs is None:
            # Before the first answer the worker is not listening yet: not a miss.
            misses += 1 if answered else 0
        else:
            answered = True
            ready = sum(1 for r in rs if r.get("ready"))
            reasons = not_ready_reasons(rs)
            if trace is not None and time.monotonic() - t0 >= next_trace:
                next_trace += 5.0
                kinds = {}
                for r in rs:
                    if r.get("ready"):
                        kinds[r.get("kind")] = kinds.get(r.get("kind"), 0) + 1
                trace.append({"t_s": round(time.monotonic() - t0, 1), "listed": len(rs),
                              "ready": kinds, "status_s": round(took, 3),
                              "rss_mb": round(p.rss_mb(), 1), "threads": p.threads(),
                              "fds": p.fds()})
                log(f"  +{trace[-1]['t_s']}s: {trace[-1]}")
            if ready == want and len(rs) == want:
                return time.monotonic() - t0, worst, polls, misses, {}
        if proc.poll() is not None:
            raise SystemExit(f"weir exited with {proc.returncode}")
        if time.monotonic() - t0 > within:
            return None, worst, polls, misses, reasons
        time.sleep(1.0)


class SinkHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    got = set()
    posts = 0
    lock = threading.Lock()

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        with SinkHandler.lock:
            SinkHandler.posts += 1
            if self.headers.get("ce-id"):
                SinkHandler.got.add(self.headers["ce-id"])
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def publish_round(port, n, round_name, workers=8):
    """One event to each of the `n` streams; answers (acknowledged ids, refusals)."""
    acked, refused = [], []
    nxt = [0]
    lock = threading.Lock()

    def work():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        while True:
            with lock:
                i = nxt[0]
                if i >= n:
                    break
                nxt[0] += 1
            eid = f"{round_name}-{i}"
            body = json.dumps({"type": "storm.tick", "id": eid, "data": {"i": i}})
            try:
                conn.request("POST", f"/v1/namespaces/{NS}/streams/s{i:04}/events", body=body,
                             headers={"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                ok, why = 200 <= r.status < 300, str(r.status)
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
                ok, why = False, f"{type(e).__name__}"
            with lock:
                (acked if ok else refused).append(eid if ok else f"{eid}: {why}")
        conn.close()

    ts = [threading.Thread(target=work) for _ in range(workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return acked, refused


def wait_delivered(ids, within):
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        with SinkHandler.lock:
            missing = [i for i in ids if i not in SinkHandler.got]
        if not missing:
            return time.monotonic() - t0, []
        time.sleep(0.5)
    return None, missing


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weir", default="/tmp/weir-release")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--limit", type=int, default=20, help="the role's connection limit")
    ap.add_argument("--outage", type=float, default=300.0, help="seconds of refusal")
    ap.add_argument("--sample", type=float, default=15.0, help="seconds between samples")
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    ap.add_argument("--rust-log", default="info")
    ap.add_argument("--keep-log", default=None, help="copy the worker's log here")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    a = ap.parse_args()
    n = a.streams
    want = 2 * n

    tag = "st" + secrets.token_hex(3)
    role, db = f"weir_{tag}_r", f"weir_{tag}_d"
    workdir = tempfile.mkdtemp(prefix="weir-storm-")
    mdir = os.path.join(workdir, "manifests")
    os.mkdir(mdir)
    log_path = os.path.join(workdir, "worker.log")
    port, admin_port = free_port(), free_port()
    listen, admin = f"127.0.0.1:{port}", f"127.0.0.1:{admin_port}"
    result = {"tag": tag, "streams": n, "subscriptions": n, "role_limit": a.limit,
              "outage_s": a.outage, "rust_log": a.rust_log, "log": log_path,
              "amqp_before": amqp_answers()}
    log(f"run {tag}: RabbitMQ answers AMQP: {result['amqp_before']}")

    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SinkHandler)
    sink.daemon_threads = True
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sink_url = f"http://127.0.0.1:{sink.server_address[1]}/"

    psql(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT {a.limit}")
    psql(f"CREATE DATABASE {db} OWNER {role}")
    docs = [
        f"apiVersion: v1\nkind: Secret\nmetadata: {{name: rabbitmq, namespace: {NS}}}\n"
        f"stringData: {{url: \"{AMQP_URL}\"}}\n",
        f"apiVersion: v1\nkind: Secret\nmetadata: {{name: pg, namespace: {NS}}}\n"
        f"stringData: {{url: \"postgres://{role}@127.0.0.1:5432/{db}\"}}\n",
    ]
    for i in range(n):
        s = f"s{i:04}"
        docs.append(
            f"apiVersion: weir.dev/v1alpha1\nkind: EventStream\n"
            f"metadata: {{name: {s}, namespace: {NS}}}\nspec:\n"
            f"  broker: {{urlSecretRef: {{name: rabbitmq, key: url}}, exchange: weir.{tag}-{s}}}\n"
            f"  store: {{urlSecretRef: {{name: pg, key: url}}}}\n")
        docs.append(
            f"apiVersion: weir.dev/v1alpha1\nkind: Subscription\n"
            f"metadata: {{name: {tag}-{s}, namespace: {NS}}}\n"
            f"spec:\n  stream: {s}\n  sink: {{uri: \"{sink_url}\"}}\n")
    with open(os.path.join(mdir, "pipeline.yaml"), "w") as f:
        f.write("---\n".join(docs))

    env = dict(os.environ, RUST_LOG=a.rust_log)
    env.pop("WEIR_LOG_FORMAT", None)
    logf = open(log_path, "wb")
    proc = subprocess.Popen(
        [a.weir, "run", "-f", mdir, "--listen", listen, "--admin-listen", admin],
        stdout=logf, stderr=logf, env=env)
    p = Proc(proc.pid)
    samples = []
    limit_zero = False
    try:
        # Start-up.
        trace = []
        ready_s, worst, polls, misses, reasons = wait_all_ready(admin, want, a.ready_timeout,
                                                                proc, trace)
        result["startup"] = {"ready_s": ready_s and round(ready_s, 1),
                             "status_worst_s": round(worst, 3), "status_polls": polls,
                             "status_no_answer": misses, "not_ready": reasons,
                             "trace": trace}
        if ready_s is None:
            log(f"not all Ready after {a.ready_timeout:.0f} s: {reasons}")
            raise SystemExit(1)
        log(f"all {want} Ready in {ready_s:.1f} s (worst /v1/status {worst:.3f} s)")
        time.sleep(5)
        acked, refused = publish_round(port, n, f"{tag}-before")
        took, missing = wait_delivered(acked, 120)
        result["before"] = {"acked": len(acked), "refused": len(refused),
                            "refused_examples": refused[:5],
                            "delivered_s": took and round(took, 1),
                            "missing": len(missing)}
        log(f"before: {len(acked)} acknowledged, delivered in {took}, missing {len(missing)}")
        time.sleep(5)
        took_st, _ = status(admin)
        result["before_outage"] = {
            "rss_mb": round(p.rss_mb(), 1), "fds": p.fds(), "threads": p.threads(),
            "log_lines": count_lines(log_path), "status_s": round(took_st, 3),
            "pg_sessions": int(psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'")),
        }
        log(f"before the outage: {result['before_outage']}")
        lines_before = result["before_outage"]["log_lines"]

        # Outage.
        psql(f"ALTER ROLE {role} CONNECTION LIMIT 0")
        limit_zero = True
        psql(f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{role}'")
        t_out = time.monotonic()
        cpu0 = p.cpu_s()
        k = 0
        while True:
            k += 1
            due = t_out + k * a.sample
            if due > t_out + a.outage + 0.5:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            took_st, rs = status(admin)
            cpu1 = p.cpu_s()
            s = {
                "t_s": round(time.monotonic() - t_out, 1),
                "rss_mb": round(p.rss_mb(), 1),
                "fds": p.fds(),
                "threads": p.threads(),
                "cpu_pct": round(100 * (cpu1 - cpu0) / a.sample, 1),
                "store_unavailable": None if rs is None else store_unavailable(rs),
                "not_ready": None if rs is None else not_ready_reasons(rs),
                "status_s": round(took_st, 3),
                "log_lines": count_lines(log_path),
                "pg_sessions": int(psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'")),
            }
            cpu0 = cpu1
            samples.append(s)
            log(f"outage +{s['t_s']:.0f}s: rss {s['rss_mb']} MB, fds {s['fds']}, cpu {s['cpu_pct']} %, "
                f"StoreUnavailable {s['store_unavailable']}/{n}, /v1/status {s['status_s']} s, "
                f"log {s['log_lines']} lines")
        outage_s = time.monotonic() - t_out

        # Recovery.
        psql(f"ALTER ROLE {role} CONNECTION LIMIT {a.limit}")
        limit_zero = False
        back_trace = []
        back_s, worst, polls, misses, reasons = wait_all_ready(admin, want, a.ready_timeout,
                                                               proc, back_trace)
        lines_end = count_lines(log_path)
        result["outage"] = {"seconds": round(outage_s, 1), "samples": samples}
        result["recovery"] = {
            "ready_s": back_s and round(back_s, 1), "status_worst_s": round(worst, 3),
            "status_polls": polls, "status_no_answer": misses, "not_ready": reasons,
            "rss_mb": round(p.rss_mb(), 1), "fds": p.fds(), "threads": p.threads(),
            "log_lines_outage_and_recovery": lines_end - lines_before,
            "trace": back_trace,
        }
        log(f"recovery: {result['recovery']}")
        if back_s is not None:
            acked, refused = publish_round(port, n, f"{tag}-after")
            took, missing = wait_delivered(acked, 180)
            result["after"] = {"acked": len(acked), "refused": len(refused),
                               "refused_examples": refused[:5],
                               "delivered_s": took and round(took, 1),
                               "missing": len(missing), "missing_examples": missing[:5]}
            log(f"after: {result['after']}")
            time.sleep(30)
            # Relays take their locks back a few seconds after the streams say Ready: the
            # lines of the whole outage and recovery are counted here, once that settled.
            lines_now = count_lines(log_path)
            result["idle_after"] = {"rss_mb": round(p.rss_mb(), 1), "fds": p.fds(),
                                    "log_lines_total": lines_now,
                                    "log_lines_since_outage": lines_now - lines_before}
            log(f"30 s later: {result['idle_after']}")
    finally:
        if limit_zero:
            psql(f"ALTER ROLE {role} CONNECTION LIMIT {a.limit}")
        result["amqp_after"] = amqp_answers()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()
        result["log_lines_total"] = count_lines(log_path)
        result["log_bytes_total"] = os.path.getsize(log_path)
        if a.keep_log:
            subprocess.run(["cp", log_path, a.keep_log], check=False)
        try:
            psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            psql(f"DROP ROLE IF EXISTS {role}")
        except subprocess.CalledProcessError as e:
            log(f"clean-up: {e.stderr}")
        result["deleted"] = delete_broker_objects(tag)
        sink.shutdown()
        print(json.dumps(result, indent=2))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
