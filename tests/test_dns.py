"""The server's DNS (issue 14): its wire format read back by dnspython, fuzzed
with random and mutated packets, and the service on a real socket answering
each peer with only the names it may see."""
import contextlib
import ipaddress
import random
import socket
import struct
import threading

import pytest

try:  # dnspython reads the answers back: an optional test package (tests/requirements.txt)
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.reversename
except ImportError:
    dns = None
needs_dnspython = pytest.mark.skipif(dns is None, reason="needs dnspython to read DNS messages "
                                     "(pip install dnspython; tests/run.sh installs it)")

import innernet
from innernet import Peer
from helpers import make_coordinator

ZONE_PEERS = [Peer(1, "innernet-server", "10.80.0.1", 2, "k1", is_redeemed=True),
              Peer(2, "alice", "10.80.64.2", 4, "k2", is_redeemed=True),
              Peer(3, "bob", "fd00::3", 4, "k3", is_redeemed=True),
              Peer(4, "gone", "10.80.64.4", 4, "k4", is_redeemed=True, is_disabled=True),
              Peer(5, "invited", "10.80.64.5", 4, "k5")]
NETS = [ipaddress.ip_network("10.80.0.0/15"), ipaddress.ip_network("fd00::/64")]


def zone():
    return innernet.dns_zone(ZONE_PEERS, "test.wg", NETS)


def ask(name, rdtype, *, want_dnssec=False, edns=None, tcp=False, resolve=None):
    q = dns.message.make_query(name, rdtype, use_edns=edns, want_dnssec=want_dnssec)
    z = zone()
    raw = innernet.dns_answer(q.to_wire(), resolve or (lambda x: innernet.dns_resolve(z, x)),
                              tcp)
    r = dns.message.from_wire(raw)
    assert r.id == q.id and r.question == q.question
    return r


def addresses(r):
    return sorted(item.to_text() for rrset in r.answer for item in rrset)


@needs_dnspython
def test_names_addresses_and_reverse():
    r = ask("alice.test.wg", "A")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["10.80.64.2"]
    assert r.flags & dns.flags.AA and r.flags & dns.flags.QR
    assert r.answer[0].ttl == innernet.DNS_TTL
    assert addresses(ask("ALICE.Test.WG", "A")) == ["10.80.64.2"]       # any case
    assert addresses(ask("bob.test.wg", "AAAA")) == ["fd00::3"]
    assert addresses(ask("bob.test.wg", "A")) == []                    # NODATA
    assert ask("bob.test.wg", "A").rcode() == dns.rcode.NOERROR
    assert addresses(ask("alice.test.wg", "ANY")) == ["10.80.64.2"]
    assert addresses(ask("2.64.80.10.in-addr.arpa", "PTR")) == ["alice.test.wg."]
    rev6 = dns.reversename.from_address("fd00::3")
    assert addresses(ask(rev6, "PTR")) == ["bob.test.wg."]
    assert ask("test.wg", "A").rcode() == dns.rcode.NOERROR             # the apex


@needs_dnspython
def test_what_is_not_there_and_what_is_not_ours():
    for name in ("gone.test.wg", "invited.test.wg", "nobody.test.wg", "x.alice.test.wg"):
        assert ask(name, "A").rcode() == dns.rcode.NXDOMAIN, name
    assert ask("4.64.80.10.in-addr.arpa", "PTR").rcode() == dns.rcode.NXDOMAIN
    assert ask("9.9.9.9.in-addr.arpa", "PTR").rcode() == dns.rcode.REFUSED   # not our range
    assert ask("64.80.10.in-addr.arpa", "PTR").rcode() == dns.rcode.REFUSED  # partial
    assert ask("example.com", "A").rcode() == dns.rcode.REFUSED             # not recursive
    assert ask("wg", "A").rcode() == dns.rcode.REFUSED
    q = dns.message.make_query("alice.test.wg", "A", rdclass="CH")
    r = dns.message.from_wire(innernet.dns_answer(q.to_wire(),
                                                  lambda x: innernet.dns_resolve(zone(), x)))
    assert r.rcode() == dns.rcode.REFUSED


@needs_dnspython
def test_edns_is_answered_with_edns_and_unknown_versions_get_badvers():
    r = ask("alice.test.wg", "A", edns=0)
    assert r.edns == 0 and r.payload == innernet.DNS_UDP_MAX
    r = ask("alice.test.wg", "A", edns=1)
    assert r.rcode() == dns.rcode.BADVERS and not r.answer
    assert ask("alice.test.wg", "A").edns == -1


