"""Delete and re-invite over real tunnels (issue 12, acceptance 1 and 2)."""
import json
import sqlite3
import time

import pytest

from lab import TIMEOUT_SCALE, device_peer_ips, invite, peer_ip, wait_for

from .conftest import network_world

pytestmark = pytest.mark.netns



@pytest.fixture(scope="module")
def world(pyz):
    # A test network: our clients' floor on a deleted peer's quarantine
    # (MIN_QUARANTINE, 7 days) is lowered to 0, so the server's --reuse-after
    # alone decides, as these tests need; test_the_client_floor_... raises it.
    with network_world(pyz, {"humans": "10.66.1.0/24"},
                       env={"INNERNET_MIN_QUARANTINE": "0"}) as w:
        lab = w.lab
        for name, admin in (("admin", "true"), ("alice", "false"), ("bob", "false"),
                            ("carol", "false")):
            host = lab.add_host(name)
            host.innernet("install", "--name", lab.ifname(name), "--no-write-hosts",
                          invite(w.srv, w.net, name, "humans", admin=admin))
            w.hosts[name] = host
        for name in ("alice", "bob"):
            w.hosts[name].spawn_innernet("up.log", "up", lab.ifname(name), "--daemon",
                                         "--no-write-hosts")
        yield w


def ip_of(w, name):
    return peer_ip(w.db, name)


def listed(host, ifname):
    show = json.loads(host.innernet("show", ifname, "--json").stdout)
    return {p["name"] for p in show[0]["peers"]}


def test_delete_reaches_daemon_peers_and_quarantines_the_address(world):
    """Two deletions, so that no step races a quarantine's clock: carol's
    quarantine (an hour) outlasts the test, so the checks made during it hold
    however slow the machine is; dora's (2 s) is waited out before her address
    is handed to a new key. (With one 6 s quarantine for both, the refusal was
    checked 7 to 11 s after it had ended at load 17, and add-peer took the
    address.)"""
    lab, srv, net = world.lab, world.srv, world.net
    alice, bob, admin = world.hosts["alice"], world.hosts["bob"], world.hosts["admin"]
    dora = lab.add_host("dora")
    dora.innernet("install", "--name", lab.ifname("dora"), "--no-write-hosts",
                  invite(srv, net, "dora", "humans"))
    carol_ip, dora_ip = ip_of(world, "carol"), ip_of(world, "dora")
    for host in (alice, bob):
        wait_for(lambda: {carol_ip, dora_ip} <= set(device_peer_ips(host,
                                                                     lab.ifname(host.name))),
                 60, f"{host.name} to have carol and dora")
    start = time.monotonic()
    admin.innernet("delete-peer", lab.ifname("admin"), "--name", "carol", "--reuse-after", "1h",
                   "--yes")
    for host in (alice, bob):
        wait_for(lambda: carol_ip not in device_peer_ips(host, lab.ifname(host.name)), 60,
                 f"carol to leave {host.name}'s device")
    print(f"carol left both daemon peers' devices {time.monotonic() - start:.2f} s after "
          "delete-peer")
    assert "carol" not in listed(alice, lab.ifname("alice"))
    # during the quarantine: --ip refused, --auto-ip skips it (carol's is the
    # lowest free address: the auto-ip peer would take it otherwise)
    refused = srv.server("add-peer", net, "--name", "carol2", "--cidr", "humans", "--admin",
                         "false", "--ip", carol_ip, "--save-config", srv.path("c2.toml"),
                         "--invite-expires", "1h", "--yes", check=False)
    assert refused.returncode == 1 and "quarantined until" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    path = invite(srv, net, "dan", "humans")
    assert ip_of(world, "dan") != carol_ip and path
    # after a quarantine: the address is reused, and the clients that were told
    # accept the new key
    admin.innernet("delete-peer", lab.ifname("admin"), "--name", "dora", "--reuse-after", "2s",
                   "--yes")
    for host in (alice, bob):
        wait_for(lambda: dora_ip not in device_peer_ips(host, lab.ifname(host.name)), 60,
                 f"dora to leave {host.name}'s device")
    (until,), = sqlite3.connect(world.db).execute(
        "SELECT reuse_after FROM deleted_peers WHERE name = 'dora'").fetchall()
    wait_for(lambda: time.time() > until + 0.5, 15, "dora's quarantine to end")
    path = invite(srv, net, "erin", "humans", ip=dora_ip)
    erin = lab.add_host("erin")
    erin.innernet("install", "--name", lab.ifname("erin"), "--no-write-hosts", path)
    for host in (alice, bob):
        wait_for(lambda: dora_ip in device_peer_ips(host, lab.ifname(host.name)), 60,
                 f"{host.name} to take erin at dora's old address")
    assert "PINNING" not in alice.log("up.log") + bob.log("up.log")
    assert carol_ip not in device_peer_ips(alice, lab.ifname("alice"))


