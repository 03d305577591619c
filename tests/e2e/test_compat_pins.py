"""The real innernet 1.5.5 client on our server is never left in a permanent
error (issue 27, part B: items 2, 3 and 4).

innernet's client pins every (address, key) it was told, for good: a known
address with another key fails every later fetch ("PINNING ERROR"). So after
one of our peers rotates its key, or after a deleted peer's address is
reused, our server leaves that peer out of the state of the innernet clients
that knew the old key; they keep syncing. innernet admins see quarantined
addresses as taken, so their `add-peer --auto-ip` skips them.

The binaries are found in $INNERNET_REFERENCE_DIR, else in
``../shared/reference/innernet-1.5.5`` beside the repository; without them
these tests skip (fail where INNERNET_COMPAT_REQUIRED is set). On
wireguard-go, innernet 1.5.5 needs ``--backend userspace`` and, for `fetch`
and `show`, a ``/var/run/wireguard/<iface>.name`` file, which the fixture
writes and removes.
"""
import json
import os
import sqlite3

import pytest

from lab import ROOT, device_peer_ips, invite, peer_ip, wait_for

from .conftest import network_world

pytestmark = pytest.mark.netns

WG_RUN = "/var/run/wireguard"
# innernet's global options on wireguard-go, and its sync options here
# (no hosts file; NAT traversal waits 5 s per step and the lab needs none).
GLOBALS = ["--backend", "userspace"]
SYNC = ["--no-write-hosts", "--no-nat-traversal"]


def reference_client():
    """innernet 1.5.5's client binary, or a skip (a failure where required)."""
    d = os.environ.get("INNERNET_REFERENCE_DIR") or \
        os.path.join(os.path.dirname(ROOT), "shared", "reference", "innernet-1.5.5")
    path = os.path.join(d, "innernet")
    if os.access(path, os.X_OK):
        return path
    why = f"innernet 1.5.5 not found: no executable {path} (set INNERNET_REFERENCE_DIR)"
    if os.environ.get("INNERNET_COMPAT_REQUIRED"):
        pytest.fail(f"the compatibility tests are required but cannot run: {why}",
                    pytrace=False)
    pytest.skip(why)


def ref(host, *args, check=True, timeout=90):
    """An innernet 1.5.5 verb on ``host``."""
    return host.exec(host.innernet_argv(*args, globals=GLOBALS), check=check, timeout=timeout)


def ref_install(host, invitation):
    """innernet's install, tried again while its redeem times out: on this
    loaded lab its first request sometimes gets no answer within ureq's 5 s
    (the invitation stays valid until redeemed)."""
    def gone():
        return not os.path.exists(os.path.join(WG_RUN, f"{host.iface}.sock")) and \
            host.exec(["ip", "link", "show", host.iface], check=False).returncode != 0
    for _ in range(6):
        r = ref(host, "install", "--name", host.iface, "--delete-invite", *SYNC, invitation,
                check=False)
        if r.returncode == 0:
            return r
        wait_for(gone, 15, "innernet's failed interface to go")
    raise AssertionError(f"innernet install failed 6 times: {r.stdout}{r.stderr}")


def ip_of(w, name):
    return peer_ip(w.db, name)


def key_of(w, name):
    conn = sqlite3.connect(w.db)
    try:
        return conn.execute("SELECT public_key FROM peers WHERE name = ?", (name,)).fetchone()[0]
    finally:
        conn.close()


def pinned(host):
    """{ip: (public key, disabled)} of innernet's data store on ``host``."""
    with open(host.path("client", "lib", f"{host.iface}.json")) as f:
        return {p["ip"]: (p["public_key"], p["is_disabled"]) for p in json.load(f)["peers"]}


def fetches(host):
    return host.log("daemon.log").count("fetching state")


