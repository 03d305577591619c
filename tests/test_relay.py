"""The end-to-end encrypted relay (issue 11): what it accepts, what it forwards, and
the client's path decisions. The relay's sockets are real UDP sockets on loopback;
the tunnels through it are in tests/e2e/test_relay.py.
"""
import hashlib
import os
import socket
import threading
import time

import pytest

import innernet
from innernet import Peer, PathMemo, RelayHub
from helpers import IPS, call


def keypair():
    k = innernet.generate_private_key()
    return k, innernet.public_key(k)


def mac1(data, receiver_public):
    """MAC1 as the WireGuard paper defines it, computed here independently."""
    import base64
    key = hashlib.blake2s(b"mac1----" + base64.b64decode(receiver_public)).digest()
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def initiation(receiver_public, sender_index=1):
    body = bytes([1, 0, 0, 0]) + sender_index.to_bytes(4, "little") + os.urandom(108)
    return body + mac1(body, receiver_public) + bytes(16)


def response(receiver_public, sender_index=2, receiver_index=1):
    body = bytes([2, 0, 0, 0]) + sender_index.to_bytes(4, "little") + \
        receiver_index.to_bytes(4, "little") + os.urandom(48)
    return body + mac1(body, receiver_public) + bytes(16)


def data_packet(n=64):
    return bytes([4, 0, 0, 0]) + os.urandom(n - 4)


# -- the wire format -----------------------------------------------------------------

def test_message_types_and_sizes():
    _, pub = keypair()
    assert innernet.wg_message_type(initiation(pub)) == innernet.WG_INITIATION
    assert innernet.wg_message_type(response(pub)) == innernet.WG_RESPONSE
    assert innernet.wg_message_type(bytes([3, 0, 0, 0]) + bytes(60)) == innernet.WG_COOKIE
    assert innernet.wg_message_type(data_packet(32)) == innernet.WG_DATA
    assert innernet.wg_message_type(data_packet(1312)) == innernet.WG_DATA
    for bad in (b"", bytes(148), initiation(pub)[:147], initiation(pub) + b"x",
                bytes([1, 1, 0, 0]) + initiation(pub)[4:], data_packet(33), data_packet(16),
                bytes([5, 0, 0, 0]) + bytes(60), b"GET / HTTP/1.1\r\n\r\n" + bytes(30)):
        assert innernet.wg_message_type(bad) is None


def test_mac1_binds_a_handshake_to_its_receiver():
    _, bob = keypair()
    _, eve = keypair()
    key = innernet.wg_mac1_key(bob)
    assert innernet.wg_mac1_valid(initiation(bob), key)
    assert innernet.wg_mac1_valid(response(bob), key)
    assert not innernet.wg_mac1_valid(initiation(eve), key)
    tampered = bytearray(initiation(bob))
    tampered[40] ^= 1
    assert not innernet.wg_mac1_valid(bytes(tampered), key)
    assert not innernet.wg_mac1_valid(data_packet(64), key)


# -- who may be relayed ---------------------------------------------------------------

def test_relay_pairs_follow_the_access_rules():
    c = [innernet.Cidr(1, "net", "10.1.0.0/16", None), innernet.Cidr(2, "infra", "10.1.0.0/24", 1),
         innernet.Cidr(3, "a", "10.1.1.0/24", 1), innernet.Cidr(4, "b", "10.1.2.0/24", 1)]
    a1 = Peer(2, "a1", "10.1.1.1", 3, keypair()[1], is_redeemed=True)
    a2 = Peer(3, "a2", "10.1.1.2", 3, keypair()[1], is_redeemed=True)
    b1 = Peer(4, "b1", "10.1.2.1", 4, keypair()[1], is_redeemed=True)
    srv = Peer(1, "innernet-server", "10.1.0.1", 2, keypair()[1], is_redeemed=True)
    refusal = innernet.relay_pair_refusal
    assert refusal(a1, a2, c, []) is None
    # what the asker may not see is "no such peer", as an address nobody has (issue 28.5)
    assert refusal(a1, b1, c, []) == "no such peer"
    assert refusal(a1, b1, c, [innernet.Association(1, 3, 4)]) is None
    assert refusal(a1, Peer(5, "x", "10.1.1.5", 3, keypair()[1]), c, []) == "no such peer"
    assert refusal(a1, innernet.replaced(a2, is_disabled=True), c, []) == "no such peer"
    assert "static" in refusal(a1, innernet.replaced(a2, is_static=True), c, [])
    assert "server" in refusal(a1, srv, c, [])
    assert refusal(a1, a1, c, []) and refusal(a1, None, c, []) == "no such peer"


