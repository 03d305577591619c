"""Names and routes inside the access rules (issue 14), over real wireguard-go
tunnels in network namespaces, driven by the built innernet.pyz.

CIDRs: 'office' (gw, exitn) and 'home' (alice) are associated; 'other' (eve)
is not. gw has a LAN behind it (192.168.10.0/24, host 'lanhost'); exitn has
the "internet" behind it (198.19.77.0/24, host 'www').
"""
import json
import os
import shutil

import pytest

from lab import invite, start_echo, tcp_reach, wait_for

from .conftest import network_world

pytestmark = pytest.mark.netns

LAN_HOST = "192.168.10.2"
WWW = "198.19.77.2"
SERVER_IP = "10.66.0.1"
NO_RESOLVED = "systemd-resolved not found (no resolvectl): split DNS"


@pytest.fixture(scope="module")
def w(pyz):
    cidrs = {"office": "10.66.1.0/24", "home": "10.66.2.0/24", "other": "10.66.3.0/24"}
    with network_world(pyz, cidrs) as w:
        srv, net, lab = w.srv, w.net, w.lab
        srv.server("add-association", net, "office", "home", "--yes")
        w.h = {}
        for name, cidr in (("gw", "office"), ("exitn", "office"), ("alice", "home"),
                           ("eve", "other")):
            host = w.h[name] = lab.add_host(name)
            path = invite(srv, net, name, cidr)
            host.joined = host.innernet("install", "--name", lab.ifname(name),
                                        "--no-write-hosts", path)
        # gw's LAN, with lanhost behind it (gw is its gateway); exitn's "internet",
        # www, which is also exitn's default route.
        w.lanhost = network_behind(lab, w.h["gw"], "192.168.10", "lanhost")
        w.www = network_behind(lab, w.h["exitn"], "198.19.77", "www")
        w.h["exitn"].exec(["ip", "route", "add", "default", "via", WWW])
        start_echo(w.lanhost, LAN_HOST)
        start_echo(w.www, WWW)
        w.server_ip = SERVER_IP
        w.netns_dirs = []
        yield w
        for d in w.netns_dirs:
            shutil.rmtree(d, ignore_errors=True)


def network_behind(lab, router, prefix, name):
    """A bridge 'lan' on ``router`` with PREFIX.1/24, and host ``name`` on it."""
    for args in (["link", "add", "lan", "type", "bridge"],
                 ["addr", "add", f"{prefix}.1/24", "dev", "lan"], ["link", "set", "lan", "up"]):
        router.exec(["ip"] + args)
    router.lan_prefix, router.lan_count = prefix, 1
    return lab.add_behind(router, name)


def fetch(w, name, *args):
    return w.h[name].innernet("fetch", w.lab.ifname(name), "--no-write-hosts", *args)


def routes_on(host, ifname):
    return host.exec(["ip", "route", "show", "dev", ifname]).stdout