@pytest.fixture(scope="module")
def world(request):
    client = reference_client()              # skips before building the .pyz
    pyz = request.getfixturevalue("pyz")
    name_files = []
    # A test network: our clients wait for the server's quarantine only, not
    # for their own floor (MIN_QUARANTINE), so an address is reused at once.
    with network_world(pyz, {"humans": "10.66.1.0/24"},
                       env={"INNERNET_MIN_QUARANTINE": "0"}) as w:
        lab = w.lab
        try:
            for name in ("rot", "alice", "carol", "frank"):           # ours; alice admin
                host = lab.add_host(name)
                host.iface = lab.ifname(name)
                host.innernet("install", "--name", host.iface, "--no-write-hosts",
                              invite(w.srv, w.net, name, "humans",
                                     admin="true" if name == "alice" else "false"))
                w.hosts[name] = host
            for name, admin in (("inn", "false"), ("inadm", "true")):   # innernet 1.5.5
                host = lab.add_host(name, innernet_cmd=[client])
                host.iface = lab.ifname(name)
                os.makedirs(host.path("client"), mode=0o700)   # innernet makes one level
                ref_install(host, invite(w.srv, w.net, name, "humans", admin=admin))
                path = os.path.join(WG_RUN, f"{host.iface}.name")
                with open(path, "w") as f:
                    f.write(host.iface + "\n")
                name_files.append(path)
                w.hosts[name] = host
            inn = w.hosts["inn"]
            w.daemon = inn.spawn(inn.innernet_argv("up", inn.iface, "--daemon", "--interval",
                                                   "1", *SYNC, globals=GLOBALS), "daemon.log")
            wait_for(lambda: fetches(inn) >= 2, 30, "innernet's daemon to sync")
            yield w
        finally:
            for path in name_files:
                if os.path.exists(path):
                    os.unlink(path)


def keeps_syncing(w, since):
    """innernet's fetch, up and show work, and its daemon synced twice more, alive."""
    inn = w.hosts["inn"]
    for verb in ("fetch", "up"):
        r = ref(inn, verb, inn.iface, *SYNC, check=False)
        assert r.returncode == 0 and "PINNING" not in r.stderr, r.stderr
    show = ref(inn, "show", inn.iface, check=False)
    assert show.returncode == 0, show.stderr
    wait_for(lambda: fetches(inn) >= since + 2 or w.daemon.poll() is not None, 30,
             "innernet's daemon to sync twice more")
    assert w.daemon.poll() is None, inn.log("daemon.log")[-2000:]
    assert "PINNING" not in inn.log("daemon.log")
    return show.stdout


def test_innernet_clients_keep_syncing_after_one_of_our_peers_rotates(world):
    """Item 2: the rotated peer is left out of their state; nothing else changes."""
    inn, rot, alice = world.hosts["inn"], world.hosts["rot"], world.hosts["alice"]
    rot_ip, old = ip_of(world, "rot"), key_of(world, "rot")
    assert pinned(inn)[rot_ip] == (old, False)
    for host in (rot, alice):           # ours know everyone, with rot's old key
        host.innernet("fetch", host.iface, "--no-write-hosts")
    before = set(device_peer_ips(inn, inn.iface))
    since = fetches(inn)
    r = rot.innernet("rotate-key", rot.iface, "--yes")
    new = key_of(world, "rot")
    assert new != old
    keeps_syncing(world, since)
    # it names the innernet clients, and does not count them among the checkers
    assert "'inn'" in r.stderr and "'inadm'" in r.stderr and "no longer see" in r.stderr
    assert "forget-pins" in r.stderr
    assert "3 peers will check its proof" in r.stderr     # alice, carol, frank
    assert set(device_peer_ips(inn, inn.iface)) == before - {rot_ip}
    assert f"innernet client 'inn' ({ip_of(world, 'inn')}) pinned another key at {rot_ip}" \
        in world.srv.log("serve-0.log")
    assert pinned(inn)[rot_ip] == (old, True)      # kept, disabled: innernet's own way
    alice.innernet("fetch", alice.iface, "--no-write-hosts")
    assert device_peer_ips(alice, alice.iface)[rot_ip]["public_key"] == new