def test_the_client_floor_keeps_a_reused_address_from_the_new_key(world):
    """B1 with an honest server: an address reused before the client's floor
    (MIN_QUARANTINE after it heard of the deletion) ends is refused by a
    client that knew the old peer, one line, and the rest of the state
    applies; delete-peer and add-peer say so. (The lab lowers the floor to 0;
    this client runs with the real one.)"""
    lab, srv, net, admin = world.lab, world.srv, world.net, world.hosts["admin"]
    gus = lab.add_host("gus")
    gus.innernet("install", "--name", lab.ifname("gus"), "--no-write-hosts",
                 invite(srv, net, "gus", "humans"))
    gus_ip = ip_of(world, "gus")

    def fetch():
        argv = [a for a in admin.innernet_argv("fetch", lab.ifname("admin"), "--no-write-hosts")
                if not a.startswith("INNERNET_MIN_QUARANTINE=")]
        return admin.exec(argv, check=False)
    assert fetch().returncode == 0
    assert gus_ip in device_peer_ips(admin, lab.ifname("admin"))
    deleted = srv.server("delete-peer", net, "--name", "gus", "--reuse-after", "0s", "--yes")
    assert "refuse a new peer at" in deleted.stderr, deleted.stderr
    assert fetch().returncode == 0                        # heard of the deletion
    path = srv.path("hank.toml")
    added = srv.server("add-peer", net, "--name", "hank", "--cidr", "humans", "--admin",
                       "false", "--ip", gus_ip, "--save-config", path,
                       "--invite-expires", "1h", "--yes")
    assert "refuse 'hank' until" in added.stderr, added.stderr
    ivy = lab.add_host("ivy")
    ivy.innernet("install", "--name", lab.ifname("ivy"), "--no-write-hosts",
                 invite(srv, net, "ivy", "humans"))
    hank = lab.add_host("hank")
    hank.innernet("install", "--name", lab.ifname("hank"), "--no-write-hosts", path)
    out = fetch()
    lines = [ln for ln in out.stderr.splitlines() if "'hank'" in ln and "refused" in ln]
    assert out.returncode == 0 and len(lines) == 1, out.stderr
    held = device_peer_ips(admin, lab.ifname("admin"))
    assert gus_ip not in held and ip_of(world, "ivy") in held         # the rest applied
    # a floor's end changes no state: the client kept no ETag while it held
    # hank back, so its next sync reads the whole state and takes hank (the
    # floor's end played by editing the pin; ninth outside round, K3)
    store = admin.path("client", "lib", f"{lab.ifname('admin')}.json")
    with open(store) as f:
        data = json.load(f)
    assert "etag" not in data
    for p in data["peers"]:
        if p["ip"] == gus_ip and p.get("deleted_until"):
            p["deleted_until"] = 1
    with open(store, "w") as f:
        json.dump(data, f)
    again = fetch()
    assert again.returncode == 0 and gus_ip in device_peer_ips(admin, lab.ifname("admin")), \
        again.stderr
    # the daemons (floor 0) take hank at once
    wait_for(lambda: gus_ip in device_peer_ips(world.hosts["alice"], lab.ifname("alice")),
             20, "alice to take hank")


