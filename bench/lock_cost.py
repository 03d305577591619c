#!/usr/bin/env python3
"""Benchmark 13: what network lock costs a client (issue 32), lock off and on
side by side in one run.

In network namespaces (root), for 1,000 and 5,000 peers: a server whose
database has N peers in the client's CIDR, `serve`, and a client that joined.
The network is locked as `lock init` locks it (every record signed in one
batch by one lock key); lock off is the same server with its lock tables
emptied, and the client without its lock file. Off and on alternate (off-on,
on-off, ...), on the same server and client:

* a first fetch: the server's state (and its gzip) built before it, the interface down, the data store and lock file removed
  (on: the lock file as a join under lock leaves it, with no memory of
  verified records), then `up IFACE`, which creates the device and adds all
  N peers (median of 7; and the median of each round's on/off ratio, the two
  fetches of a round taken back to back, so a change of load between rounds
  moves both);
* then an unchanged `fetch` (median of the runs), and how many the fast
  path answered (a full sync rewrites `<iface>.fetch`).

And a join: `install` into a network of 20 peers, from the command's start
until it returns (the first state applied), lock off and on (the invitation
carries the lock, the redemption its signed enrollment), median of the runs.

Everything runs this interpreter (the venv's, with PyNaCl: lock needs it), the
same for both sides. Goals: first fetch <= 1.3x, unchanged fetch unchanged,
join <= +50 ms.

    python3 bench/lock_cost.py [--quick]      (as root)
"""
import json
import os
import sqlite3
import statistics
import sys
import time

from common import ROOT, quick, synthetic_server, table, timed
from lab import Lab, start_serve, wait_for

import innernet as I

ROUNDS = 7                      # first fetches on each side, alternating
# The state as the client asks for it (gzip): the server's body and gzip
# caches are filled before each timed fetch, off and on alike, so the timed
# part is the client's (a real server builds them once per revision for all).
STATE = r"""
import gzip, sys, urllib.request
req = urllib.request.Request(f"http://{sys.argv[1]}/v1/user/state",
                             headers={"X-Innernet-Server-Key": sys.argv[2],
                                      "Accept-Encoding": "gzip"})
ans = urllib.request.urlopen(req, timeout=30)
body = ans.read()
print((gzip.decompress(body) if ans.headers.get("Content-Encoding") == "gzip" else body).decode())
"""


def lock_network(db, net, keyfile):
    """`lock init`, straight into the database: (chain entries)."""
    store = I.Store(db)
    private, public = I.lock_keypair()
    I.atomic_write(keyfile, private + "\n", 0o600)
    chain = I.LockChain([I.lock_genesis(net, [(public, "bench")], I.lock_secret(), private,
                                        int(time.time()))])
    keys = {p.ip: p.public_key for p in store.peers()}
    recs = [I.lock_record(net, 1, f, keys.get(f.get("ip")))
            for f in I.lock_projection(store.peers(), store.cidrs(),
                                       store.associations()).values()]
    store.lock_submit(chain.entries, {"batch": I.sign_batch(net, private, recs),
                                      "records": recs}, {}, "10.66.0.1")
    store.close()
    return chain.entries


def lock_rows(db, rows=None):
    """The lock tables' rows, taken out (``rows`` None) or put back: lock off
    and on, for the same server and client, alternately."""
    conn = sqlite3.connect(db, timeout=15)
    try:
        with conn:
            if rows is None:
                rows = {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in I.LOCK_TABLES}
                for t in I.LOCK_TABLES:
                    conn.execute(f"DELETE FROM {t}")
            else:
                for t, rs in rows.items():
                    for r in rs:
                        conn.execute(f"INSERT INTO {t} VALUES ({', '.join('?' * len(r))})", r)
    finally:
        conn.close()
    return rows


def first_fetch(cl, ifname, n, lock_entries):
    """s of `up` with the device, data store and lock memory gone."""
    ns = ["nsenter", f"--net=/var/run/netns/{cl.ns}"]
    lib = cl.path("client", "lib")
    cl.innernet("down", ifname, timeout=120)
    for name in (f"{ifname}.json", f"{ifname}.fetch", f"{ifname}.paths.json",
                 f"{ifname}.lock.json"):
        if os.path.exists(os.path.join(lib, name)):
            os.unlink(os.path.join(lib, name))
    if lock_entries is not None:                # what a join under lock leaves, no memory
        I.save_client_lock(os.path.join(lib, f"{ifname}.lock.json"), {"chain": lock_entries})
    w, _ = timed(ns + cl.innernet_argv("up", ifname, "--no-write-hosts"))
    wait_for(lambda: len(I.UserspaceBackend().get(ifname).peers) >= n, 60,
             "every peer on the device")
    if lock_entries is not None:
        lock = json.load(open(os.path.join(lib, f"{ifname}.lock.json")))
        assert lock.get("known") and not lock.get("refused"), lock.get("refused")
    return w / 1000


def unchanged_fetches(cl, ifname, runs):
    """(median ms of an unchanged `fetch`, how many the fast path answered)."""
    ns = ["nsenter", f"--net=/var/run/netns/{cl.ns}"]
    fetch = ns + cl.innernet_argv("fetch", ifname, "--no-write-hosts")
    record = cl.path("client", "lib", f"{ifname}.fetch")
    timed(fetch)

    def stamp():
        st = os.stat(record) if os.path.exists(record) else None
        return st and (st.st_ino, st.st_mtime_ns)
    walls, full = [], 0
    for _ in range(runs):
        before = stamp()
        w, _ = timed(fetch)
        full += stamp() != before or before is None
        walls.append(w)
    return statistics.median(walls), runs - full