def test_routes_reach_the_lan_once_approved_and_only_for_allowed_peers(w):
    gw, alice, eve = w.h["gw"], w.h["alice"], w.h["eve"]
    out = gw.innernet("advertise-routes", w.lab.ifname("gw"), "192.168.10.0/24", "--yes")
    assert "192.168.10.0/24 waiting for approval" in out.stderr + out.stdout
    fetch(w, "alice")
    assert "192.168.10.0/24" not in routes_on(alice, w.lab.ifname("alice"))
    assert not tcp_reach(alice, LAN_HOST, timeout=1.0)
    out = gw.innernet("advertise-routes", w.lab.ifname("gw"))       # no routes: its state
    assert "gw: 192.168.10.0/24 waiting for approval" in out.stderr

    w.srv.server("approve-routes", w.net, "--name", "gw", "--yes")
    # Overlap with an approved route is refused, naming both owners (a pending
    # one reserves nothing).
    bad = alice.innernet("advertise-routes", w.lab.ifname("alice"), "192.168.10.128/25",
                         "--yes", check=False)
    assert bad.returncode == 1
    assert "overlaps route 192.168.10.0/24 of peer 'gw'" in bad.stderr
    assert "'alice'" in bad.stderr
    fetch(w, "gw")                    # forwarding on for its WireGuard interface and LAN
    assert gw.exec(["cat", f"/proc/sys/net/ipv4/conf/{w.lab.ifname('gw')}/forwarding",
                    "/proc/sys/net/ipv4/conf/lan/forwarding",
                    "/proc/sys/net/ipv4/conf/eth0/forwarding"]).stdout.split() == ["1", "1", "0"]
    fetch(w, "alice")
    assert "192.168.10.0/24 proto 77" in routes_on(alice, w.lab.ifname("alice"))
    out = gw.innernet("advertise-routes", w.lab.ifname("gw"))
    assert "gw: 192.168.10.0/24 approved" in out.stderr
    wait_for(lambda: tcp_reach(alice, LAN_HOST), 20, "alice to reach the LAN through gw")

    # eve (unassociated) gets no route, and one added by hand leads nowhere:
    # gw is not a peer on eve's device, nor eve on gw's.
    fetch(w, "eve")
    assert "192.168.10.0/24" not in routes_on(eve, w.lab.ifname("eve"))
    eve.exec(["ip", "route", "add", "192.168.10.0/24", "dev", w.lab.ifname("eve")])
    assert not tcp_reach(eve, LAN_HOST, timeout=2.0)
    eve.exec(["ip", "route", "del", "192.168.10.0/24", "dev", w.lab.ifname("eve")])

    listed = w.srv.server("list-routes", w.net, "--json").stdout
    assert '"route": "192.168.10.0/24"' in listed and '"approved": true' in listed
    shown = alice.innernet("show", w.lab.ifname("alice")).stdout
    assert "routes: 192.168.10.0/24" in shown

    # Revoked: the route leaves alice's interface and the LAN is out of reach.
    w.srv.server("approve-routes", w.net, "--name", "gw", "--revoke", "--yes")
    fetch(w, "alice")
    assert "192.168.10.0/24" not in routes_on(alice, w.lab.ifname("alice"))
    assert not tcp_reach(alice, LAN_HOST, timeout=1.0)
    w.srv.server("approve-routes", w.net, "--name", "gw", "--yes")
    fetch(w, "alice", "--no-accept-routes")
    assert "192.168.10.0/24" not in routes_on(alice, w.lab.ifname("alice"))
    fetch(w, "alice")                 # the flag is remembered (issue 29) ...
    assert "192.168.10.0/24" not in routes_on(alice, w.lab.ifname("alice"))
    alice.innernet("up", w.lab.ifname("alice"), "--no-write-hosts")   # ... by `up` too
    assert "192.168.10.0/24" not in routes_on(alice, w.lab.ifname("alice"))
    alice.innernet("up", w.lab.ifname("alice"), "--no-write-hosts", "--reset-flags")  # forgotten
    assert "192.168.10.0/24 proto 77" in routes_on(alice, w.lab.ifname("alice"))


def dig(host, *args, server=SERVER_IP):
    out = host.exec(["dig", "+time=2", "+tries=2", f"@{server}", *args])
    return out.stdout


def test_dns_answers_each_peer_with_the_names_it_may_see(w):
    alice, eve = w.h["alice"], w.h["eve"]
    net = w.net
    ips = {n: peer_ip(w, n) for n in ("gw", "alice", "eve")}
    # The join said once that split DNS was skipped (no systemd-resolved here).
    joined = alice.joined.stdout + alice.joined.stderr
    assert joined.count(NO_RESOLVED) == 1, joined

    a = dig(alice, f"gw.{net}.wg", "A")
    assert "status: NOERROR" in a and ips["gw"] in a
    assert "status: NXDOMAIN" in dig(alice, f"eve.{net}.wg", "A")
    assert "status: NXDOMAIN" in dig(alice, f"nobody.{net}.wg", "A")
    ptr = dig(alice, "-x", ips["gw"])
    assert f"gw.{net}.wg." in ptr
    assert "status: NXDOMAIN" in dig(alice, "-x", ips["eve"])
    assert "status: REFUSED" in dig(alice, "example.com", "A")     # not a recursive resolver
    tcp = dig(alice, "+tcp", f"alice.{net}.wg", "A")
    assert ips["alice"] in tcp
    # eve sees only itself and the server.
    assert "status: NXDOMAIN" in dig(eve, f"gw.{net}.wg", "A")
    assert ips["eve"] in dig(eve, f"eve.{net}.wg", "A")
    assert "10.66.0.1" in dig(eve, f"innernet-server.{net}.wg", "A")

    # getent, through the namespace's own resolv.conf (ip netns exec binds it).
    d = f"/etc/netns/{alice.ns}"
    os.makedirs(d)
    w.netns_dirs.append(d)
    with open(os.path.join(d, "resolv.conf"), "w") as f:
        f.write(f"nameserver {w.server_ip}\noptions timeout:2 attempts:2\n")
    got = alice.exec(["getent", "hosts", f"gw.{net}.wg"]).stdout
    assert got.split()[0] == ips["gw"]
    assert alice.exec(["getent", "hosts", f"eve.{net}.wg"], check=False).returncode == 2

    # Garbage at the real socket, then a real question is still answered.
    alice.python(GARBAGE, w.server_ip, timeout=60)
    assert ips["gw"] in dig(alice, f"gw.{net}.wg", "A")


GARBAGE = r"""
import random, socket, sys
rng = random.Random(14)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
q = bytes.fromhex("abcd01000001000000000000") + b"\x02gw\x03net\x02wg\x00\x00\x01\x00\x01"
for i in range(1000):
    if i % 2:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    else:
        b = bytearray(q)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        data = bytes(b)
    s.sendto(data, (sys.argv[1], 53))
"""


