#!/usr/bin/env python3
"""Python `eventsourcing` (9.x, PostgreSQL persistence) on the same PostgreSQL, same durability
settings and the same ~512-byte events as `weir bench ingest`.

  bulk   : save() of an aggregate with 100 new events per call (4 threads)
  single : one event per save() (64 threads)

Run through `eventsourcing.sh`, which installs the package into a private virtualenv.
Prints one JSON object per line: {"system", "mode", "events_per_s", ...}.
Env: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres), SECONDS_PER_RUN (10).
"""

import importlib.metadata
import json
import os
import subprocess
import threading
import time
import uuid

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

SECONDS = float(os.environ.get("SECONDS_PER_RUN", "10"))
NOTE = "x" * 440


class Order(Aggregate):
    @event("Created")
    def __init__(self, order_id: str):
        self.order_id = order_id

    @event("Noted")
    def note(self, text: str):
        pass


def app_for(db: str) -> Application:
    return Application(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": db,
            "POSTGRES_HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "POSTGRES_PORT": os.environ.get("PGPORT", "5432"),
            "POSTGRES_USER": os.environ.get("PGUSER", "postgres"),
            "POSTGRES_PASSWORD": os.environ.get("PGPASSWORD", "trust"),
            "POSTGRES_POOL_SIZE": "64",
            "POSTGRES_MAX_OVERFLOW": "0",
            "CREATE_TABLE": "y",
        }
    )


def run(app: Application, threads: int, events_per_save: int) -> float:
    stop = time.monotonic() + SECONDS
    counts = [0] * threads

    def work(i: int) -> None:
        while time.monotonic() < stop:
            order = Order(order_id=str(uuid.uuid4()))
            for _ in range(events_per_save - 1):
                order.note(NOTE)
            app.save(order)
            counts[i] += events_per_save

    started = time.monotonic()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def main() -> None:
    db = f"weir_peer_es_{os.getpid()}"
    env = dict(os.environ, PGHOST=os.environ.get("PGHOST", "127.0.0.1"), PGUSER=os.environ.get("PGUSER", "postgres"))
    subprocess.run(["createdb", db], check=True, env=env)
    try:
        app = app_for(db)
        version = importlib.metadata.version("eventsourcing")
        for mode, threads, per_save in (("bulk", 4, 100), ("single", 64, 1)):
            rate = run(app, threads, per_save)
            print(json.dumps({"system": f"eventsourcing {version}", "mode": mode, "connections": threads, "events_per_s": rate}), flush=True)
        app.close()
    finally:
        subprocess.run(["dropdb", "--if-exists", "--force", db], env=env)


if __name__ == "__main__":
    main()
