"""The fast path of an unchanged `fetch` (issue 13), with the built innernet.pyz.

It answers only when the server says 304 and nothing it checks changed; each
of those changes sends the next fetch down the full sync, which repairs what it
finds. Which path ran is seen in the record the full sync rewrites
(`<iface>.fetch`): the fast path leaves it as it is.
"""
import os
import shlex

import pytest

from lab import (clear_of_path_work, debian_launcher, device, device_peer_ips, invite,
                 record, settled, unit_command)

from .conftest import network_world

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def world(pyz):
    with network_world(pyz, {"humans": "10.66.1.0/24"}) as w:
        for name, admin in (("admin", "true"), ("alice", "false"), ("bob", "false")):
            host = w.lab.add_host(name)
            host.innernet("install", "--name", w.lab.ifname(name), "--no-write-hosts",
                          invite(w.srv, w.net, name, "humans", admin=admin))
            w.hosts[name] = host
        for name, host in w.hosts.items():      # everyone knows everyone
            host.innernet("fetch", w.lab.ifname(name), "--no-write-hosts")
        yield w


def test_unchanged_fetches_take_the_fast_path_and_every_change_the_full_sync(world):
    alice, ifname = world.hosts["alice"], world.lab.ifname("alice")
    hosts = alice.path("hosts")
    with open(hosts, "w") as f:
        f.write("127.0.0.1 localhost\n")
    opts = ["--hosts-path", hosts]

    def fetch(*extra):
        r = alice.innernet("fetch", ifname, *opts, *extra)
        assert r.returncode == 0 and r.stdout == "", r
        return r

    fetch()
    settled(alice, ifname)
    fetch()                                         # the full sync leaves its record
    before = clear_of_path_work(alice, ifname, fetch)
    text = open(alice.path("client", "lib", f"{ifname}.fetch")).read()
    assert f"bob.{ifname}.wg" in open(hosts).read()
    assert fetch().stderr == ""
    after = open(alice.path("client", "lib", f"{ifname}.fetch")).read()
    assert record(alice, ifname) == before, (      # answered by the fast path
        sorted(set(text.splitlines()) ^ set(after.splitlines())))

    # a peer removed from the device by hand is back after the next fetch
    bob_key = device(world.hosts["bob"], world.lab.ifname("bob"))["public_key"]
    bob_ip = next(ip for ip, p in device_peer_ips(alice, ifname).items()
                  if p["public_key"] == bob_key)
    alice.exec(["wg", "set", ifname, "peer", bob_key, "remove"])
    assert bob_ip not in device_peer_ips(alice, ifname)
    fetch()
    assert bob_ip in device_peer_ips(alice, ifname)
    assert record(alice, ifname) != before
    settled(alice, ifname)     # bob's new first handshake is a change the full sync takes
    fetch()
    before = clear_of_path_work(alice, ifname, fetch)
    fetch()
    assert record(alice, ifname) == before

    # ... and so is the hosts section removed by hand
    with open(hosts, "w") as f:
        f.write("127.0.0.1 localhost\n")
    fetch()
    assert f"bob.{ifname}.wg" in open(hosts).read()
    assert record(alice, ifname) != before

    # a change on the server: the 304 is a 200, the full sync takes it
    admin = world.hosts["admin"]
    carol_invite = invite(world.srv, world.net, "carol", "humans")
    carol = world.lab.add_host("carol")
    carol.innernet("install", "--name", world.lab.ifname("carol"), "--no-write-hosts",
                   carol_invite)
    fetch()
    assert f"carol.{ifname}.wg" in open(hosts).read()
    assert admin is not None

    # other options than the record was made with: the full sync, once
    before = record(alice, ifname)
    fetch("--no-nat-candidates")
    assert record(alice, ifname) != before
    settled(alice, ifname)                  # carol's first handshake, likewise
    fetch("--no-nat-candidates")
    before = clear_of_path_work(alice, ifname, lambda: fetch("--no-nat-candidates"))
    fetch("--no-nat-candidates")
    assert record(alice, ifname) == before
    # -v is always the full sync, and says so; it leaves no record to answer from
    r = alice.innernet("-v", "fetch", ifname, *opts, "--no-nat-candidates")
    assert "up to date" in r.stderr
    assert not os.path.exists(alice.path("client", "lib", f"{ifname}.fetch"))