def test_direct_retries_fall_in_shared_wall_clock_slots():
    due = innernet.direct_retry_due
    assert due(None, 1000.0, 1000.0)
    assert not due(1201.0, 1205.0, 1200.0)          # same 30 s slot
    assert due(1201.0, 1230.5, 1200.0)              # the next one
    assert not due(1201.0, 1350.0, 1200.0 - 7200)   # relayed long: 300 s slots
    assert due(1201.0, 1500.0, 1200.0 - 7200)
    assert due(1201.0, 1500.0, 0.0)


def test_the_path_memo_forgets_what_it_cannot_trust():
    k = keypair()[1]
    memo = PathMemo.from_json({"relays": {k: "198.18.0.1:40000", "nokey": "1.2.3.4:5",
                                          "x" * 43 + "=": 5,
                                          keypair()[1]: "not an endpoint"},
                               "since": {k: 5.0, keypair()[1]: "x"}, "tried": [1, 2]})
    assert memo.relays == {k: "198.18.0.1:40000"} and memo.since == {k: 5.0}
    assert memo.tried == {}
    for junk in (None, [], "x", {"relays": 7}):
        assert PathMemo.from_json(junk) == PathMemo()
    dp = innernet.DevicePeer(k, "198.18.0.1:40000", [], 25, 1.0, 0, 0)
    assert memo.relayed(dp)
    memo.keep_only(set())
    assert memo == PathMemo()


def test_the_memo_is_written_only_when_it_changes(tmp_path):
    files = innernet.ClientFiles("n", str(tmp_path), str(tmp_path))
    memo = PathMemo({keypair()[1]: "198.18.0.1:40000"})
    innernet.save_paths_memo(files, memo)
    path = files.paths_memo
    assert path == str(tmp_path / "n.paths.json")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    before = os.stat(path).st_mtime_ns
    time.sleep(0.01)
    innernet.save_paths_memo(files, memo)
    assert os.stat(path).st_mtime_ns == before
    assert innernet.load_paths_memo(files) == memo
    open(path, "w").write("{garbage")
    assert innernet.load_paths_memo(files) == PathMemo()


# -- the API route ------------------------------------------------------------------

@pytest.fixture
def relay_co(co):
    co.device.hub = RelayHub()
    yield co
    co.hub.close()


def test_a_peer_gets_relay_ports_only_for_peers_it_may_see(relay_co):
    status, body = call(relay_co, "POST", "/v1/user/relay", "developer1",
                        {"peers": [IPS["developer2"], IPS["user1"], "10.80.64.99", "nonsense",
                                   IPS["innernet-server"]]})
    assert status == 200
    assert set(body["relays"]) == {IPS["developer2"]}
    port = body["relays"][IPS["developer2"]]
    assert isinstance(port, int) and 0 < port < 65536
    refused = body["refused"]
    assert refused[IPS["user1"]] == "no such peer"           # not visible: as if nobody
    assert refused["10.80.64.99"] == "no such peer" and refused["nonsense"] == "not an IP address"
    assert "server" in refused[IPS["innernet-server"]]
    # the other side gets the pair's other port; asking again gives the same ports
    _, other = call(relay_co, "POST", "/v1/user/relay", "developer2",
                    {"peers": [IPS["developer1"]]})
    assert other["relays"][IPS["developer1"]] not in (port, None)
    _, again = call(relay_co, "POST", "/v1/user/relay", "developer1",
                    {"peers": [IPS["developer2"]]})
    assert again["relays"][IPS["developer2"]] == port
    assert len(relay_co.hub.pairs) == 1