def test_innernet_clients_keep_syncing_after_an_address_is_reused(world):
    """Item 3: a new peer at a deleted peer's address is left out for them."""
    lab, srv, net, inn = world.lab, world.srv, world.net, world.hosts["inn"]
    carol_ip, carol_key = ip_of(world, "carol"), key_of(world, "carol")
    assert pinned(inn)[carol_ip] == (carol_key, False)
    since = fetches(inn)
    deleted = srv.server("delete-peer", net, "--name", "carol", "--reuse-after", "0s", "--yes")
    wait_for(lambda: carol_ip not in device_peer_ips(inn, inn.iface), 20,
             "carol to leave innernet's device")
    alice = world.hosts["alice"]          # ours learn of a deletion, then let the pin go
    alice.innernet("fetch", alice.iface, "--no-write-hosts")
    path = srv.path("dave.toml")
    added = srv.server("add-peer", net, "--name", "dave", "--cidr", "humans", "--admin",
                       "false", "--ip", carol_ip, "--save-config", path, "--invite-expires",
                       "1h", "--yes")
    dave = lab.add_host("dave")
    dave.iface = lab.ifname("dave")
    dave.innernet("install", "--name", dave.iface, "--no-write-hosts", path)
    keeps_syncing(world, since)
    # both verbs named the innernet clients and what they will see
    assert "'inn'" in deleted.stderr and "stays hidden from them" in deleted.stderr
    assert "'inn'" in added.stderr and "'dave' stays hidden from them" in added.stderr
    assert carol_ip not in device_peer_ips(inn, inn.iface)
    assert pinned(inn)[carol_ip] == (carol_key, True)
    alice.innernet("fetch", alice.iface, "--no-write-hosts")
    assert device_peer_ips(alice, alice.iface)[carol_ip]["public_key"] == key_of(world, "dave")


def test_an_innernet_admins_auto_ip_skips_a_quarantined_address(world):
    """Item 4: right after a delete-peer, --auto-ip takes a free address."""
    inadm, alice = world.hosts["inadm"], world.hosts["alice"]
    frank_ip = ip_of(world, "frank")
    # our admin peer deletes it over the API (30 days), told who pinned it
    deleted = alice.innernet("delete-peer", alice.iface, "--name", "frank", "--yes")
    path = inadm.path("gina.toml")
    r = ref(inadm, "add-peer", inadm.iface, "--name", "gina", "--cidr", "humans", "--auto-ip",
            "--admin", "false", "--save-config", path, "--invite-expires", "1h", "--yes",
            check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "'inn'" in deleted.stderr and "stays hidden from them" in deleted.stderr
    gina_ip = ip_of(world, "gina")
    assert gina_ip and gina_ip != frank_ip and os.path.exists(path)
    # the address itself stays refused, by innernet (taken) or by us (quarantined)
    r = ref(inadm, "add-peer", inadm.iface, "--name", "hal", "--cidr", "humans", "--ip",
            frank_ip, "--admin", "false", "--save-config", inadm.path("hal.toml"),
            "--invite-expires", "1h", "--yes", check=False)
    assert r.returncode != 0 and ip_of(world, "hal") is None
    # its other verbs still work with the placeholder listed
    ref(inadm, "rename-peer", inadm.iface, "--name", "gina", "--new-name", "gina2", "--yes")
    assert ip_of(world, "gina2") == gina_ip
    keeps_syncing(world, fetches(world.hosts["inn"]))


def test_the_documented_remedy_lets_an_innernet_client_pin_anew(world):
    """Stop it, delete its data store, forget-pins on the server, up: it sees all."""
    srv, net, inn = world.srv, world.net, world.hosts["inn"]
    world.daemon.terminate()
    world.daemon.wait(timeout=10)
    os.unlink(inn.path("client", "lib", f"{inn.iface}.json"))
    r = srv.server("forget-pins", net, "--name", "inn", "--yes")
    assert "forgot" in r.stderr
    ref(inn, "up", inn.iface, *SYNC)
    on_device = device_peer_ips(inn, inn.iface)
    for name in ("rot", "dave", "alice"):
        assert on_device[ip_of(world, name)]["public_key"] == key_of(world, name)
    ref(inn, "fetch", inn.iface, *SYNC)
    ref(inn, "show", inn.iface)