def test_a_fetch_of_every_network_and_a_server_outage(world):
    bob, ifname = world.hosts["bob"], world.lab.ifname("bob")
    bob.innernet("fetch", "--no-write-hosts")
    settled(bob, ifname)
    bob.innernet("fetch", "--no-write-hosts")
    before = clear_of_path_work(bob, ifname, lambda: bob.innernet("fetch", "--no-write-hosts"))
    bob.innernet("fetch", "--no-write-hosts")
    assert record(bob, ifname) == before
    # the server does not answer: the fast path steps aside and the full sync says why
    world.srv.exec(["nft", "-f", "-"], input="table inet outage {\n chain i {\n"
                   "  type filter hook input priority -5; tcp dport 51820 drop;\n }\n}\n")
    try:
        r = bob.innernet("fetch", ifname, "--no-write-hosts", check=False, timeout=90)
    finally:
        world.srv.exec(["nft", "delete", "table", "inet", "outage"])
    assert r.returncode == 1 and "cached peers" in r.stderr, r
    assert not os.path.exists(bob.path("client", "lib", f"{ifname}.fetch"))


# Every option a sync takes, before the verb (global) or after it; each run
# also names a hosts file or --no-write-hosts, so no test writes /etc/hosts.
OPTIONS = [(), (("--backend", "userspace"), ()), (("--mtu", "1280"), ()), (("--no-routing",), ()),
           ("--no-write-hosts",), ("--host-suffix", "lan"), ("--no-nat-traversal",),
           ("--exclude-nat-candidates", "10.0.0.0/8"), ("--no-nat-candidates",),
           ("--no-accept-routes",), ("--accept-public-routes",), ("--no-dns",),
           ((), ("--backend", "userspace", "--mtu", "1280"))]       # globals after the verb
# ... and those only `up` takes (--daemon never ends, so it has no fast path;
# --exit-node needs an approved exit node, and is left to test_routes' lanes)
UP_OPTIONS = [("--no-long-poll",), ("--interval", "30")]


def command(host, verb, ifname, option, hosts):
    """argv of `[globals] VERB IFACE [options]` for one entry of OPTIONS."""
    front, back = option if option and isinstance(option[0], tuple) else ((), option)
    if "--no-write-hosts" not in back:
        back = tuple(back) + ("--hosts-path", hosts)
    base, _ = host.lab.innernet_cmd(False)
    return base + ["-c", host.path("client", "etc"), "-d", host.path("client", "lib"),
                   *front, verb, ifname, *back]


def test_every_door_is_fast_when_nothing_changed_and_full_when_anything_did(world):
    """For `fetch` and `up`, with each option: the second run of the same
    command line is answered by the fast path (its record is left as it is);
    then a change to one input -- a file the sync reads, the device, a route
    or an address on the interface, an address of the host (its NAT
    candidates are read from them), the server's state -- sends the next run
    down the full sync (which rewrites the record). The inputs take turns,
    so each is changed under several options and both verbs."""
    alice, ifname = world.hosts["alice"], world.lab.ifname("alice")
    hosts = alice.path("hosts-doors")
    bob_key = device(world.hosts["bob"], world.lab.ifname("bob"))["public_key"]
    store = alice.path("client", "lib", f"{ifname}.json")
    names = iter(f"bob{i}" for i in range(100))
    current = ["bob"]

    def rename_bob():
        new = next(names)
        world.srv.server("rename-peer", world.net, "--name", current[0], "--new-name", new,
                         "--yes")
        current[0] = new

    changes = [
        ("a file the sync reads", lambda: os.utime(store)),
        ("a peer removed from the device", lambda: alice.exec(
            ["wg", "set", ifname, "peer", bob_key, "remove"])),
        ("a route through the interface", lambda: alice.exec(
            ["ip", "route", "add", f"10.250.{len(checked) + 1}.0/24", "dev", ifname])),
        ("an address on the interface", lambda: alice.exec(
            ["ip", "addr", "add", f"10.251.0.{len(checked) + 1}/32", "dev", ifname])),
        # a unique local IPv6 address is no NAT candidate: nothing is sent to it
        ("an address of the host", lambda: alice.exec(
            ["ip", "addr", "add", f"fd00:33::{len(checked) + 1}/128", "dev", "eth0",
             "nodad"])),
        ("the server's state", rename_bob),
    ]
    settled(alice, ifname)
    checked = []
    for verb, options in (("fetch", OPTIONS), ("up", OPTIONS + UP_OPTIONS)):
        for option in options:
            argv = command(alice, verb, ifname, option, hosts)

            def run():
                r = alice.exec(argv)
                assert r.stdout == "" or verb == "up", r
                return r
            run()
            before = clear_of_path_work(alice, ifname, run)
            run()
            assert record(alice, ifname) == before, ("unchanged, yet the full sync ran",
                                                     argv)
            what, change = changes[len(checked) % len(changes)]
            change()
            run()
            assert record(alice, ifname) != before, (f"{what} changed, yet the fast path "
                                                     "answered", argv)
            checked.append((verb, option, what))
    assert {w for _, _, w in checked} == {w for w, _ in changes}
    assert bob_key in {p["public_key"] for p in device(alice, ifname)["peers"]}