def test_an_offline_peer_is_not_relayed_but_a_joining_one_is(relay_co):
    dev2 = relay_co.store.peer_by_ip(IPS["developer2"])
    relay_co.device.handshakes[dev2.public_key] = time.time() - 600     # its device entry is stale
    _, body = call(relay_co, "POST", "/v1/user/relay", "developer1",
                   {"peers": [IPS["developer2"]]})
    assert "not connected to the server" in body["refused"][IPS["developer2"]]
    assert body["offline"] == [IPS["developer2"]] and body["relays"] == {}
    # only asking who is offline allocates nothing, for online peers either
    _, asked = call(relay_co, "POST", "/v1/user/relay", "developer1",
                    {"peers": [IPS["developer2"]], "allocate": False})
    assert asked["offline"] == [IPS["developer2"]] and asked["relays"] == {}
    relay_co.device.handshakes[dev2.public_key] = time.time()
    _, asked = call(relay_co, "POST", "/v1/user/relay", "developer1",
                    {"peers": [IPS["developer2"]], "allocate": False})
    assert asked == {"relays": {}, "refused": {}, "offline": []} and relay_co.hub.pairs == {}
    relay_co.device.handshakes[dev2.public_key] = time.time() - 600
    # not heard from under its key yet (joining): its pair is opened; its own request
    # tells the relay where it is
    relay_co.device.observed.pop(dev2.public_key)
    _, body = call(relay_co, "POST", "/v1/user/relay", "developer1",
                   {"peers": [IPS["developer2"]]})
    assert IPS["developer2"] in body["relays"] and body["offline"] == []
    (mine, theirs), = relay_co.hub.pairs.values()
    assert theirs.src_ips == set() and mine.src_ips == {"169.10.26.8"}


@pytest.mark.parametrize("body", [[], {"peers": "x"}, {"peers": [1]}, {"peers": ["a" * 80]},
                                  {"peers": ["10.80.64.3"] * 4097}, {},
                                  {"peers": [], "allocate": "no"}])
def test_bad_relay_requests_are_400(relay_co, body):
    status, answer = call(relay_co, "POST", "/v1/user/relay", "developer1", body)
    assert status == 400 and answer["error"]


def test_no_relay_no_route(co):
    status, _ = call(co, "POST", "/v1/user/relay", "developer1", {"peers": []})
    assert status == 404
    assert call(co, "GET", "/v1/user/capabilities", "developer1")[1]["e2e_relay"] is False


def test_a_changed_rule_closes_the_pair(relay_co):
    call(relay_co, "POST", "/v1/user/relay", "developer1", {"peers": [IPS["developer2"]]})
    assert len(relay_co.hub.pairs) == 1
    dev2 = relay_co.store.peer_by_ip(IPS["developer2"])
    status, _ = call(relay_co, "PUT", f"/v1/admin/peers/{dev2.id}", "admin",
                     dict(dev2.to_json(), is_disabled=True))
    assert status == 204
    relay_co.device.sync()
    assert relay_co.hub.pairs == {}


# -- forwarding, on real sockets -------------------------------------------------------

class Hub:
    """A RelayHub running in a thread, with two peers allocated on ``host``."""

    def __init__(self, host="127.0.0.1", pps=None):
        self.hub = RelayHub()
        self.stop = threading.Event()
        self.a_priv, self.a_pub = keypair()
        self.b_priv, self.b_pub = keypair()
        self.a = Peer(10, "a", "10.1.1.1", 3, self.a_pub, is_redeemed=True)
        self.b = Peer(11, "b", "10.1.1.2", 3, self.b_pub, is_redeemed=True)
        self.port_a = self.hub.allocate(self.a, self.b, host, host)
        self.port_b = self.hub.allocate(self.b, self.a, host, host)
        self.thread = threading.Thread(target=self.hub.run, args=(self.stop,), daemon=True)
        self.thread.start()
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self.sa, self.sb = (socket.socket(fam, socket.SOCK_DGRAM) for _ in range(2))
        for s in (self.sa, self.sb):
            s.bind((host, 0))
            s.settimeout(2)

    def to_relay(self, sock, port, data):
        sock.sendto(data, (self.host, port))

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.hub.close()
        self.sa.close()
        self.sb.close()