@needs_dnspython
def test_answers_too_large_for_udp_are_truncated_and_whole_over_tcp():
    many = lambda q: (0, [(innernet.DNS_A, bytes([10, 0, i // 256, i % 256])) for i in range(200)])
    r = ask("alice.test.wg", "A", resolve=many)
    assert r.flags & dns.flags.TC and not r.answer
    r = ask("alice.test.wg", "A", resolve=many, tcp=True)
    assert len(addresses(r)) == 200 and not r.flags & dns.flags.TC
    r = ask("alice.test.wg", "A", resolve=lambda q: (0, many(q)[1][:60]), edns=0)
    assert len(addresses(r)) == 60          # 60 * 16 bytes fits the 1232 EDNS allows


@needs_dnspython
def test_no_answer_to_responses_or_scraps_and_formerr_keeps_the_id():
    q = dns.message.make_query("alice.test.wg", "A").to_wire()
    resolve = lambda x: innernet.dns_resolve(zone(), x)
    assert innernet.dns_answer(q[:11], resolve) is None
    assert innernet.dns_answer(bytes([q[0], q[1], q[2] | 0x80]) + q[3:], resolve) is None
    r = innernet.dns_answer(q + b"junk", resolve)
    assert r[:2] == q[:2] and r[3] & 0xF == innernet.DNS_FORMERR
    notify = bytearray(q)
    notify[2] = (notify[2] & 0x87) | (4 << 3)               # opcode NOTIFY
    assert innernet.dns_answer(bytes(notify), resolve)[3] & 0xF == innernet.DNS_NOTIMP


def limit_for(data, tcp):
    """What the asker allows: 512 bytes, or its EDNS size up to ours; TCP 65535."""
    if tcp:
        return 65535
    try:
        q = innernet.dns_parse_query(data)
    except (innernet.DnsFormatError, struct.error):
        return 512
    return min(q.edns or 512, innernet.DNS_UDP_MAX)


def seeds():
    out = []
    for name, t in (("alice.test.wg", "A"), ("bob.test.wg", "AAAA"), ("x.test.wg", "ANY"),
                    ("2.64.80.10.in-addr.arpa", "PTR"), ("example.org", "MX")):
        for edns in (None, 0):
            q = dns.message.make_query(name, t, use_edns=edns)
            q.id = 4242
            out.append(q.to_wire())
    return out


@needs_dnspython
def test_fuzz_random_and_mutated_packets(counts):
    rng = random.Random(1414)
    z = zone()
    big = lambda q: (0, [(innernet.DNS_A, bytes(4))] * rng.randrange(0, 120))
    base = seeds()
    answered = 0
    for i in range(6000):
        kind = i % 3
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        else:
            b = bytearray(rng.choice(base))
            for _ in range(rng.randrange(1, 8)):
                op = rng.randrange(4)
                at = rng.randrange(len(b))
                if op == 0:
                    b[at] = rng.randrange(256)
                elif op == 1:
                    del b[at]
                elif op == 2:
                    b.insert(at, rng.randrange(256))
                else:
                    b[at:] = b[at:at + rng.randrange(4)]
                if not b:
                    break
            data = bytes(b)
        tcp = rng.random() < 0.2
        resolve = big if kind == 2 and rng.random() < 0.5 else \
            (lambda q: innernet.dns_resolve(z, q))
        out = innernet.dns_answer(data, resolve, tcp)
        if out is None:
            assert len(data) < 12 or data[2] & 0x80
            continue
        answered += 1
        assert out[:2] == data[:2]
        assert len(out) <= limit_for(data, tcp), (data, len(out))
        dns.message.from_wire(out, question_only=False)      # well-formed, always
    counts["DNS packets fuzzed"] = 6000
    counts["fuzzed DNS packets answered"] = answered


# -- the service on a real socket ---------------------------------------------------

@pytest.fixture
def served(tmp_path):
    co = make_coordinator(tmp_path)
    co.store.conn.execute("UPDATE peers SET ip = '127.1.0.' || id")
    co.store.revision += 1
    co.gate.local_callers = True
    co.views.dns_zone_name = "test.wg"
    server = innernet.DnsServer(co, "127.0.0.1", 0)
    stop = threading.Event()
    server.start(stop)
    yield co, server.port
    stop.set()
    server.close()


def udp_ask(port, name, source, rdtype="A", tries=3):
    """One question, asked again after 2 s without an answer, as resolvers do:
    right after a flood the kernel may drop it before the service reads it."""
    q = dns.message.make_query(name, rdtype)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(2)
        for attempt in range(tries):
            s.sendto(q.to_wire(), ("127.0.0.1", port))
            try:
                r = dns.message.from_wire(s.recv(4096))
            except socket.timeout:
                if attempt == tries - 1:
                    raise
                continue
            if r.id == q.id:
                return r


def tcp_ask(port, name, source, rdtype="A", count=1):
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(source, 0)) as s:
        for _ in range(count):
            wire = dns.message.make_query(name, rdtype).to_wire()
            s.sendall(struct.pack("!H", len(wire)) + wire)
            n = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
            out.append(dns.message.from_wire(s.recv(n, socket.MSG_WAITALL)))
    return out


def ip_of(co, name):
    return co.store.peer_by_name(name).ip


@needs_dnspython
def test_each_caller_resolves_only_the_peers_it_may_see(served):
    co, port = served
    dev1 = ip_of(co, "developer1")
    r = udp_ask(port, "developer2.test.wg", dev1)
    assert addresses(r) == [ip_of(co, "developer2")]
    assert udp_ask(port, "user1.test.wg", dev1).rcode() == dns.rcode.NXDOMAIN   # not visible
    assert addresses(udp_ask(port, "innernet-server.test.wg", dev1)) == \
        [ip_of(co, "innernet-server")]
    # (Reverse names are the network range's: here the peers sit on loopback
    # addresses outside it, so those are test_names_addresses_and_reverse's.)
    # user1 sees its own CIDR only (and the server).
    user1 = ip_of(co, "user1")
    assert addresses(udp_ask(port, "user2.test.wg", user1)) == [ip_of(co, "user2")]
    assert udp_ask(port, "developer1.test.wg", user1).rcode() == dns.rcode.NXDOMAIN
    # Strangers, and this host's own processes, are refused.
    assert udp_ask(port, "developer1.test.wg", "127.1.0.200").rcode() == dns.rcode.REFUSED
    # Over TCP, several questions on one connection.
    answers = tcp_ask(port, "developer2.test.wg", dev1, count=3)
    assert [addresses(r) for r in answers] == [[ip_of(co, "developer2")]] * 3
    # A disabled peer asks in vain, and is not found.
    co.store.set_disabled(co.store.peer_by_name("developer2").id, True)
    assert udp_ask(port, "developer2.test.wg", dev1).rcode() == dns.rcode.NXDOMAIN
    assert udp_ask(port, "developer1.test.wg", ip_of(co, "developer2")).rcode() == \
        dns.rcode.REFUSED


@needs_dnspython
def test_garbage_at_the_socket_leaves_the_service_answering(served):
    co, port = served
    rng = random.Random(53)
    dev1 = ip_of(co, "developer1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((dev1, 0))
        for _ in range(1000):
            s.sendto(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600))),
                     ("127.0.0.1", port))
    for junk in (b"\x00", b"\x00\x05abc", b"\xff\xff" + b"x" * 100):   # TCP scraps
        with socket.create_connection(("127.0.0.1", port), timeout=5,
                                      source_address=(dev1, 0)) as c:
            c.sendall(junk)
    assert addresses(udp_ask(port, "developer2.test.wg", dev1)) == [ip_of(co, "developer2")]


# -- one source cannot deny the service to the others (issue 28, items 3 and 4) ---------

def test_a_source_budget_is_a_bounded_token_bucket():
    b = innernet.SourceBudget(rate=10, burst=3, most=4)
    assert [b.take("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert b.delay("a", 0.0) == pytest.approx(0.1)
    assert b.take("a", 0.1) and not b.take("a", 0.1)
    assert b.take("b", 0.1)                            # another source: its own bucket
    for i in range(100):                               # many sources: memory stays bounded
        b.take(f"s{i}", 1000.0 + i)
    assert len(b._buckets) <= 4


@needs_dnspython
def test_a_flooding_source_is_dropped_and_the_others_answered(served):
    co, port = served
    dev1, dev2 = ip_of(co, "developer1"), ip_of(co, "developer2")
    q = dns.message.make_query("developer2.test.wg", "A").to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((dev1, 0))
        s.setblocking(False)
        for _ in range(5000):
            s.sendto(q, ("127.0.0.1", port))
        answered = 0
        for _ in range(5000):
            try:
                s.recv(4096)
                answered += 1
            except BlockingIOError:
                break
    # the flood's answers stop at the budget (its burst, and the little the
    # rate adds while it is read); the other source is answered at once
    assert answered <= innernet.DNS_SOURCE_BURST + innernet.DNS_SOURCE_RATE
    assert addresses(udp_ask(port, "developer1.test.wg", dev2, tries=1)) == [dev1]


def closed_by_server(c, timeout=5):
    c.settimeout(timeout)
    try:
        return c.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_tcp_shares_give_way_to_a_new_connection_as_the_api_does():
    """A source at its cap gives up its oldest waiting connection (every user
    of a host shares its address: a local user holding them cannot keep the
    host's resolver out); when all are taken, a source holding fewer than
    another takes a waiting one of the biggest holder; one being answered
    is never given up."""
    t = innernet.TcpShares(total=6, per_source=3)
    assert [t.admit("a", n) for n in ("a1", "a2", "a3")] == [(True, None)] * 3
    assert t.admit("a", "a4") == (True, "a1")          # its own oldest gives way
    assert t.busy("a", "a2")                           # a2 is being answered
    assert t.admit("a", "a5") == (True, "a3")          # a2 is skipped
    assert not t.busy("a", "a1")                       # given up: its owner shuts it
    t.release("a", "a1")                               # ... and nothing is counted twice
    assert t.held("a") == 3 and t.held() == 3
    assert [t.admit("b", n) for n in ("b1", "b2", "b3")] == [(True, None)] * 3
    assert t.held() == 6                               # all taken
    assert t.admit("c", "c1") == (True, "a4")          # a holds 3, c none: a's waiting one
    assert t.admit("c", "c2") == (True, "b1")          # then b, which holds most
    assert t.admit("d", "d1") == (True, "a5")          # 2 each: a gives its waiting one
    assert t.admit("e", "e1") == (True, "b2")
    assert t.admit("f", "f1") == (True, "c1")
    assert t.admit("g", "g1") == (False, None)         # one each: every source its share
    assert t.held() == 6
    t.idle("a2")
    t.release("a", "a2")
    assert t.admit("g", "g1") == (True, None)
    t2 = innernet.TcpShares(total=4, per_source=2)
    for n in ("x1", "x2"):
        t2.admit("x", n)
        t2.busy("x", n)
    assert t2.admit("x", "x3") == (False, None)        # both answering: refused


def trickles(port, source, n):
    """``n`` connections from ``source``, each holding the first byte of a
    65,535-byte message."""
    conns = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        c.sendall(b"\xff")
        conns.append(c)
    return conns


@needs_dnspython
def test_a_source_at_its_tcp_cap_gives_its_oldest_waiting_connection_up(served, monkeypatch):
    """Review: the cap refused a source's next connection, so a local user of
    a peer's host holding 4 trickles kept that host's resolver out of DNS over
    TCP. Now, as for the API, the oldest waiting one gives way."""
    co, port = served
    monkeypatch.setattr(innernet, "DNS_TCP_DEADLINE", 60.0)     # no trickle is cut here
    dev1, dev2 = ip_of(co, "developer1"), ip_of(co, "developer2")
    cap = innernet.DNS_TCP_PER_SOURCE
    conns = trickles(port, dev1, cap + 3)
    try:
        assert all(closed_by_server(c) for c in conns[:3])      # gave way to the newest
        assert not any(closed_by_server(c, 0.2) for c in conns[3:])   # those are held
        # the trickling source's own resolver is answered, and another source too
        assert addresses(tcp_ask(port, "developer2.test.wg", dev1)[0]) == [dev2]
        assert addresses(tcp_ask(port, "developer1.test.wg", dev2)[0]) == [dev1]
        assert closed_by_server(conns[3])                       # the oldest gave way
    finally:
        for c in conns:
            c.close()


@needs_dnspython
def test_a_trickle_is_cut(served, monkeypatch):
    co, port = served
    monkeypatch.setattr(innernet, "DNS_TCP_DEADLINE", 1.0)
    cap = innernet.DNS_TCP_PER_SOURCE
    conns = trickles(port, ip_of(co, "developer1"), cap)
    try:
        # a byte every 0.4 s: the whole message was due within 1 s, so it is cut
        cut = 0
        for c in conns:
            for _ in range(10):
                with contextlib.suppress(OSError):
                    c.sendall(b"\xff")
                if closed_by_server(c, 0.4):
                    cut += 1
                    break
        assert cut == cap
    finally:
        for c in conns:
            c.close()
