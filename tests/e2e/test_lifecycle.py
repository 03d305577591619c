"""Delete and re-invite over real tunnels (issue 12, acceptance 1 and 2)."""
import json
import sqlite3
import time

import pytest

from lab import Lab, device_peer_ips, invite, start_network, wait_for

from .conftest import BARE

pytestmark = pytest.mark.netns


class World:
    pass


@pytest.fixture(scope="module")
def world(pyz):
    lab = Lab(innernet_cmd=BARE + [pyz])
    w = World()
    w.lab = lab
    try:
        w.srv, w.net, _ = start_network(lab, {"humans": "10.66.1.0/24"})
        w.db = w.srv.path("server", "lib", f"{w.net}.db")
        w.hosts = {}
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
    finally:
        lab.close()


def ip_of(w, name):
    conn = sqlite3.connect(w.db)
    try:
        row = conn.execute("SELECT ip FROM peers WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None
    finally:
        conn.close()


def listed(host, ifname):
    show = json.loads(host.innernet("show", ifname, "--json").stdout)
    return {p["name"] for p in show[0]["peers"]}


def test_delete_reaches_daemon_peers_and_quarantines_the_address(world):
    lab, srv, net = world.lab, world.srv, world.net
    alice, bob = world.hosts["alice"], world.hosts["bob"]
    carol_ip = ip_of(world, "carol")
    for host in (alice, bob):
        wait_for(lambda: carol_ip in device_peer_ips(host, lab.ifname(host.name)), 20,
                 f"{host.name} to have carol")
    admin = world.hosts["admin"]
    start = time.monotonic()
    admin.innernet("delete-peer", lab.ifname("admin"), "--name", "carol", "--reuse-after", "6s",
                   "--yes")
    for host in (alice, bob):
        wait_for(lambda: carol_ip not in device_peer_ips(host, lab.ifname(host.name)), 10,
                 f"carol to leave {host.name}'s device")
    print(f"carol left both daemon peers' devices {time.monotonic() - start:.2f} s after "
          "delete-peer")
    assert "carol" not in listed(alice, lab.ifname("alice"))
    # during the quarantine: --ip refused, --auto-ip skips it
    refused = srv.server("add-peer", net, "--name", "carol2", "--cidr", "humans", "--admin",
                         "false", "--ip", carol_ip, "--save-config", srv.path("c2.toml"),
                         "--invite-expires", "1h", "--yes", check=False)
    assert refused.returncode == 1 and "quarantined until" in refused.stderr
    assert "Traceback" not in refused.stderr
    path = invite(srv, net, "dan", "humans")
    assert ip_of(world, "dan") != carol_ip and path
    # after it: the address is reused, and the clients that were told accept the new key
    (until,), = sqlite3.connect(world.db).execute(
        "SELECT reuse_after FROM deleted_peers WHERE name = 'carol'").fetchall()
    wait_for(lambda: time.time() > until + 0.5, 15, "the quarantine to end")
    path = invite(srv, net, "erin", "humans", ip=carol_ip)
    erin = lab.add_host("erin")
    erin.innernet("install", "--name", lab.ifname("erin"), "--no-write-hosts", path)
    for host in (alice, bob):
        wait_for(lambda: carol_ip in device_peer_ips(host, lab.ifname(host.name)), 20,
                 f"{host.name} to take erin at carol's old address")
    assert "PINNING" not in alice.log("up.log")


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
