"""The kernel backend's WireGuard generic netlink (linux/wireguard.h), pure
encode and decode against messages built here byte by byte, and the backend
over a fake netlink socket that answers as the kernel does.

These machines' kernel has no WireGuard module: the same code runs against
the real one in the VM lane (tests/vm/guest_kernel.py, tests/e2e/test_vm.py).
The messages below are written out with struct from the header's layout, not
with innernet's own helpers, so an encoder and a decoder that agree on a
mistake do not pass.
"""
import base64
import errno
import socket
import struct

import pytest

import innernet

NESTED = 0x8000
FAMILY = 0x1F          # the id the controller gives WireGuard here (any will do)


def nla(kind, payload):
    """One netlink attribute: length, type, payload, padding to 4 bytes."""
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def nest(kind, *attrs):
    return nla(kind | NESTED, b"".join(attrs))


def sockaddr_in(ip, port):
    return struct.pack("=H", socket.AF_INET) + struct.pack(">H", port) \
        + socket.inet_aton(ip) + bytes(8)


def sockaddr_in6(ip, port):
    return struct.pack("=H", socket.AF_INET6) + struct.pack(">HI", port, 0) \
        + socket.inet_pton(socket.AF_INET6, ip) + struct.pack("=I", 0)


def allowed(family, ip, cidr):
    raw = socket.inet_pton(family, ip)
    return nest(0, nla(1, struct.pack("=H", family)), nla(2, raw), nla(3, bytes([cidr])))


def parse(data):
    """[(type, nested?, payload)] of the attributes in data."""
    out = []
    while len(data) >= 4:
        n, kind = struct.unpack_from("=HH", data)
        assert 4 <= n <= len(data)
        out.append((kind & 0x3FFF, bool(kind & NESTED), data[4:n]))
        data = data[(n + 3) & ~3:]
    return out


def key(n):
    return bytes([n]) * 32


def b64(raw):
    return base64.b64encode(raw).decode()


PRIV, PUB, KA, KB = key(1), key(2), key(0xA), key(0xB)

# The kernel's answer to WG_CMD_GET_DEVICE (the payloads after the genl
# header): a device with two peers over two messages, peer A's allowed IPs
# going on in the second, as wg_get_device_dump() splits a full skb.
GET_ANSWER = [
    nla(1, struct.pack("=I", 9)) + nla(2, b"wg0\0") + nla(3, PRIV) + nla(4, PUB)
    + nla(6, struct.pack("=H", 51820)) + nla(7, struct.pack("=I", 0x51820))
    + nest(8, nest(0, nla(1, KA), nla(2, bytes(32)), nla(4, sockaddr_in("198.18.0.5", 51821)),
                   nla(5, struct.pack("=H", 25)), nla(6, struct.pack("=qq", 1700000000, 5 * 10**8)),
                   nla(7, struct.pack("=Q", 10)), nla(8, struct.pack("=Q", 20)),
                   nest(9, allowed(socket.AF_INET, "10.66.1.1", 32),
                        allowed(socket.AF_INET6, "fd00:66::", 64)),
                   nla(10, struct.pack("=I", 1)))),
    nla(1, struct.pack("=I", 9)) + nla(2, b"wg0\0")
    + nest(8, nest(0, nla(1, KA), nest(9, allowed(socket.AF_INET, "10.9.0.0", 16))),
           nest(0, nla(1, KB), nla(4, sockaddr_in6("fd00::2", 4000)),
                nla(6, struct.pack("=qq", 0, 0)), nla(9, b""))),
]


def test_a_get_answer_over_two_messages_decodes_to_one_device():
    dev = innernet.wg_genl_device(GET_ANSWER)
    assert (dev["private_key"], dev["public_key"], dev["listen_port"], dev["fwmark"]) == \
        (PRIV, PUB, 51820, 0x51820)
    a, b = dev["peers"]
    assert a == {"public_key": KA, "endpoint": "198.18.0.5:51821", "keepalive": 25,
                 "handshake": 1700000000.5, "rx": 10, "tx": 20,
                 "allowed_ips": ["10.66.1.1/32", "fd00:66::/64", "10.9.0.0/16"]}
    assert b == {"public_key": KB, "endpoint": "[fd00::2]:4000", "keepalive": 0,
                 "handshake": 0.0, "rx": 0, "tx": 0, "allowed_ips": []}