def test_an_expired_invitation_is_reissued_and_the_old_one_refused(world):
    lab, srv, net = world.lab, world.srv, world.net
    old = invite(srv, net, "frank", "humans", expires="1s")
    (expires,), = sqlite3.connect(world.db).execute(
        "SELECT invite_expires FROM peers WHERE name = 'frank'").fetchall()
    wait_for(lambda: time.time() > expires + 0.5, 10, "the invitation to expire")
    frank = lab.add_host("frank")
    r = frank.innernet("install", "--name", lab.ifname("frank"), "--no-write-hosts", old,
                       check=False)
    assert r.returncode == 1 and "innernet: error:" in r.stderr
    new = srv.path("frank-again.toml")
    srv.server("reinvite", net, "--name", "frank", "--invite-expires", "1h", "--save-config",
               new, "--yes")
    r = frank.innernet("install", "--name", lab.ifname("frank"), "--no-write-hosts", old,
                       check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr          # the old key is dead
    frank.innernet("install", "--name", lab.ifname("frank"), "--no-write-hosts", new)
    assert sqlite3.connect(world.db).execute(
        "SELECT is_redeemed FROM peers WHERE name = 'frank'").fetchall() == [(1,)]
    # a redeemed peer is not re-invited
    r = srv.server("reinvite", net, "--name", "frank", "--save-config", srv.path("f3.toml"),
                   "--yes", check=False)
    assert r.returncode == 1 and "already redeemed" in r.stderr


STREAM_SERVER = r"""
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7100)); s.listen(8)
print("listening", flush=True)
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

STREAM_CLIENT = r"""
import json, os, socket, sys, time
stop, wait, targets = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
until = time.monotonic() + wait


def connect(ip):
    # a tunnel still settling (a daemon just up, a slow host) refuses or
    # drops the first tries: tried again until ``wait`` has gone by
    while True:
        try:
            return socket.create_connection((ip, 7100), timeout=10)
        except OSError:
            if time.monotonic() > until:
                raise
            time.sleep(0.5)


conns = [connect(ip) for ip in targets]
print("connected", flush=True)
sent, got, gap, last = [0] * len(conns), [0] * len(conns), 0.0, time.monotonic()
while not os.path.exists(stop):
    for i, c in enumerate(conns):
        c.sendall(b"x" * 100); sent[i] += 100
        need = 100
        while need:
            d = c.recv(need)
            if not d:
                sys.exit(f"connection {i} closed")
            need -= len(d); got[i] += len(d)
    now = time.monotonic(); gap = max(gap, now - last); last = now
    time.sleep(0.02)
print(json.dumps({"sent": sent, "got": got, "max_gap": gap}), flush=True)
"""


def device_keys(host, ifname):
    from lab import device
    return {p["public_key"] for p in device(host, ifname)["peers"]}


def own_key(host, ifname):
    import sys
    from lab import ROOT
    sys.path.insert(0, ROOT)
    import innernet
    conf = host.path("client", "etc", f"{ifname}.conf")
    return innernet.public_key(innernet.InterfaceConfig.from_toml(open(conf).read(), conf)
                               .private_key)


def test_rotate_key_under_live_traffic_to_two_peers(world):
    import sys
    lab, srv = world.lab, world.srv
    alice, bob = world.hosts["alice"], world.hosts["bob"]
    rot = lab.add_host("rot")
    rot.innernet("install", "--name", lab.ifname("rot"), "--no-write-hosts",
                 invite(srv, world.net, "rot", "humans"))
    rot.spawn_innernet("up.log", "up", lab.ifname("rot"), "--daemon", "--no-write-hosts")
    old = own_key(rot, lab.ifname("rot"))
    for host in (alice, bob):
        ip = ip_of(world, host.name)
        host.spawn([sys.executable, "-c", STREAM_SERVER, ip], "stream.log")
        wait_for(lambda: "listening" in host.log("stream.log"), 10, "the stream server")
        wait_for(lambda: old in device_keys(host, lab.ifname(host.name)), 20,
                 f"{host.name} to have rot")
    stop = rot.path("stop")
    client = rot.spawn([sys.executable, "-c", STREAM_CLIENT, stop, str(25 * TIMEOUT_SCALE),
                        ip_of(world, "alice"), ip_of(world, "bob")], "client.log")
    try:
        wait_for(lambda: "connected" in rot.log("client.log"), 30, "rot's two connections")
    except AssertionError as e:          # seen once in the VM lane, loaded: say why
        raise AssertionError(f"{e}\n--- client.log ---\n{rot.log('client.log')[-1500:]}\n"
                             f"--- up.log ---\n{rot.log('up.log')[-1500:]}") from None
    start = time.monotonic()
    rot.innernet("rotate-key", lab.ifname("rot"), "--yes")
    new = own_key(rot, lab.ifname("rot"))
    assert new != old
    for host in (alice, bob):
        wait_for(lambda: new in device_keys(host, lab.ifname(host.name)), 10,
                 f"{host.name} to take rot's new key")
    took = time.monotonic() - start
    for host, ifname in ((alice, lab.ifname("alice")), (bob, lab.ifname("bob")),
                         (srv, world.net)):
        assert old not in device_keys(host, ifname), host.name
    # traffic went on: a few more round trips on both connections, then stop
    marks = rot.path("client.log")
    open(stop, "w").close()
    client.wait(timeout=60)
    out = open(marks).read()
    assert client.returncode == 0, out
    stats = json.loads(out.splitlines()[-1])
    assert stats["sent"] == stats["got"] and min(stats["got"]) > 0
    print(f"both peers held rot's new key {took:.2f} s after rotate-key began; "
          f"longest pause of the live connections: {stats['max_gap']:.2f} s")
    for host in (alice, bob):
        assert "rotated its key; the proof of its old key checks out" in host.log("up.log")


def test_a_new_key_without_a_valid_proof_is_refused_by_every_client(world):
    import sys
    from lab import ROOT
    sys.path.insert(0, ROOT)
    import innernet
    lab = world.lab
    bob_ip = ip_of(world, "bob")
    (bob_key,), = sqlite3.connect(world.db).execute(
        "SELECT public_key FROM peers WHERE name = 'bob'").fetchall()
    evil = innernet.public_key(innernet.generate_private_key())
    alice_key = own_key(world.hosts["alice"], lab.ifname("alice"))
    admin_key = own_key(world.hosts["admin"], lab.ifname("admin"))
    for name in ("alice", "admin"):           # both have pinned bob
        world.hosts[name].innernet("fetch", lab.ifname(name), "--no-write-hosts")
        assert bob_key in device_keys(world.hosts[name], lab.ifname(name))
    seen = device_keys(world.hosts["alice"], lab.ifname("alice"))
    other, other_key = next((n, k) for n, k in sqlite3.connect(world.db).execute(
        "SELECT name, public_key FROM peers WHERE is_disabled = 0 AND name NOT IN "
        "('alice', 'bob', 'admin', 'innernet-server') ORDER BY id") if k in seen)
    conn = sqlite3.connect(world.db)
    with conn:      # a compromised server, or bob itself (a peer's proofs for the others
        # are beyond the server's checking): a forged proof for alice; and another disabled
        conn.execute("UPDATE peers SET public_key = ? WHERE name = 'bob'", (evil,))
        conn.execute("INSERT INTO key_rotations (peer_id, ip, old_key, new_key, proofs, "
                     "rotated_at) VALUES ((SELECT id FROM peers WHERE name = 'bob'), ?, ?, ?, ?, 0)",
                     (bob_ip, bob_key, evil, json.dumps({alice_key: "F" * 43 + "="})))
        conn.execute("UPDATE peers SET is_disabled = 1 WHERE name = ?", (other,))
    conn.close()
    try:
        for name in ("alice", "admin"):
            host = world.hosts[name]

            seen = []

            def refused():
                r = host.innernet("fetch", lab.ifname(name), "--no-write-hosts", check=False)
                seen.append(f"exit {r.returncode}: {r.stderr}")
                if name == "alice":   # a wrong proof: that change refused, the rest taken
                    return r if r.returncode == 0 and "PINNING ERROR: peer 'bob'" in r.stderr \
                        and "does not check out" in r.stderr else None
                # no proof for admin at all: the change waits for one (issue 29), which
                # only bob's old key can make; the old key stays either way
                return r if r.returncode == 0 and "no proof for us yet" in r.stderr else None
            try:
                r = wait_for(refused, 20, f"{name} to refuse the unproved key")
            except AssertionError as e:     # what the fetches said (ci54; the VM lane, 2026-12-08)
                raise AssertionError(f"{e}; the first fetch: {seen[:1]}, the last: "
                                     f"{seen[-1:]}") from None
            assert "Traceback" not in r.stderr
            keys = device_keys(host, lab.ifname(name))
            assert evil not in keys and bob_key in keys          # the old key stays pinned
        # One peer's forged proofs stop no one's sync (an outside review's F1):
        # the other's disabling reached alice beside the refused key.
        assert other_key not in device_keys(world.hosts["alice"], lab.ifname("alice"))
        assert admin_key
    finally:
        conn = sqlite3.connect(world.db)
        with conn:
            conn.execute("UPDATE peers SET public_key = ? WHERE name = 'bob'", (bob_key,))
            conn.execute("DELETE FROM key_rotations WHERE new_key = ?", (evil,))
            conn.execute("UPDATE peers SET is_disabled = 0 WHERE name = ?", (other,))
        conn.close()
    world.hosts["alice"].innernet("fetch", lab.ifname("alice"), "--no-write-hosts")


def test_a_peer_away_across_a_rotation_and_a_deletion_takes_the_next_peer_there(world):
    """kim, disabled, missed jan's rotation and then jan's deletion. The
    deletion was announced with jan's last key only while kim pins the one
    before, so the next peer at jan's address met kim's pin for good (a
    `PINNING ERROR` at every fetch; J2 of the network-lock review). A
    deletion is now announced for every key its peer rotated away from."""
    lab, srv, net = world.lab, world.srv, world.net
    jan, kim = lab.add_host("jan"), lab.add_host("kim")
    jif, kif = lab.ifname("jan"), lab.ifname("kim")
    for host, name in ((jan, "jan"), (kim, "kim")):
        host.innernet("install", "--name", lab.ifname(name), "--no-write-hosts",
                      invite(srv, net, name, "humans"))
    jan_ip = ip_of(world, "jan")
    kim.innernet("fetch", kif, "--no-write-hosts")             # kim pins jan's first key
    assert jan_ip in device_peer_ips(kim, kif)
    srv.server("disable-peer", net, "--name", "kim", "--yes")
    jan.innernet("rotate-key", jif, "--yes")
    srv.server("delete-peer", net, "--name", "jan", "--reuse-after", "0s", "--yes")
    jan.innernet("down", jif)
    path = srv.path("lea.toml")
    srv.server("add-peer", net, "--name", "lea", "--cidr", "humans", "--admin", "false",
               "--ip", jan_ip, "--save-config", path, "--invite-expires", "1h", "--yes")
    lea = lab.add_host("lea")
    lea.innernet("install", "--name", lab.ifname("lea"), "--no-write-hosts", path)
    srv.server("enable-peer", net, "--name", "kim", "--yes")
    said = []

    def fetched():       # the first may time out on the session the server dropped
        r = kim.innernet("fetch", kif, "--no-write-hosts", check=False, timeout=90)
        said.append(r.stderr)
        return r.returncode == 0 or "PINNING" in r.stderr
    wait_for(fetched, 90, "kim's fetch to go through", interval=1)
    assert "PINNING" not in said[-1], said[-1]
    lea_key = sqlite3.connect(world.db).execute(
        "SELECT public_key FROM peers WHERE name = 'lea'").fetchone()[0]
    assert device_peer_ips(kim, kif)[jan_ip]["public_key"] == lea_key