def received(sock, timeout=2.0):
    sock.settimeout(timeout)
    try:
        return sock.recvfrom(65536)
    except socket.timeout:
        return None


@pytest.fixture
def hub():
    h = Hub()
    yield h
    h.close()


def test_a_handshake_through_the_relay(hub):
    # a's initiation arrives first: held until b shows up with a response... or here,
    # b's own packet is an initiation, so a's is dropped and b's goes to a
    hub.to_relay(hub.sa, hub.port_a, initiation(hub.b_pub))
    assert received(hub.sb, 0.3) is None
    init_b = initiation(hub.a_pub, 7)
    hub.to_relay(hub.sb, hub.port_b, init_b)
    got = received(hub.sa)
    assert got is not None and got[0] == init_b
    assert got[1][1] == hub.port_a                 # from the port a sends to: its NAT lets it in
    assert received(hub.sb, 0.3) is None           # the crossing initiation never arrives
    resp = response(hub.b_pub, 8, 7)
    hub.to_relay(hub.sa, hub.port_a, resp)
    assert received(hub.sb)[0] == resp
    for n in (32, 1312):
        d = data_packet(n)
        hub.to_relay(hub.sa, hub.port_a, d)
        assert received(hub.sb)[0] == d
        hub.to_relay(hub.sb, hub.port_b, d)
        assert received(hub.sa)[0] == d
    deadline = time.monotonic() + 5       # counted just after the send that we saw
    while hub.hub.stats["datagrams"] < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hub.hub.stats["datagrams"] == 6 and hub.hub.stats["bytes"] > 2 * 1312


def test_a_held_initiation_is_delivered_when_the_other_side_answers(hub):
    init_a = initiation(hub.b_pub, 3)
    hub.to_relay(hub.sa, hub.port_a, init_a)
    # b's first datagram is a response (to an earlier initiation of a): learned, and the
    # held initiation follows it
    resp = response(hub.a_pub, 4, 9)
    hub.to_relay(hub.sb, hub.port_b, resp)
    assert received(hub.sa)[0] == resp
    assert received(hub.sb)[0] == init_a


def test_forged_and_foreign_datagrams_are_dropped(hub):
    hub.to_relay(hub.sa, hub.port_a, initiation(hub.b_pub))
    hub.to_relay(hub.sb, hub.port_b, initiation(hub.a_pub))
    assert received(hub.sa) is not None
    dropped = hub.hub.stats["dropped"]
    eve = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    eve.bind(("127.0.0.2", 0))                       # another host
    same_ip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    same_ip.bind(("127.0.0.1", 0))                   # same address, not the learned port
    try:
        for s, data in ((eve, initiation(hub.a_pub)), (eve, data_packet(64)),
                        (same_ip, data_packet(64)), (same_ip, initiation(hub.b_pub)),
                        (eve, b"\x01\x00\x00\x00" + bytes(144)), (eve, b"hello"),
                        (same_ip, b""), (eve, b"")):
            s.sendto(data, ("127.0.0.1", hub.port_b))
            s.sendto(data, ("127.0.0.1", hub.port_a))
        # same_ip's initiation with b's MAC1 sent to a's port is an initiation for b from
        # an address of a's host: the relay takes it as a's (WireGuard roams the same way)
        deadline = time.monotonic() + 5
        while hub.hub.stats["dropped"] < dropped + 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hub.hub.stats["dropped"] >= dropped + 10
        assert received(hub.sb, 0.3)[0][0] == 1      # the one from a's address went to b
        assert received(hub.sa, 0.3) is None         # nothing forged reached a
    finally:
        eve.close()
        same_ip.close()