def test_an_empty_device_decodes_with_no_peers():
    dev = innernet.wg_genl_device([nla(1, struct.pack("=I", 3)) + nla(2, b"wg1\0")
                                   + nla(6, struct.pack("=H", 0))])
    assert dev == {"private_key": b"", "public_key": b"", "listen_port": 0, "fwmark": 0,
                   "peers": []}


def device_change():
    return innernet.wg_set_messages(
        "wg0", private_key=b64(PRIV), listen_port=51820, fwmark=0, updates=[
            innernet.PeerUpdate(b64(KA), endpoint="198.18.0.5:51821", keepalive=25,
                                allowed_ips=["10.66.1.1/32", "fd00:66::/64"]),
            innernet.PeerUpdate(b64(KB), endpoint="[fd00::2]:4000"),     # endpoint only
            innernet.PeerUpdate(b64(key(0xC)), remove=True),
            innernet.PeerUpdate(b64(key(0xD)), name="no change")])


def test_a_set_request_is_the_bytes_wg_would_send():
    assert device_change() == [
        nla(2, b"wg0\0") + nla(3, PRIV) + nla(6, struct.pack("=H", 51820))
        + nla(7, struct.pack("=I", 0))
        + nest(8,
               nest(0, nla(1, KA), nla(3, struct.pack("=I", 2)),       # REPLACE_ALLOWEDIPS
                    nla(4, sockaddr_in("198.18.0.5", 51821)), nla(5, struct.pack("=H", 25)),
                    nest(9, allowed(socket.AF_INET, "10.66.1.1", 32),
                         allowed(socket.AF_INET6, "fd00:66::", 64))),
               # no allowed IPs and no flag: the peer's list stays as it is
               nest(0, nla(1, KB), nla(4, sockaddr_in6("fd00::2", 4000))),
               nest(0, nla(1, key(0xC)), nla(3, struct.pack("=I", 1))))]   # REMOVE_ME


def test_an_empty_allowed_ips_list_clears_the_peers_list():
    (msg,) = innernet.wg_set_messages("wg0", updates=[innernet.PeerUpdate(b64(KA),
                                                                           allowed_ips=[])])
    assert msg == nla(2, b"wg0\0") + nest(8, nest(0, nla(1, KA), nla(3, struct.pack("=I", 2))))


def test_nothing_to_change_sends_nothing_and_settings_alone_one_request():
    assert innernet.wg_set_messages("wg0", updates=[innernet.PeerUpdate(b64(KA))]) == []
    assert innernet.wg_set_messages("wg0", listen_port=0) == \
        [nla(2, b"wg0\0") + nla(6, struct.pack("=H", 0))]


def peers_of(msgs):
    """[(key, flags, allowed IP count)] over a request sequence, in order."""
    out = []
    for m in msgs:
        for kind, _, v in parse(m):
            if kind == 8:
                for _, _, pv in parse(v):
                    a = {k: val for k, _, val in parse(pv)}
                    flags = struct.unpack("=I", a[3])[0] if 3 in a else 0
                    out.append((a[1], flags, len(parse(a.get(9, b"")))))
    return out


def test_a_big_change_goes_in_requests_that_each_fit():
    updates = [innernet.PeerUpdate(b64(struct.pack(">I", i) * 8), endpoint="198.18.0.9:1",
                                   keepalive=25, allowed_ips=[f"10.{i >> 8}.{i & 255}.1/32"])
               for i in range(300)]
    msgs = innernet.wg_set_messages("wg0", private_key=b64(PRIV), updates=updates, limit=4096)
    assert len(msgs) > 5 and all(len(m) <= 4096 for m in msgs)
    assert [k for k, _, _ in parse(msgs[0])] == [2, 3, 8]       # the device's settings first
    assert all([k for k, _, _ in parse(m)] == [2, 8] for m in msgs[1:])
    assert peers_of(msgs) == [(struct.pack(">I", i) * 8, 2, 1) for i in range(300)]