def measure(n, runs):
    """Lock off and on, alternately, on one server and client:
    ((first s, unchanged ms, fast-path runs) off, the same on)."""
    pyz = os.environ.get("INNERNET_PYZ") or os.path.join(ROOT, "innernet.pyz")
    lab = Lab(innernet_cmd=[sys.executable, pyz])
    firsts = {"off": [], "on": []}
    try:
        srv, net, server_key = synthetic_server(lab, n)
        start_serve(srv, net)
        cl = lab.add_host("client")
        ifname = lab.ifname("c")
        cl.innernet("install", "--name", ifname, "--no-write-hosts", srv.path("c.toml"),
                    timeout=300)
        db = srv.path("server", "lib", f"{net}.db")
        entries = lock_network(db, net, srv.path("lock.key"))
        rows = lock_rows(db)                          # off
        unchanged = {}
        key = I.public_key(server_key)

        def serves_lock(on):          # serve sees a change to its database within ~1 s
            wait_for(lambda: ('"lock":' in cl.python(STATE, "10.66.0.1:51820", key).stdout)
                     == on, 30, "the server to see the lock " + ("on" if on else "off"))
        serves_lock(False)
        for i in range(ROUNDS):
            for side in ("off", "on") if i % 2 == 0 else ("on", "off"):
                if side == "on":
                    lock_rows(db, rows)
                serves_lock(side == "on")
                firsts[side].append(first_fetch(cl, ifname, n,
                                                entries if side == "on" else None))
                if i == ROUNDS - 1:
                    unchanged[side] = unchanged_fetches(cl, ifname, runs)
                if side == "on":
                    rows = lock_rows(db)
    finally:
        lab.close()
    pairs = sorted(on / off for on, off in zip(firsts["on"], firsts["off"]))
    return tuple((sorted(firsts[s]),) + unchanged[s] for s in ("off", "on")) + (pairs,)


def joins(runs):
    pyz = os.environ.get("INNERNET_PYZ") or os.path.join(ROOT, "innernet.pyz")
    lab = Lab(innernet_cmd=[sys.executable, pyz])
    out = {"off": [], "on": []}
    try:
        srv, net, _ = synthetic_server(lab, 20)
        start_serve(srv, net)
        for side in ("off", "on"):
            if side == "on":
                lock_network(srv.path("server", "lib", f"{net}.db"), net, srv.path("lock.key"))
            for i in range(runs):
                tag = f"{side}{i}"
                path = srv.path(f"{tag}.toml")
                srv.server("add-peer", net, "--name", tag, "--cidr", "peers", "--admin",
                           "false", "--auto-ip", "--save-config", path, "--invite-expires",
                           "1h", "--yes", *(["--lock-key", srv.path("lock.key")]
                                            if side == "on" else []))
                host = lab.add_host(tag)
                ns = ["nsenter", f"--net=/var/run/netns/{host.ns}"]
                w, _ = timed(ns + host.innernet_argv("install", "--name", lab.ifname(tag),
                                                     "--no-write-hosts", path))
                out[side].append(w)
                if side == "on":
                    lock = json.load(open(host.path("client", "lib",
                                                    f"{lab.ifname(tag)}.lock.json")))
                    assert lock.get("known") and not lock.get("refused"), lock.get("refused")
    finally:
        lab.close()
    return statistics.median(out["off"]), statistics.median(out["on"])


def main():
    sizes = [300] if quick() else [1000, 5000]
    runs = 3 if quick() else 7
    rows = []
    for n in sizes:
        (a_off, u_off, fp_off), (a_on, u_on, fp_on), pairs = measure(n, runs)
        f_off, f_on = statistics.median(a_off), statistics.median(a_on)
        rows.append((f"{n:,}", f"{f_off:.2f} ({a_off[0]:.2f}-{a_off[-1]:.2f})",
                     f"{f_on:.2f} ({a_on[0]:.2f}-{a_on[-1]:.2f})", f"{f_on / f_off:.2f}x",
                     f"{statistics.median(pairs):.2f}x ({pairs[0]:.2f}-{pairs[-1]:.2f})",
                     f"{u_off:.0f}", f"{u_on:.0f}", f"{u_on / u_off:.2f}x",
                     f"{fp_off} / {fp_on} of {runs}"))
    table(f"Network lock: first fetch (`up`: device created, all peers added; median of {ROUNDS}) "
          f"and unchanged `fetch` (median of {runs}), lock off and on, one run",
          ["peers", "first off s (min-max)", "first on s (min-max)", "first on/off",
           "per-round on/off (min-max)",
           "unchanged off ms",
           "unchanged on ms", "unchanged on/off", "fast path off / on"], rows)
    j_off, j_on = joins(3 if quick() else 5)
    table("Network lock: `install` (join) in a 20-peer network, command start to return",
          ["lock off ms", "lock on ms", "difference ms"],
          [(f"{j_off:.0f}", f"{j_on:.0f}", f"{j_on - j_off:+.0f}")])


if __name__ == "__main__":
    main()