def test_each_side_is_held_to_its_rate(monkeypatch):
    monkeypatch.setattr(innernet, "RELAY_PPS", 50)
    h = Hub()
    try:
        h.to_relay(h.sa, h.port_a, initiation(h.b_pub))
        h.to_relay(h.sb, h.port_b, initiation(h.a_pub))
        assert received(h.sa) is not None
        for _ in range(400):
            h.to_relay(h.sa, h.port_a, data_packet(64))
        got = 0
        while received(h.sb, 0.5) is not None:
            got += 1
        assert 40 <= got <= 120, got              # the burst (50) and what 50/s adds meanwhile
    finally:
        h.close()


def test_a_forged_flood_does_not_spend_the_pairs_budget(monkeypatch):
    monkeypatch.setattr(innernet, "RELAY_PPS", 50)
    h = Hub()
    eve = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    eve.bind(("127.0.0.2", 0))
    try:
        h.to_relay(h.sa, h.port_a, initiation(h.b_pub))
        h.to_relay(h.sb, h.port_b, initiation(h.a_pub))
        assert received(h.sa) is not None
        for batch in range(1, 9):                 # four budgets' worth, from elsewhere,
            for _ in range(25):                   # in batches the socket buffer holds
                eve.sendto(data_packet(64), ("127.0.0.1", h.port_a))
                eve.sendto(initiation(h.b_pub), ("127.0.0.1", h.port_a))
            deadline = time.monotonic() + 5
            while h.hub.stats["dropped"] < 50 * batch and time.monotonic() < deadline:
                time.sleep(0.01)
            assert h.hub.stats["dropped"] >= 50 * batch
        for _ in range(20):
            h.to_relay(h.sa, h.port_a, data_packet(64))
        got = 0
        while received(h.sb, 0.5) is not None:
            got += 1
        assert got == 20
    finally:
        eve.close()
        h.close()


def test_ipv6_underlay():
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("this host has no IPv6 loopback")
    h = Hub("::1")
    try:
        h.to_relay(h.sa, h.port_a, initiation(h.b_pub))
        resp = response(h.a_pub)
        h.to_relay(h.sb, h.port_b, resp)
        assert received(h.sa)[0] == resp
    finally:
        h.close()


def test_idle_pairs_are_closed_and_the_relay_is_bounded(monkeypatch):
    monkeypatch.setattr(innernet, "RELAY_PAIRS_PER_PEER", 2)
    hub = RelayHub()
    try:
        a = Peer(1, "a", "10.1.1.1", 3, keypair()[1], is_redeemed=True)
        others = [Peer(2 + i, f"o{i}", f"10.1.1.{2 + i}", 3, keypair()[1], is_redeemed=True)
                  for i in range(3)]
        hub.allocate(a, others[0], "127.0.0.1", "127.0.0.1")
        hub.allocate(a, others[1], "127.0.0.1", "127.0.0.1")
        with pytest.raises(innernet.InnernetError) as e:
            hub.allocate(a, others[2], "127.0.0.1", "127.0.0.1")
        assert e.value.status == 429
        hub.retain({p.id: p for p in [a] + others[:1]}, lambda x, y: True)
        assert list(hub.pairs) == [(1, 2)]        # o1 is gone: its pair closed
    finally:
        hub.close()


def test_relay_ports_from_a_range():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        base = s.getsockname()[1]
    lo, hi = (base, base + 3) if base + 3 < 65536 else (base - 3, base)
    hub = RelayHub((lo, hi))
    try:
        a = Peer(1, "a", "10.1.1.1", 3, keypair()[1], is_redeemed=True)
        b = Peer(2, "b", "10.1.1.2", 3, keypair()[1], is_redeemed=True)
        ports = {hub.allocate(a, b, None, None), hub.allocate(b, a, None, None)}
        assert ports <= set(range(lo, hi + 1)) and len(ports) == 2
    finally:
        hub.close()
    assert innernet.port_range("52000-52999") == (52000, 52999)
    for bad in ("5", "9-3", "0-10", "1-70000", "a-b", "١-٢"):
        with pytest.raises(Exception):
            innernet.port_range(bad)