def test_a_peer_with_many_allowed_ips_goes_on_under_its_key():
    nets = [f"10.{i >> 8}.{i & 255}.0/24" for i in range(2000)]
    msgs = innernet.wg_set_messages("wg0", updates=[
        innernet.PeerUpdate(b64(KA), allowed_ips=nets, keepalive=25),
        innernet.PeerUpdate(b64(KB), allowed_ips=["10.200.0.1/32"])], limit=8192)
    assert all(len(m) <= 8192 for m in msgs)
    got = peers_of(msgs)
    # the first piece replaces the list; the rest add to it (no flags)
    assert got[0][:2] == (KA, 2) and all(p[:2] == (KA, 0) for p in got[1:-1])
    assert sum(n for _, _, n in got[:-1]) == 2000 and got[-1] == (KB, 2, 1)
    ips = [parse(pv) for m in msgs for k, _, v in parse(m) if k == 8
           for _, _, pv in parse(v)]
    firsts = [next(val for k, _, val in p if k == 9) for p in ips[:-1]]
    first_ip = parse(parse(firsts[0])[0][2])[1][2]
    last_ip = parse(parse(firsts[-1])[-1][2])[1][2]
    assert (first_ip, last_ip) == (bytes([10, 0, 0, 0]), bytes([10, 7, 207, 0]))


def test_an_unresolved_endpoint_is_refused():
    with pytest.raises(innernet.InnernetError, match="not resolved"):
        innernet.wg_set_messages("wg0", updates=[
            innernet.PeerUpdate(b64(KA), endpoint="peer.example:51820")])


class FakeGenl:
    """A generic netlink socket answering as the kernel does: the controller
    (the WireGuard family's id, or ENOENT without the module), GET_DEVICE
    (GET_ANSWER for wg0, ENODEV otherwise) and SET_DEVICE (recorded; acked
    with ``set_errno``)."""

    def __init__(self, module=True, set_errno=0):
        self.module, self.set_errno, self.sets, self.queue = module, set_errno, [], []
        self.closed = False

    def settimeout(self, t):
        pass

    @staticmethod
    def msg(kind, flags, seq, payload):
        return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload

    def error(self, seq, code, request):
        self.queue.append(self.msg(2, 0, seq, struct.pack("=i", -code) + request[:16]))

    def send(self, data):
        length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data)
        assert length == len(data) and flags & 1                  # NLM_F_REQUEST
        cmd, version = data[16], data[17]
        attrs = {k: v for k, _, v in parse(data[20:])}
        if kind == 0x10:
            assert (cmd, version, attrs[2]) == (3, 1, b"wireguard\0")
            if not self.module:
                return self.error(seq, errno.ENOENT, data)
            self.queue.append(self.msg(0x10, 0, seq, bytes([1, 2, 0, 0])
                                       + nla(1, struct.pack("=H", FAMILY))))
            self.error(seq, 0, data)
        elif kind == FAMILY and cmd == 0:
            assert flags & 0x300 and version == 1                  # NLM_F_DUMP
            if attrs[2] != b"wg0\0":
                return self.error(seq, errno.ENODEV, data)
            self.queue.append(b"".join(self.msg(FAMILY, 2, seq, bytes([0, 1, 0, 0]) + m)
                                       for m in GET_ANSWER))
            self.queue.append(self.msg(3, 2, seq, bytes(4)))       # NLMSG_DONE
        elif kind == FAMILY and cmd == 1:
            assert flags & 4 and version == 1                      # NLM_F_ACK
            self.sets.append(data[20:])
            self.error(seq, self.set_errno, data)
        else:
            raise AssertionError((kind, cmd))
        return len(data)

    def recv(self, size):
        return self.queue.pop(0)

    def close(self):
        self.closed = True


@pytest.fixture
def genl(monkeypatch):
    box = {"sock": FakeGenl()}
    monkeypatch.setattr(innernet, "genl_socket", lambda: box["sock"])
    return box