def test_the_timer_units_command_line_takes_the_fast_path(world, tmp_path):
    """innernet-fetch@.service's ExecStart, word for word (the launcher from
    its temporary place), expanded from an /etc/default/innernet that also
    holds innernet@.service's options (UP_ARGS: only `up` takes them), with
    /etc/innernet, /var/lib/innernet and /etc/hosts bound to alice's own in a
    mount namespace of its own: it runs, and an unchanged run leaves the
    record as it is."""
    alice, ifname = world.hosts["alice"], world.lab.ifname("alice")
    defaults = {"ARGS": "--backend userspace", "FETCH_ARGS": "",
                "UP_ARGS": "--interval 5 --exit-node gw --no-long-poll"}
    argv = unit_command("innernet.innernet-fetch@.service", ifname, defaults)
    assert argv[:3] == ["/usr/bin/innernet", "fetch", ifname] and "--interval" not in argv
    argv[0] = debian_launcher(str(tmp_path))
    hosts = alice.path("hosts-unit")
    with open(hosts, "w") as f:
        f.write("127.0.0.1 localhost\n")
    made = [d for d in ("/etc/innernet", "/var/lib/innernet") if not os.path.isdir(d)]
    for d in made:
        os.makedirs(d)
    binds = (f"mount --bind {shlex.quote(alice.path('client', 'etc'))} /etc/innernet && "
             f"mount --bind {shlex.quote(alice.path('client', 'lib'))} /var/lib/innernet && "
             f"mount --bind {shlex.quote(hosts)} /etc/hosts && exec {shlex.join(argv)}")
    run = ["unshare", "--mount", "--propagation", "private", "sh", "-c", binds]
    try:
        alice.exec(run)
        before = clear_of_path_work(alice, ifname, lambda: alice.exec(run))
        alice.exec(run)
        assert record(alice, ifname) == before, "the timer's unchanged run took the full sync"
        os.utime(alice.path("client", "lib", f"{ifname}.json"))
        alice.exec(run)
        assert record(alice, ifname) != before
        assert f"innernet-server.{ifname}.wg" in open(hosts).read()     # the bound /etc/hosts
    finally:
        for d in made:
            os.rmdir(d)


def test_an_up_after_an_interrupted_down_takes_its_marker_away(world):
    """Outside round 30, U30-3: a repeated `up NET` was answered by the fast
    path, and only the full program's `up` takes away the marker `down`
    leaves (one interrupted between its marker and the device: killed,
    Ctrl-C): `up` said nothing was wrong and the daemon (the unit) stayed
    idle, "taken down". The marker is among what the fast path looks at."""
    alice, ifname = world.hosts["alice"], world.lab.ifname("alice")
    argv = ("up", ifname, "--no-write-hosts", "--no-nat-traversal")    # no path work due
    alice.innernet(*argv)
    alice.innernet(*argv)
    before = record(alice, ifname)
    alice.innernet(*argv)
    assert record(alice, ifname) == before                  # `up` takes the fast path too
    marker = alice.path("client", "lib", f"{ifname}.down")
    with open(marker, "w"):
        pass
    os.chmod(marker, 0o600)
    alice.innernet(*argv)
    assert not os.path.exists(marker)
