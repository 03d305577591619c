"""Crash safety and concurrency: kill -9 during bursts of writes; atomic files.

A real server in a child process, on loopback (peers at 127.1.x.y, so each
client is its peer by source address). Counts are printed by the suite.
"""
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import innernet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import innernet
cfg = innernet.ServerConfig(sys.argv[3], 51820, "127.0.0.1", 8)
co = innernet.Coordinator(innernet.Store(sys.argv[2]), cfg, "crash", local_callers=True)
httpd = innernet.make_api_server(co, "127.0.0.1", 0)
print(httpd.server_address[1], flush=True)
httpd.serve_forever()
"""

INVITES = 20


def make_db(path):
    key = innernet.generate_private_key()
    s = innernet.Store(str(path), create=True)
    s.create_network("crash", innernet.parse_network("127.0.0.0/8"),
                     innernet.parse_ip("127.0.0.1"), innernet.public_key(key), "127.0.0.1:1")
    c = s.add_cidr(innernet.Cidr(None, "c", "127.1.0.0/16", 1))
    s.add_peer(innernet.Peer(None, "admin", "127.1.0.1", c.id, innernet.public_key(
        innernet.generate_private_key()), is_admin=True, is_redeemed=True))
    return key, c.id


def start(db, key):
    proc = subprocess.Popen([sys.executable, "-c", SERVER, ROOT, str(db), key],
                            stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def client(port, key, ip):
    return innernet.ApiClient(f"127.0.0.1:{port}", innernet.public_key(key), timeout=15,
                              source_address=(ip, 0))


def burst(port, key, rnd, cidr_id, invites, acked, stop):
    """Admin writers and invitees redeeming at once; record what got a 2xx."""
    def admin_writer(t):
        api = None
        for i in range(10 ** 6):
            if stop.is_set():
                return
            try:
                if api is None:
                    api = client(port, key, "127.1.0.1")
                name = f"r{rnd}t{t}n{i}"
                api.call("POST", "/admin/cidrs", {"name": name, "cidr": f"127.{2 + rnd}.{t * 60 + i}.0/24"
                                                  if i < 60 else f"127.{100 + rnd}.{t}.{i % 250}/32",
                                                  "parent": 1})
                acked["cidrs"].append(name)
            except innernet.InnernetError:
                return

    def redeemer(ip, new_key):
        try:
            client(port, key, ip).call("POST", "/user/redeem", {"public_key": new_key})
            acked["redeems"].append((ip, new_key))
        except innernet.InnernetError:
            pass

    threads = [threading.Thread(target=admin_writer, args=(t,)) for t in range(4)]
    threads += [threading.Thread(target=redeemer, args=inv) for inv in invites]
    for t in threads:
        t.start()
    return threads


def test_kill_9_during_writes_loses_no_acknowledged_write(tmp_path, counts):
    db = tmp_path / "crash.db"
    key, cidr_id = make_db(db)
    verified = faults = 0
    for rnd in range(6):
        store = innernet.Store(str(db))
        invites = []
        for i in range(INVITES):
            ip = f"127.1.{rnd + 1}.{i + 1}"
            store.add_peer(innernet.Peer(None, f"inv{rnd}-{i}", ip, cidr_id, innernet.public_key(
                innernet.generate_private_key()), invite_expires=int(time.time()) + 600))
            invites.append((ip, innernet.public_key(innernet.generate_private_key())))
        store.close()
        proc, port = start(db, key)
        acked = {"cidrs": [], "redeems": []}
        stop = threading.Event()
        threads = burst(port, key, rnd, cidr_id, invites, acked, stop)
        time.sleep(random.uniform(0.2, 0.6))
        proc.send_signal(signal.SIGKILL)                    # mid-burst
        proc.wait(timeout=10)
        faults += 1
        stop.set()
        for t in threads:
            t.join(timeout=20)
        conn = sqlite3.connect(str(db))
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        conn.close()
        store = innernet.Store(str(db))                     # recovers a hot journal
        names = {c.name for c in store.cidrs()}
        for name in acked["cidrs"]:
            assert name in names, f"acknowledged CIDR {name} lost"
        by_ip = {p.ip: p for p in store.peers()}
        for ip, new_key in acked["redeems"]:
            assert by_ip[ip].is_redeemed and by_ip[ip].public_key == new_key
        verified += len(acked["cidrs"]) + len(acked["redeems"])
        store.close()
    counts["server kill -9 faults injected"] = faults
    counts["acknowledged writes verified after kill -9"] = verified
    assert verified > 50


def test_concurrent_admin_edits_and_redemptions_lose_nothing(tmp_path, counts):
    db = tmp_path / "conc.db"
    key, cidr_id = make_db(db)
    store = innernet.Store(str(db))
    invites = []
    for i in range(INVITES):
        ip = f"127.1.9.{i + 1}"
        store.add_peer(innernet.Peer(None, f"inv-{i}", ip, cidr_id, innernet.public_key(
            innernet.generate_private_key()), invite_expires=int(time.time()) + 600))
        invites.append((ip, innernet.public_key(innernet.generate_private_key())))
    store.close()
    proc, port = start(db, key)
    try:
        acked = {"cidrs": [], "redeems": []}
        stop = threading.Event()
        threads = burst(port, key, 0, cidr_id, invites, acked, stop)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    store = innernet.Store(str(db))
    assert len(acked["redeems"]) == INVITES                  # 20 at once, all succeed
    assert {c.name for c in store.cidrs()} >= set(acked["cidrs"])
    assert len([c for c in store.cidrs() if c.name.startswith("r0t")]) == len(acked["cidrs"])
    counts["simultaneous API redemptions (all succeeded)"] = len(acked["redeems"])
    counts["concurrent admin writes verified"] = len(acked["cidrs"])


WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import innernet
path, mode = sys.argv[2], sys.argv[3]
a, b = "A" * 200000 + "\n", "B" * 300000 + "\n"
i = 0
while True:
    i += 1
    if mode == "file":
        innernet.atomic_write(path, a if i % 2 else b)
    else:
        innernet.write_hosts_file(path, "innernet x", [f"10.0.0.{i % 200 + 1} p{i}"])
    if i == 1:
        print("wrote", flush=True)     # the test kills only after the first write
"""


def test_kill_9_mid_write_leaves_the_old_or_the_new_file(tmp_path, counts):
    kills = 0
    for mode in ("file", "hosts"):
        path = tmp_path / f"target-{mode}"
        path.write_text("127.0.0.1 localhost\n" if mode == "hosts" else "A" * 200000 + "\n")
        for _ in range(25):
            proc = subprocess.Popen([sys.executable, "-c", WRITER, ROOT, str(path), mode],
                                    stdout=subprocess.PIPE)
            # A slow interpreter may take longer to start than any fixed delay:
            # wait (bounded) for the first write, then kill at a random moment.
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready and proc.stdout.readline() == b"wrote\n", "the writer never wrote"
            proc.stdout.close()
            time.sleep(random.uniform(0.0, 0.2))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            kills += 1
            text = path.read_text()
            if mode == "file":
                assert text in ("A" * 200000 + "\n", "B" * 300000 + "\n"), len(text)
            else:
                assert text.startswith("127.0.0.1 localhost\n")
                assert text.count("BEGIN") == 1 and text.rstrip().endswith("END")
    counts["writers killed mid atomic write (files intact)"] = kills