def test_the_backend_reads_the_device_the_kernel_answers(genl):
    dev = innernet.KernelBackend().get("wg0")
    assert (dev.name, dev.public_key, dev.listen_port) == ("wg0", b64(PUB), 51820)
    a, b = dev.peers
    assert (a.public_key, a.endpoint, a.allowed_ips, a.persistent_keepalive, a.last_handshake,
            a.rx_bytes, a.tx_bytes) == (b64(KA), "198.18.0.5:51821",
                                        ["10.66.1.1/32", "fd00:66::/64", "10.9.0.0/16"], 25,
                                        1700000000.5, 10, 20)
    assert (b.public_key, b.endpoint, b.allowed_ips, b.last_handshake) == \
        (b64(KB), "[fd00::2]:4000", [], 0.0)
    assert genl["sock"].closed
    assert innernet.KernelBackend().observe("wg0") == {
        b64(KA): ("198.18.0.5:51821", 1700000000.5), b64(KB): ("[fd00::2]:4000", 0.0)}


def test_the_fast_path_digest_of_a_kernel_device_is_wireguard_gos(genl):
    """kernel_dump writes the device as UAPI text: the digest of the same
    device over UAPI (as wireguard-go answers, peers in another order) is equal."""
    uapi = (f"private_key={PRIV.hex()}\nlisten_port=51820\nfwmark=333856\n"
            f"public_key={KB.hex()}\nendpoint=[fd00::2]:4000\nlast_handshake_time_sec=0\n"
            f"last_handshake_time_nsec=0\npersistent_keepalive_interval=0\n"
            f"public_key={KA.hex()}\nendpoint=198.18.0.5:51821\n"
            f"last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\n"
            f"rx_bytes=10\ntx_bytes=20\npersistent_keepalive_interval=25\n"
            f"allowed_ip=10.66.1.1/32\nallowed_ip=fd00:66::/64\nallowed_ip=10.9.0.0/16\n"
            f"protocol_version=1\nerrno=0\n\n").encode()
    for now in (1700000001, 1800000000):          # A live, then long silent
        assert innernet.device_state_digest("wg0", now) == \
            innernet.device_digest([uapi], now) is not None
    assert innernet.kernel_dump("wg9") is None                    # ENODEV


def test_the_backend_sets_a_device_in_order_and_removes_stale_peers(genl):
    innernet.KernelBackend().apply("wg0", private_key=b64(PRIV), listen_port=51820,
                                   replace_peers=True, updates=[
                                       innernet.PeerUpdate(b64(KA), allowed_ips=["10.0.0.1/32"])])
    (sent,) = genl["sock"].sets
    # KB is on the device and not kept: removed before the kept peers' changes
    assert sent == nla(2, b"wg0\0") + nla(3, PRIV) + nla(6, struct.pack("=H", 51820)) + nest(
        8, nest(0, nla(1, KB), nla(3, struct.pack("=I", 1))),
        nest(0, nla(1, KA), nla(3, struct.pack("=I", 2)),
             nest(9, allowed(socket.AF_INET, "10.0.0.1", 32))))


def test_kernel_refusals_become_one_line_errors(genl):
    backend = innernet.KernelBackend()
    with pytest.raises(innernet.InnernetError, match="interface wg9 is not up"):
        backend.get("wg9")
    genl["sock"] = FakeGenl(set_errno=errno.EINVAL)
    with pytest.raises(innernet.InnernetError, match="cannot configure wg0: Invalid argument"):
        backend.apply("wg0", listen_port=1)
    genl["sock"] = FakeGenl(module=False)
    with pytest.raises(innernet.InnernetError, match="kernel module is not available"):
        backend.get("wg0")
    with pytest.raises(innernet.InnernetError, match="kernel module is not available"):
        backend.apply("wg0", listen_port=1)
    assert innernet.kernel_dump("wg0") is None


def test_nothing_imports_pyroute2():
    with open(innernet.__file__) as f:
        source = f.read()
    assert "import pyroute2" not in source and "from pyroute2" not in source