# -- the client's decisions (settle_paths), against a recording fake of the device -----

class FakeDevice:
    """Records applied updates; the device state is what the test sets."""

    def __init__(self, peers):
        self.peers = {p.public_key: p for p in peers}
        self.applied = []

    def get(self, iface):
        return innernet.Device(iface, peers=list(self.peers.values()))

    def apply(self, iface, updates):
        self.applied += updates
        for u in updates:
            if u.endpoint and u.public_key in self.peers:
                self.peers[u.public_key].endpoint = u.endpoint


def client(monkeypatch, relays=None, direct=(), offline=()):
    """(cfg, peers, device, calls) with traverse_nat and the relay request faked;
    ``relays`` None: the server has no relay."""
    own_priv, own = keypair()
    srv_priv, srv = keypair()
    cfg = innernet.InterfaceConfig("n", innernet.ipaddress.ip_interface("10.1.1.1/24"), own_priv,
                                   51820, srv, "198.18.0.1:51820", "10.1.0.1:51820")
    peers = [Peer(2 + i, f"p{i}", f"10.1.1.{2 + i}", 3, keypair()[1], is_redeemed=True,
                  endpoint=f"198.18.1.{i}:51820") for i in range(3)]
    calls = {"traverse": [], "relay": [], "probe": [], "ask": []}

    def traverse(backend, iface, cfg, todo, **kw):
        calls["traverse"].append([p.name for p in todo])
        return {p.public_key for p in todo if p.name not in direct}

    def request(api, cfg, todo, allocate=True):
        calls["relay" if allocate else "ask"].append([p.name for p in todo])
        if relays is None:
            return None
        if not allocate:
            return {}, {p.public_key for p in todo if p.name in offline}
        return ({p.public_key: relays[p.name] for p in todo if p.name in relays},
                {p.public_key for p in todo if p.name in offline})

    def probe(backend, iface, todo, memo, nets, network):
        calls["probe"].append([p.name for p in todo])
        return []
    monkeypatch.setattr(innernet, "traverse_nat", traverse)
    monkeypatch.setattr(innernet, "request_relays", request)
    monkeypatch.setattr(innernet, "probe_direct", probe)
    return cfg, peers, calls


def test_a_peer_with_no_path_gets_one_direct_step_then_the_relay(monkeypatch):
    cfg, peers, calls = client(monkeypatch, relays={"p0": "198.18.0.1:40000",
                                                    "p1": "198.18.0.1:40002"}, direct=("p2",))
    # 5 s into a wall-clock slot (DIRECT_RETRY[0] = 30 s): "now + 1" is the same slot,
    # "now + 31" the next, whenever the test runs
    now = time.time() // 30 * 30 + 5
    dev = FakeDevice([innernet.DevicePeer(p.public_key, p.endpoint, [innernet.host_prefix(p.ip)],
                                          25, 0.0) for p in peers])
    memo = PathMemo()
    session = innernet.PathSession(object(), dev, "n", cfg, memo)
    left = innernet.settle_paths(session, peers, now=now)
    assert calls["traverse"] == [["p0", "p1", "p2"]]        # one step for everyone...
    assert calls["relay"] == [["p0", "p1"]]                 # ...the relay for who missed it
    assert memo.relays == {peers[0].public_key: "198.18.0.1:40000",
                           peers[1].public_key: "198.18.0.1:40002"}
    assert dev.peers[peers[0].public_key].endpoint == "198.18.0.1:40000"
    assert [u.remove for u in dev.applied[:2]] == [True, False]   # re-added: initiates at once
    assert left == set() and set(memo.since) == {peers[0].public_key, peers[1].public_key}
    # the next run in the same slot: nothing to do, nothing written
    for dp in dev.peers.values():
        dp.last_handshake = now
    calls["traverse"].clear()
    innernet.settle_paths(innernet.PathSession(object(), dev, "n", cfg, memo), peers, now=now + 1)
    assert calls["traverse"] == [] and calls["probe"] == []
    # the next slot: the relayed ones are probed, the direct one left alone; the
    # memo is saved first, so that `show` meanwhile still calls them relayed
    saved = []
    session = innernet.PathSession(object(), dev, "n", cfg, memo,
                                   save=lambda m: saved.append(PathMemo.from_json(m.to_json())))
    innernet.settle_paths(session, peers, now=now + 31)
    assert calls["probe"] == [["p0", "p1"]]
    assert innernet.next_path_work(memo, set(), now + 31) <= 30.2
    assert set(saved[0].trying) == {peers[0].public_key, peers[1].public_key}
    assert memo.trying == {} and "trying" not in memo.to_json()
    pointed_away = innernet.DevicePeer(peers[0].public_key, "198.18.1.0:51820")
    assert not saved[0].relayed(pointed_away)
    assert saved[0].path_relayed(pointed_away, time.time())
    assert not saved[0].path_relayed(pointed_away, time.time() + 10)   # a try killed midway