def peer_ip(w, name):
    import sqlite3
    with sqlite3.connect(w.db) as db:
        return db.execute("SELECT ip FROM peers WHERE name = ?", (name,)).fetchone()[0]


MASQUERADE = """table ip exitnat {
  chain post {
    type nat hook postrouting priority 100;
    oifname "lan" masquerade
  }
}
"""


def routing_snapshot(host):
    return {args: host.exec(["ip"] + list(args)).stdout for args in (
        ("-4", "rule", "show"), ("-6", "rule", "show"),
        ("-4", "route", "show", "table", "all"), ("-6", "route", "show", "table", "all"))}


def test_exit_node_carries_traffic_and_down_restores_routing(w):
    alice, eve, ex = w.h["alice"], w.h["eve"], w.h["exitn"]
    iface = w.lab.ifname("alice")
    ex.innernet("advertise-exit-node", w.lab.ifname("exitn"), "--yes")
    fetch(w, "alice")
    refused = alice.innernet("up", iface, "--exit-node", "exitn", check=False)
    assert refused.returncode == 1 and "does not offer an approved exit node" in refused.stderr
    w.srv.server("approve-routes", w.net, "--name", "exitn", "--routes", "0.0.0.0/0",
                 "--yes")
    # The documented masquerade on the exit node, so the internet can answer.
    ex.exec(["nft", "-f", "-"], input=MASQUERADE)
    fetch(w, "exitn")
    assert ex.exec(["cat", "/proc/sys/net/ipv4/conf/lan/forwarding"]).stdout.strip() == "1"

    alice.innernet("down", iface)
    before = routing_snapshot(alice)
    assert not tcp_reach(alice, WWW, timeout=1.0)
    alice.innernet("up", iface, "--no-write-hosts", "--exit-node", "exitn")
    wait_for(lambda: tcp_reach(alice, WWW), 20, "alice to reach the internet through exitn")
    rules = alice.exec(["ip", "-4", "rule", "show"]).stdout
    assert "not from all fwmark 0xca6c lookup 51820" in rules
    shown = alice.innernet("show", iface).stdout
    assert "exit node: exitn" in shown and "exit node: in use" in shown
    as_json = json.loads(alice.innernet("show", iface, "--json").stdout)[0]
    assert as_json["exit_node"]["exit_node"] == "exitn"
    assert [p["exit_node"] for p in as_json["peers"] if p["name"] == "exitn"] == [True]
    # Without --exit-node-allow-lan the LAN (here the underlay) goes to the exit node too;
    # the tunnel's own packets (marked) do not.
    lan = alice.exec(["ip", "route", "get", w.srv.underlay]).stdout
    assert f"dev {iface} table 51820" in lan
    marked = alice.exec(["ip", "route", "get", w.srv.underlay, "mark", "0xca6c"]).stdout
    assert "dev eth0" in marked
    # The server is still reached through the tunnel (its own packets are marked
    # and stay off the exit route): a fetch works, and the server's handshake is fresh.
    fetch(w, "alice")
    out = alice.python("import json,sys; sys.path.insert(0, sys.argv[1]); import innernet; "
                       "d = innernet.existing_backend('auto', sys.argv[2]).get(sys.argv[2]); "
                       "print(json.dumps([p.allowed_ips for p in d.peers]))",
                       os.path.dirname(os.path.dirname(os.path.dirname(__file__))), iface)
    # The default routes without the network's range (issue 28): 10.66/16 stays out.
    assert "128.0.0.0/1" in out.stdout and "::/0" in out.stdout
    assert "0.0.0.0/0" not in out.stdout and '"10.0.0.0/8"' not in out.stdout
    assert alice.innernet("down", iface)
    assert routing_snapshot(alice) == before
    # With --exit-node-allow-lan the main table's routes (the LAN) stay direct.
    alice.innernet("up", iface, "--no-write-hosts", "--exit-node", "exitn",
                   "--exit-node-allow-lan")
    assert "dev eth0" in alice.exec(["ip", "route", "get", w.srv.underlay]).stdout
    wait_for(lambda: tcp_reach(alice, WWW), 20, "alice to reach the internet (LAN allowed)")
    # `up` without --exit-node stops using it; the routing is as before again.
    alice.innernet("down", iface)
    assert routing_snapshot(alice) == before
    alice.innernet("up", iface, "--no-write-hosts", "--exit-node", "exitn")
    alice.innernet("up", iface, "--no-write-hosts")
    assert not alice.exec(["ip", "rule", "show", "priority", "5209"]).stdout.strip()

    # eve may not see exitn, so it cannot use it, and its routing is untouched.
    eve_before = routing_snapshot(eve)
    no = eve.innernet("up", w.lab.ifname("eve"), "--no-write-hosts", "--exit-node", "exitn",
                      check=False)
    assert no.returncode == 1 and "no peer named 'exitn' is visible" in no.stderr
    assert routing_snapshot(eve) == eve_before
