"""The end-to-end encrypted relay (issue 11), with NAT routers made with nftables.

Peers behind symmetric (random-port) NATs cannot reach each other directly; their
WireGuard datagrams go through the server's relay, which never decrypts them.
Both client modes: `up --daemon`, and `fetch` run once a second as cron would.
"""
import json
import time

import pytest

from lab import ROOT, device, device_peer_ips, invite, start_echo, tcp_reach

from .conftest import network_world

pytestmark = pytest.mark.netns

CRON = r"""
import subprocess, sys, time
argv = sys.argv[1:]
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    subprocess.run(argv)
    time.sleep(1)
"""

TRANSFER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 7000), timeout=20)
s.sendall(b"x" * 1000000 + b"\n")
s.settimeout(20)
print(s.recv(100).decode())
"""

API = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import innernet as I
cfg = I.InterfaceConfig.from_toml(open(sys.argv[2]).read(), "c")
api = I.ApiClient(cfg.server_internal_endpoint, cfg.server_public_key)
print(json.dumps(api.call("POST", "/user/relay", {"peers": sys.argv[3:]})))
"""

FORGE = r"""
import base64, hashlib, os, socket, sys
host, receiver = sys.argv[1], sys.argv[2]
ports = [int(p) for p in sys.argv[3:]]
key = hashlib.blake2s(b"mac1----" + base64.b64decode(receiver)).digest()
body = bytes([1, 0, 0, 0]) + os.urandom(112)
init = body + hashlib.blake2s(body, digest_size=16, key=key).digest() + bytes(16)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(100):
    for port in ports:
        for data in (init, bytes([4, 0, 0, 0]) + os.urandom(348), os.urandom(200)):
            s.sendto(data, (host, port))
print("sent")
"""

BLOCK = """table inet block {{
  chain f {{ type filter hook forward priority -5; ip daddr {other} drop; ip saddr {other} drop; }}
}}
"""


def wait_until(predicate, timeout, what):
    """(seconds it took); fails after ``timeout`` s."""
    start = time.monotonic()
    deadline = start + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return time.monotonic() - start
        except Exception as e:
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def world(pyz):
    with network_world(pyz, {"humans": "10.66.1.0/24", "robots": "10.66.2.0/24"},
                       underlay="198.18.0.1/24") as w:
        w.nats = {}
        for i, (nat, symmetric) in enumerate((("nate", True), ("natf", True), ("natg", True),
                                              ("nath", True), ("nati", True), ("nata", False),
                                              ("natb", False))):
            w.nats[nat] = w.lab.add_nat(nat, f"198.18.0.{31 + i}", f"198.19.{11 + i}",
                                        symmetric=symmetric)
        yield w


def join(w, name, cidr, *, start=None):
    """A host behind NAT 'nat<name>' joins (install); ``start``: 'daemon' or 'cron'."""
    host = w.lab.add_behind(w.nats["nat" + name], name)
    host.innernet("install", "--name", w.lab.ifname(name), "--no-write-hosts",
                  invite(w.srv, w.net, name, cidr))
    conf = open(host.path("client", "etc", f"{w.lab.ifname(name)}.conf")).read()
    w.ips[name] = conf.split('address = "')[1].split("/")[0]
    w.hosts[name] = host
    start_echo(host, w.ips[name])
    if start:
        run(w, name, start)
    return host


def run(w, name, how):
    host, ifname = w.hosts[name], w.lab.ifname(name)
    if how == "daemon":
        host.spawn(host.innernet_argv("-v", "up", ifname, "--daemon", "--interval", "60",
                                      "--no-write-hosts"), "up.log")
    else:
        # as cron runs it: no -v, so an unchanged run takes the fast path (issue 13)
        host.spawn(["python3", "-c", CRON] + host.innernet_argv("fetch", ifname,
                                                                "--no-write-hosts"), "up.log")


def path_of(w, name, other):
    show = json.loads(w.hosts[name].innernet("show", w.lab.ifname(name), "--json").stdout)
    return {p["name"]: p["path"] for p in show[0]["peers"]}.get(other)


def server_counted(w):
    """Bytes the server's WireGuard device carried for its peers (rx + tx)."""
    return sum(p["rx_bytes"] + p["tx_bytes"] for p in device(w.srv, w.net)["peers"])


def relayed_transfer(w, a, b):
    """1 MB from a to b; returns what the server's WireGuard device counted meanwhile."""
    before = server_counted(w)
    out = w.hosts[a].python(TRANSFER, w.ips[b], timeout=60).stdout
    assert out.startswith("pong 1000001"), out
    return server_counted(w) - before


def check_relayed(w, a, b):
    for x, y in ((a, b), (b, a)):
        assert path_of(w, x, y) == "relayed (end-to-end encrypted)", w.hosts[x].log("up.log")

        def at_relay():
            ep = device_peer_ips(w.hosts[x], w.lab.ifname(x))[w.ips[y]]["endpoint"]
            return ep.startswith(w.srv.underlay + ":") and not ep.endswith(":51820")
        # A direct try (every 30 s) points the endpoint at a candidate for a
        # second or two, and `show` says relayed meanwhile: wait it out.
        wait_until(at_relay, 10, f"{x}'s endpoint for {y} back at the relay")