def test_without_a_relay_every_candidate_is_tried_and_less_often_later(monkeypatch):
    cfg, peers, calls = client(monkeypatch)
    now = 1_000_000.0
    dev = FakeDevice([innernet.DevicePeer(peers[0].public_key, peers[0].endpoint, [], 25, 0.0)])
    memo = PathMemo()
    left = innernet.settle_paths(innernet.PathSession(None, dev, "n", cfg, memo), peers, now=now)
    assert left == {peers[0].public_key}
    assert calls["traverse"] == [["p0"], ["p0"]]           # the step, then every candidate
    assert innernet.next_path_work(memo, left, now) <= 30.2
    calls["traverse"].clear()
    innernet.settle_paths(innernet.PathSession(None, dev, "n", cfg, memo), peers, now=now + 5)
    assert calls["traverse"] == []                          # not again within the slot
    memo.since[peers[0].public_key] = now - 3600            # failing for an hour: 300 s slots
    memo.tried[peers[0].public_key] = now + 5
    # ...and the cron fetch's slow path is due at the next 300 s boundary, not in 30 s
    assert innernet.next_path_work(memo, {peers[0].public_key}, now + 6) == \
        pytest.approx((now + 5) // 300 * 300 + 300 - (now + 6) + 0.2)
    innernet.settle_paths(innernet.PathSession(None, dev, "n", cfg, memo), peers, now=now + 40)
    assert calls["traverse"] == []


def test_a_reallocated_relay_port_is_followed_at_once(monkeypatch):
    cfg, peers, calls = client(monkeypatch, relays={"p0": "198.18.0.1:40100"})
    now = time.time()
    dp = innernet.DevicePeer(peers[0].public_key, "198.18.0.1:40000", [], 25, now - 5)
    dev = FakeDevice([dp])
    memo = PathMemo({peers[0].public_key: "198.18.0.1:40000"}, {peers[0].public_key: now - 60},
                    {peers[0].public_key: now - 60})
    innernet.settle_paths(innernet.PathSession(object(), dev, "n", cfg, memo), peers[:1], now=now)
    assert memo.relays[peers[0].public_key] == "198.18.0.1:40100"
    assert dev.peers[peers[0].public_key].endpoint == "198.18.0.1:40100"
    assert calls["probe"] == [[]]


def test_overridden_static_and_disabled_peers_are_not_touched(monkeypatch):
    cfg, peers, calls = client(monkeypatch, relays={"p0": "198.18.0.1:40000"})
    cfg = innernet.replaced(cfg, peer_endpoint_overrides={peers[0].ip: "203.0.113.1:1"})
    mine = [peers[0], innernet.replaced(peers[1], is_static=True),
            innernet.replaced(peers[2], is_disabled=True)]
    dev = FakeDevice([innernet.DevicePeer(p.public_key, None, [], 25, 0.0) for p in mine])
    innernet.settle_paths(innernet.PathSession(object(), dev, "n", cfg, PathMemo()), mine)
    assert calls["traverse"] == [] and dev.applied == []


def test_a_peer_the_server_calls_offline_costs_no_direct_step(monkeypatch):
    cfg, peers, calls = client(monkeypatch, relays={}, offline=("p0",))
    now = 1_000_000.0
    dev = FakeDevice([innernet.DevicePeer(peers[0].public_key, peers[0].endpoint, [], 25, 0.0)])
    memo = PathMemo()
    session = innernet.PathSession(object(), dev, "n", cfg, memo)
    left = innernet.settle_paths(session, peers, now=now)
    # never tried: the server is asked first (nothing allocated), so no direct step,
    # and no relay request for it in the same run
    assert calls["ask"] == [["p0"]] and calls["traverse"] == [] and calls["relay"] == []
    assert left == {peers[0].public_key} and memo.offline == {peers[0].public_key}
    assert PathMemo.from_json(memo.to_json()) == memo
    innernet.settle_paths(innernet.PathSession(object(), dev, "n", cfg, memo), peers, now=now + 31)
    assert calls["traverse"] == [] and calls["ask"] == [["p0"]]   # the next slot: only the
    assert calls["relay"] == [["p0"]]                             # relay request


def test_peers_the_server_calls_offline_are_added_without_keepalive(monkeypatch):
    cfg, peers, calls = client(monkeypatch, relays={}, offline=("p1",))
    memo = PathMemo()
    assert innernet.learn_offline(object(), cfg, memo, peers) == {peers[1].public_key}
    assert calls["ask"] == [["p0", "p1", "p2"]]
    assert innernet.learn_offline(object(), cfg, memo, peers[1:2]) is None   # known: not asked
    desired = innernet.desired_peers(cfg, peers, quiet=memo.offline)
    assert [p.persistent_keepalive_interval for p in desired[:3]] == [25, 0, 25]
    assert desired[3].public_key == cfg.server_public_key       # always there, from the config
    updates = innernet.diff_peers([], desired, cfg.server_public_key, time.time())
    assert {u.name: u.keepalive for u in updates} == {"p0": 25, "p1": 0, "p2": 25}
    # heard from again: no longer offline, and the next sync gives it its keepalive
    dev = FakeDevice([innernet.DevicePeer(p.public_key, p.endpoint, [innernet.host_prefix(p.ip)],
                                          0 if p.name == "p1" else 25, time.time())
                      for p in peers])
    innernet.settle_paths(innernet.PathSession(object(), dev, "n", cfg, memo), peers)
    assert memo.offline == set()
    assert innernet.desired_peers(cfg, peers, quiet=memo.offline)[1] \
        .persistent_keepalive_interval == 25


def test_peers_asked_about_before_the_apply_are_not_asked_again(monkeypatch):
    cfg, peers, calls = client(monkeypatch, relays={"p1": "198.18.0.1:40000"}, offline=("p0",))
    memo = PathMemo()
    told = innernet.learn_offline(object(), cfg, memo, peers[:2])       # as fetch_interface does
    assert told == {peers[0].public_key} and calls["ask"] == [["p0", "p1"]]
    dev = FakeDevice([innernet.DevicePeer(p.public_key, p.endpoint, [innernet.host_prefix(p.ip)],
                                          25, 0.0) for p in peers[:2]])
    innernet.settle_paths(innernet.PathSession(object(), dev, "n", cfg, memo), peers[:2],
                          asked={p.public_key for p in peers[:2]})
    assert calls["ask"] == [["p0", "p1"]]                  # not again
    assert calls["traverse"] == [["p1"]]                   # the offline one gets no direct step
    assert calls["relay"] == [["p1"]]                      # nor a relay request in this run
