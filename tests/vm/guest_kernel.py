"""Kernel WireGuard for real (issue 30), run inside the VM lane's guest.

Not collected on the host (the name is not test_*); tests/e2e/test_vm.py
runs it in the guest, whose kernel has the WireGuard module, beside a
selection of tests/e2e run there unchanged (`--backend auto` picks the kernel).

Hosts: a server; alice (admin) and bob in CIDR 'a', both on kernel devices
(alice runs the .pyz on a bare Python, bob innernet.py on Debian's Python
with its site packages; neither uses pyroute2: the kernel backend speaks
generic netlink itself); carol in CIDR 'b' on
wireguard-go (`--backend userspace`), not associated with 'a' until alice
adds the association over the API.
"""
import os
import subprocess

import pytest

from lab import ROOT, device, invite, start_echo, tcp_reach, wait_for

from e2e.conftest import network_world

pytestmark = pytest.mark.netns

# innernet.py on Debian's Python (with its site packages), imported as the .deb's
# launcher does, so its bytecode is compiled once rather than at every start.
DEBIAN_PYTHON = ["/usr/bin/python3", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                 "import innernet; sys.exit(innernet.main(sys.argv[2:]))", ROOT]


def wireguard_go_pids():
    out = subprocess.run(["ps", "-eo", "pid=,comm="], capture_output=True, text=True,
                         check=True).stdout
    return {int(p) for p, _, comm in (line.strip().partition(" ") for line in out.splitlines())
            if comm.strip() == "wireguard-go"}


def link_kind(host, ifname):
    """The kind `ip -d link` shows for a link: 'wireguard' for the kernel's,
    'tun' for wireguard-go's (the first word of the line after link/...)."""
    lines = host.exec(["ip", "-d", "link", "show", "dev", ifname]).stdout.splitlines()
    return lines[2].split()[0] if len(lines) > 2 and lines[2].split() else None


def ip_of(host, ifname):
    conf = open(host.path("client", "etc", f"{ifname}.conf")).read()
    return conf.split('address = "')[1].split("/")[0]


@pytest.fixture(scope="module")
def w(pyz):
    with network_world(pyz, {"a": "10.66.1.0/24", "b": "10.66.2.0/24"}) as w:
        lab = w.lab
        w.h = {"alice": lab.add_host("alice"),
               "bob": lab.add_host("bob", innernet_cmd=DEBIAN_PYTHON),
               "carol": lab.add_host("carol")}
        for name, cidr, admin in (("alice", "a", "true"), ("bob", "a", "false")):
            w.h[name].innernet("install", "--name", lab.ifname(name), "--no-write-hosts",
                               invite(w.srv, w.net, name, cidr, admin=admin))
        for name in ("alice", "bob"):
            w.ips[name] = ip_of(w.h[name], lab.ifname(name))
            start_echo(w.h[name], w.ips[name])
        w.h["alice"].innernet("fetch", lab.ifname("alice"), "--no-write-hosts")   # bob came later
        yield w


def wg_state(w):
    """`wg show` of every host, for failure messages."""
    hosts = [w.srv] + list(w.h.values())
    return "\n".join(h.exec(["wg", "show", "all"], check=False).stdout for h in hosts)


def test_kernel_peers_talk_with_no_wireguard_go_anywhere(w):
    alice, bob = w.h["alice"], w.h["bob"]
    try:
        wait_for(lambda: tcp_reach(alice, w.ips["bob"]), 30, "alice -> bob")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{wg_state(w)}") from None
    assert tcp_reach(bob, w.ips["alice"])
    assert wireguard_go_pids() == set()
    for host, ifname in ((w.srv, w.net), (alice, w.lab.ifname("alice")),
                         (bob, w.lab.ifname("bob"))):
        assert link_kind(host, ifname) == "wireguard"
        assert host.exec(["cat", f"/sys/class/net/{ifname}/uevent"]).stdout \
            .count("DEVTYPE=wireguard") == 1


def test_a_userspace_peer_joins_the_kernel_peers_after_an_association_over_the_api(w):
    alice, bob, carol = w.h["alice"], w.h["bob"], w.h["carol"]
    lab = w.lab
    c_if = lab.ifname("carol")
    carol.exec(carol.innernet_argv("install", "--name", c_if, "--no-write-hosts",
                                   invite(w.srv, w.net, "carol", "b"),
                                   globals=["--backend", "userspace"]))
    w.ips["carol"] = ip_of(carol, c_if)
    start_echo(carol, w.ips["carol"])
    # wireguard-go runs for carol's device, and only in carol's namespace
    pids = wireguard_go_pids()
    assert pids
    mine = set(map(int, subprocess.run(["ip", "netns", "pids", carol.ns], capture_output=True,
                                       text=True).stdout.split()))
    assert pids <= mine
    assert link_kind(carol, c_if) == "tun"
    assert not tcp_reach(alice, w.ips["carol"], timeout=1.0)
    alice.innernet("add-association", lab.ifname("alice"), "a", "b")
    for name in ("alice", "carol"):
        w.h[name].innernet("fetch", lab.ifname(name), "--no-write-hosts")
    wait_for(lambda: tcp_reach(alice, w.ips["carol"]), 30, "alice (kernel) -> carol (userspace)")
    assert tcp_reach(carol, w.ips["alice"])
    assert not tcp_reach(carol, w.ips["bob"], timeout=1.0)    # bob has not fetched yet
    bob.innernet("fetch", lab.ifname("bob"), "--no-write-hosts")
    wait_for(lambda: tcp_reach(bob, w.ips["carol"]), 30, "bob (Debian's Python) -> carol")


def test_down_and_up_of_a_kernel_peer(w):
    alice, bob = w.h["alice"], w.h["bob"]
    b_if = w.lab.ifname("bob")
    bob.innernet("down", b_if)
    r = bob.exec(["ip", "link", "show", "dev", b_if], check=False)
    assert r.returncode != 0
    assert not tcp_reach(alice, w.ips["bob"], timeout=1.0)
    bob.innernet("up", b_if, "--no-write-hosts")
    assert link_kind(bob, b_if) == "wireguard"
    wait_for(lambda: tcp_reach(alice, w.ips["bob"]), 30, "alice -> bob after down/up")


def test_rotate_key_of_a_kernel_peer_reaches_the_others(w):
    alice, bob = w.h["alice"], w.h["bob"]
    b_if, a_if = w.lab.ifname("bob"), w.lab.ifname("alice")
    old = device(bob, b_if)["public_key"]
    bob.innernet("rotate-key", b_if, "--yes")
    new = device(bob, b_if)["public_key"]
    assert new != old
    alice.innernet("fetch", a_if, "--no-write-hosts")
    keys = {p["public_key"] for p in device(alice, a_if)["peers"]}
    assert new in keys and old not in keys
    wait_for(lambda: tcp_reach(alice, w.ips["bob"]), 30, "alice -> bob after bob's new key")
    assert tcp_reach(bob, w.ips["alice"])