@pytest.mark.parametrize("mode,names", [("daemon", ("e", "f")), ("cron", ("h", "i"))])
def test_symmetric_nats_connect_through_the_relay_at_once(world, mode, names):
    a, b = names
    join(world, a, "humans", start=mode)
    join(world, b, "humans")
    joined = time.monotonic()          # from here both peers know each other
    run(world, b, mode)
    wait_until(lambda: tcp_reach(world.hosts[b], world.ips[a], timeout=1), 60,
               f"{b} -> {a} through the relay")
    took = time.monotonic() - joined
    print(f"{mode}: symmetric NATs connected by TCP {took:.2f} s after the join")
    assert tcp_reach(world.hosts[a], world.ips[b])
    check_relayed(world, a, b)
    counted = relayed_transfer(world, a, b)
    print(f"{mode}: 1 MB relayed; the server's WireGuard device counted {counted} bytes")
    assert counted < 100000              # keepalives and API calls, not the transfer
    assert "relayed (end-to-end encrypted)" in world.hosts[a].log("up.log")


def test_outsiders_get_no_relay_and_forged_datagrams_go_nowhere(world):
    for name in ("e", "f"):
        if name not in world.hosts:
            pytest.skip("needs the daemon pair")
    g = join(world, "g", "robots", start="daemon")
    e, f = world.hosts["e"], world.hosts["f"]
    assert world.ips["e"] not in device_peer_ips(g, world.lab.ifname("g"))
    asked = json.loads(g.python(API, ROOT, g.path("client", "etc", f"{world.lab.ifname('g')}.conf"),
                                world.ips["e"], world.ips["f"]).stdout)
    assert asked["relays"] == {} and set(asked["refused"]) == {world.ips["e"], world.ips["f"]}
    assert not tcp_reach(g, world.ips["e"], timeout=2)
    # datagrams forged to the pair's relay ports, from g's host: counted leaving the
    # server towards e's and f's NATs, they do not add up to what was sent
    ports = [device_peer_ips(x, world.lab.ifname(n))[world.ips[o]]["endpoint"].rsplit(":", 1)[1]
             for x, n, o in ((e, "e", "f"), (f, "f", "e"))]
    wans = [world.nats["nate"].underlay, world.nats["natf"].underlay]
    world.srv.exec(["nft", "-f", "-"], input="table inet relaycount {\n chain o {\n"
                   "  type filter hook output priority 0;\n"
                   f"  ip daddr {{ {', '.join(wans)} }} udp sport {{ {', '.join(ports)} }} "
                   "ip length { 176, 380 } counter\n"
                   " }\n}\n")

    def out_packets():
        rules = json.loads(world.srv.exec(["nft", "-j", "list", "table", "inet",
                                           "relaycount"]).stdout)
        return sum(x["counter"]["packets"] for item in rules["nftables"] if "rule" in item
                   for x in item["rule"]["expr"] if "counter" in x)
    before = out_packets()
    f_key = device(f, world.lab.ifname("f"))["public_key"]
    g.python(FORGE, world.srv.underlay, f_key, *ports)
    assert tcp_reach(e, world.ips["f"])          # the pair is unharmed (and the relay past them)
    forwarded = out_packets() - before
    print(f"600 forged datagrams to the relay ports; {forwarded} of their sizes left the "
          f"server for the pair")
    assert forwarded < 10                        # a rekey's initiation at most


def test_a_relayed_pair_moves_to_direct_when_the_nats_allow_it(world):
    wans = {"a": world.nats["nata"].underlay, "b": world.nats["natb"].underlay}
    for x, y in (("a", "b"), ("b", "a")):
        world.nats["nat" + x].exec(["nft", "-f", "-"], input=BLOCK.format(other=wans[y]))
    join(world, "a", "humans", start="daemon")
    join(world, "b", "humans", start="daemon")
    wait_until(lambda: tcp_reach(world.hosts["a"], world.ips["b"], timeout=1), 60,
               "a -> b through the relay")
    check_relayed(world, "a", "b")
    for x in ("a", "b"):                       # the NATs now let the pair through
        world.nats["nat" + x].exec(["nft", "delete", "table", "inet", "block"])
    def said():
        return world.hosts["a"].log("up.log") + world.hosts["b"].log("up.log")
    # (`show` says relayed during a try; the log says how the try ended)
    took = wait_until(lambda: ("no longer relayed" in said() or "direct path works at" in said())
                      and path_of(world, "a", "b") == "direct" == path_of(world, "b", "a"),
                      120, "a <-> b directly")
    print(f"relayed pair moved to a direct path {took:.1f} s after the NATs allowed it")
    nat = world.nats["nata"]
    nat.exec(["nft", "-f", "-"], input="table inet count {\n chain c {\n"
             f"  type filter hook forward priority -5;\n  ip daddr {wans['b']} counter\n }}\n}}\n")
    before = server_counted(world)
    out = world.hosts["a"].python(TRANSFER, world.ips["b"], timeout=60).stdout
    assert out.startswith("pong 1000001")
    rules = json.loads(nat.exec(["nft", "-j", "list", "table", "inet", "count"]).stdout)
    direct = sum(x["counter"]["packets"] for item in rules["nftables"] if "rule" in item
                 for x in item["rule"]["expr"] if "counter" in x)
    assert direct > 500                          # on the direct path
    assert server_counted(world) - before < 100000

