"""What one peer cannot do to the others (issue 28, items 3, 4, 5; acceptance 3
and 4), over real wireguard-go tunnels in network namespaces, with the built
innernet.pyz: deny them DNS (a UDP flood, TCP slots held by a trickle, from a
peer or from `nobody` on the server host), the API or the long poll; learn a
name or an address outside its view through any user endpoint or error path.

CIDRs: 'office' (boss, an admin; router7; a static phone; an invitation) and
'home' (alicia; a disabled invitation) are associated; 'other' (eve) is not, so
eve sees itself and the server, nothing else. The network is a /22, so every
address of it can be tried.
"""
import contextlib
import ipaddress
import json
import re
import subprocess
import sys

import pytest

from lab import ROOT, TIMEOUT_SCALE, db_rows, invite, wait_for

from .conftest import network_world

pytestmark = pytest.mark.netns

NETWORK = "10.66.0.0/22"
SERVER_IP = "10.66.0.1"
HIDDEN = ("boss", "router7", "alicia", "phone9", "newbie", "ghost")   # from eve
APPROVED, PENDING = "192.168.10.0/24", "192.168.20.0/24"                # router7's


@pytest.fixture(scope="module")
def w(pyz):
    cidrs = {"office": "10.66.1.0/24", "home": "10.66.2.0/24", "other": "10.66.3.0/24"}
    with network_world(pyz, cidrs, network=NETWORK) as w:
        srv, net, lab = w.srv, w.net, w.lab
        srv.server("add-association", net, "office", "home", "--yes")
        w.h = {}
        for name, cidr, admin in (("boss", "office", "true"), ("router7", "office", "false"),
                                  ("alicia", "home", "false"), ("eve", "other", "false")):
            host = w.h[name] = lab.add_host(name)
            host.innernet("install", "--name", lab.ifname(name), "--no-write-hosts",
                          invite(srv, net, name, cidr, admin=admin))
        srv.server("add-peer", net, "--name", "phone9", "--cidr", "office", "--auto-ip",
                   "--static", "--save-wg-quick", srv.path("phone9.conf"), "--yes")
        invite(srv, net, "newbie", "office")
        invite(srv, net, "ghost", "home")
        srv.server("disable-peer", net, "--name", "ghost", "--yes")
        w.h["router7"].innernet("advertise-routes", lab.ifname("router7"), APPROVED, PENDING,
                                "--yes")
        srv.server("approve-routes", net, "--name", "router7", "--routes", APPROVED, "--yes")
        w.key = server_key(w)
        w.ips = dict(rows(w, "SELECT name, ip FROM peers"))
        yield w


def server_key(w):
    sys.path.insert(0, ROOT)
    import innernet
    conf = w.srv.path("server", "etc", f"{w.net}.conf")
    return innernet.public_key(innernet.ServerConfig.from_toml(open(conf).read(), conf).private_key)


def rows(w, sql, args=()):
    return db_rows(w.db, sql, args)


# -- helpers run inside the namespaces (stdlib only, but for dnspython where said) --

QUESTION = r"""
def question(qid, name, qtype=1):
    import struct
    wire = b"".join(bytes([len(x)]) + x.encode() for x in name.rstrip(".").split("."))
    return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + wire + b"\0" + struct.pack("!HH", qtype, 1)
"""

FLOOD = QUESTION + r"""
import signal, socket, sys
sent = 0
def done(*_):
    print("sent", sent, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
q = question(7, sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("flooding", flush=True)
while True:                     # as fast as it can, answers never read
    try:
        s.sendto(q, (sys.argv[1], 53))
        sent += 1
    except OSError:
        pass
"""

TRICKLE = r"""
import signal, socket, sys, time
server, want, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sources = sys.argv[4].split(",") if sys.argv[4] != "-" else [None]
conns, held = [], 0
def done(*_):
    print("most held", held, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
for rnd in range(100000):
    alive = []
    for s in conns:             # still open? then one more byte of a 65,535-byte message
        try:
            if s.recv(1, socket.MSG_DONTWAIT) == b"":
                s.close()
                continue
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            continue
        try:
            s.send(b"\xff")
            alive.append(s)
        except OSError:
            s.close()
    conns = alive
    held = max(held, len(conns))
    for i in range(want - len(conns)):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            if sources[i % len(sources)]:
                s.bind((sources[i % len(sources)], 0))
            s.connect((server, 53))
            s.setblocking(False)
            s.send(b"\xff")
            conns.append(s)
        except OSError:
            s.close()
    print("round", rnd, "open", len(conns), flush=True)
    time.sleep(every)
"""

ASK = QUESTION + r"""
import json, select, socket, struct, sys, time
server, name, count, proto = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
wait = float(sys.argv[5])

def answered(data, qid):
    return len(data) >= 12 and struct.unpack("!H", data[:2])[0] == qid and \
        data[3] & 0xF == 0 and struct.unpack("!H", data[6:8])[0] >= 1

def udp(s, qid, deadline):
    # Asked, and asked again every 250 ms without an answer, as resolvers do
    # (a datagram may be lost on the way, in WireGuard's queues): (answered
    # within the deadline, answered the first time).
    again = time.monotonic()
    tries = 0
    while True:
        now = time.monotonic()
        if now >= deadline:
            return False, False
        if now >= again:
            s.sendto(question(qid, name), (server, 53))
            tries, again = tries + 1, now + 0.25
        if select.select([s], [], [], min(deadline, again) - now)[0] and \
                answered(s.recv(4096), qid):
            return True, tries == 1

def tcp(c, qid, deadline):
    q = question(qid, name)
    try:
        if c is None:                       # a resolver keeps its connection (RFC 7766)
            c = socket.create_connection((server, 53),
                                         timeout=max(0.01, deadline - time.monotonic()))
        c.sendall(struct.pack("!H", len(q)) + q)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            c.settimeout(left)
            chunk = c.recv(4096)
            if not chunk:
                raise ConnectionError
            data += chunk
        return c, answered(data[2:], qid)
    except OSError:
        if c is not None:
            c.close()
        return None, False

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ok, first, fast, c = 0, 0, 0, None
for i in range(count):
    start = time.monotonic()
    deadline = start + wait                 # each question: answered within wait, or not
    qid = 1000 + i
    if proto == "udp":
        got, at_once = udp(s, qid, deadline)
        first += at_once
    else:
        c, got = tcp(c, qid, deadline)
    ok += got
    fast += got and time.monotonic() - start <= 1.0
print(json.dumps(dict({"asked": count, "answered": ok, "answered_within_1s": fast},
                      **({"answered_first_time": first} if proto == "udp" else {}))))
"""

LONG_POLL = r"""
import http.client, json, sys
host, key = sys.argv[1], sys.argv[2]
c = http.client.HTTPConnection(host, 51820, timeout=90)
h = {"X-Innernet-Server-Key": key}
c.request("GET", "/v1/user/state", headers=h)
r = c.getresponse(); r.read()
etag = r.getheader("ETag")
c.request("GET", "/v1/user/state?wait=60", headers=dict(h, **{"If-None-Match": etag}))
print("waiting", flush=True)
r = c.getresponse(); r.read()
print(json.dumps({"status": r.status, "changed": r.getheader("ETag") != etag}), flush=True)
"""


# A question counts as answered within the 5 s a stub resolver waits before it
# gives up (glibc's default); how many came within 1 s is printed, not asserted:
# a test asserts no time (bench/ measures; a loaded CI host once took 1.0x s).
ANSWER_WAIT = 5.0


def ask(host, name, count, proto):
    wait = ANSWER_WAIT * TIMEOUT_SCALE
    out = host.python(ASK, SERVER_IP, name, count, proto, wait,
                      timeout=count * (wait + 1) + 60)
    said = json.loads(out.stdout)
    print(f"{proto}: {said}")
    return said["answered"]


def started(host, log, word):
    wait_for(lambda: word in host.log(log), 30, f"{log} on {host.name}")


def udp_drops(host):
    """{local port: datagrams dropped} of a host's UDP sockets (/proc/net/udp)."""
    out = {}
    for line in host.exec(["cat", "/proc/net/udp"]).stdout.splitlines()[1:]:
        f = line.split()
        port = int(f[1].split(":")[1], 16)
        out[port] = out.get(port, 0) + int(f[-1])
    return out


def rx_packets(host, ifname):
    return int(host.exec(["cat", f"/sys/class/net/{ifname}/statistics/rx_packets"]).stdout)


# -- items 3 and 4, acceptance 3 -----------------------------------------------------

@contextlib.contextmanager
def attack(w, *, flood, trickle):
    """eve floods the server's DNS over UDP with questions as fast as it can
    send them, and/or trickles every TCP slot it can get (so does `nobody` on
    the server host): 70 connections each, one byte every 2 s into a
    65,535-byte message (a local process gets replies only from the server's
    own address: the sockets are bound to the device). Yields a dict that
    says, after the block, what the attack did."""
    srv, eve = w.srv, w.h["eve"]
    said, procs = {}, []
    try:
        if trickle:
            procs.append(eve.spawn([sys.executable, "-c", TRICKLE, SERVER_IP, "70", "2", "-"],
                                   "trickle.log"))
            procs.append(srv.spawn(["setpriv", "--reuid=nobody", "--regid=nogroup",
                                    "--clear-groups", "/usr/bin/python3", "-c", TRICKLE,
                                    SERVER_IP, "70", "2", "-"], "trickle-nobody.log"))
            started(eve, "trickle.log", "round 2")
            started(srv, "trickle-nobody.log", "round 2")
        rx_before, drops_before = rx_packets(srv, w.net), udp_drops(srv)
        if flood:
            # The attacker's CPU is its own in the world, not the server's; here
            # both share two cores, so eve's sender and WireGuard run at the
            # lowest priority: as fast as they can when the server idles.
            for pid in subprocess.run(["ip", "netns", "pids", eve.ns], capture_output=True,
                                      text=True).stdout.split():
                if open(f"/proc/{pid}/comm").read().strip() == "wireguard-go":
                    subprocess.run(["renice", "-n", "19", "-p", pid], capture_output=True,
                                   check=True)
            procs.append(eve.spawn(["nice", "-n", "19", sys.executable, "-c", FLOOD, SERVER_IP,
                                    f"boss.{w.net}.wg"], "flood.log"))
            started(eve, "flood.log", "flooding")
            wait_for(lambda: rx_packets(srv, w.net) - rx_before > 20000, 60,
                     "the flood to reach the server")
        yield said
        said["server took packets"] = rx_packets(srv, w.net) - rx_before
        said["server UDP drops by port"] = {port: n - drops_before.get(port, 0)
                                            for port, n in udp_drops(srv).items()}
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait(timeout=20)
    for log, host, ran in (("flood.log", eve, flood), ("trickle.log", eve, trickle),
                           ("trickle-nobody.log", srv, trickle)):
        if ran:
            said[log] = host.log(log).splitlines()[-1]
    print(said)


def held(host, log):
    return int(host.log(log).split("most held")[1].split()[0])


def test_a_udp_flood_from_one_peer_leaves_the_others_answered(w):
    """Item 3: eve's flood spends eve's budget only; boss's 100 questions are
    each answered, and the DNS socket never overflows: what is past
    a budget is dropped by the service as it reads, not by the kernel at
    random, which drops every peer's questions alike (the finding's 4 of 6
    lost digs)."""
    name = f"boss.{w.net}.wg"
    assert ask(w.h["boss"], name, 5, "udp") == 5                  # before: all is well
    with attack(w, flood=True, trickle=False) as said:
        udp = ask(w.h["boss"], name, 100, "udp")
    assert udp == 100
    assert said["server UDP drops by port"].get(53, 0) == 0


def test_one_source_holds_no_more_than_its_share_of_dns_tcp_slots(w):
    """Item 4: eve, and `nobody` on the server host, trickle bytes into 70
    connections each; each holds 4 at most (each message must arrive whole
    within 10 s) and boss's 100 questions over TCP are each answered."""
    with attack(w, flood=False, trickle=True):
        tcp = ask(w.h["boss"], f"boss.{w.net}.wg", 100, "tcp")
    assert tcp == 100
    assert held(w.h["eve"], "trickle.log") <= 4 + 2       # DNS_TCP_PER_SOURCE (+ closing)
    assert held(w.srv, "trickle-nobody.log") <= 4 + 2


def test_one_peer_cannot_deny_dns_the_api_or_the_long_poll_to_others(w):
    """Acceptance 3: the flood and the trickles at once; boss's 100 UDP and 100
    TCP questions are each answered, its fetch works, and alicia's
    long poll is answered when the state changes."""
    lab, srv, boss = w.lab, w.srv, w.h["boss"]
    name = f"boss.{w.net}.wg"
    try:
        with attack(w, flood=True, trickle=True) as said:
            udp = ask(boss, name, 100, "udp")
            tcp = ask(boss, name, 100, "tcp")
            boss.innernet("fetch", lab.ifname("boss"), "--no-write-hosts", timeout=120)
            poll = w.h["alicia"].spawn([sys.executable, "-c", LONG_POLL, SERVER_IP, w.key],
                                       "poll.log")
            started(w.h["alicia"], "poll.log", "waiting")
            srv.server("rename-peer", w.net, "--name", "router7", "--new-name", "router8",
                       "--yes")
            poll.wait(timeout=90)
    finally:
        srv.server("rename-peer", w.net, "--name", "router8", "--new-name", "router7", "--yes",
                   check=False)
    print(f"boss: {udp}/100 UDP and {tcp}/100 TCP answered; {said}")
    assert udp == 100 and tcp == 100
    assert json.loads(w.h["alicia"].log("poll.log").splitlines()[-1]) == \
        {"status": 200, "changed": True}
    assert held(w.h["eve"], "trickle.log") <= 4 + 2
    assert held(srv, "trickle-nobody.log") <= 4 + 2


# -- item 5, acceptance 4 ---------------------------------------------------------------

HTTP = r"""
import http.client, json, sys
key = sys.argv[2]
c = http.client.HTTPConnection(sys.argv[1], 51820, timeout=30)
out = []
for method, path, body in json.load(sys.stdin):
    data = None if body is None else json.dumps(body).encode()
    h = {"X-Innernet-Server-Key": key}
    if data is not None:
        h["Content-Length"] = str(len(data))
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    out.append([method, path, r.status, r.read().decode(errors="replace")])
print(json.dumps(out))
"""

DNS = r"""
import json, sys
import dns.message, dns.query, dns.rcode, dns.reversename
out = []
for name, rdtype in json.load(sys.stdin):
    q = dns.message.make_query(name, rdtype)
    r = dns.query.tcp(q, sys.argv[1], timeout=20)
    out.append([name, rdtype, dns.rcode.to_text(r.rcode()),
                sorted(rr.to_text() for rrset in r.answer for rr in rrset)])
print(json.dumps(out))
"""


def http_as(host, w, requests):
    out = host.exec([sys.executable, "-c", HTTP, SERVER_IP, w.key], input=json.dumps(requests),
                    timeout=600)
    return json.loads(out.stdout)


def dns_as(host, questions):
    out = host.exec([sys.executable, "-c", DNS, SERVER_IP], input=json.dumps(questions),
                    timeout=900)
    return json.loads(out.stdout)


def test_a_peer_learns_no_name_or_address_outside_its_view(w):
    """eve (a CIDR associated with nothing) tries every address of the network
    through every user endpoint and error path, and every name: what it may
    not see is answered exactly as what does not exist."""
    eve = w.h["eve"]
    keys = dict(rows(w, "SELECT name, public_key FROM peers"))
    mine = {w.ips["eve"], SERVER_IP}
    everyone = [str(a) for a in ipaddress.ip_network(NETWORK)]
    others = [a for a in everyone if a not in mine]
    hidden_ips = {w.ips[n] for n in HIDDEN}
    assert hidden_ips <= set(others) and len(everyone) == 1024
    free, routes = "172.31.0.0/24", [APPROVED, PENDING, "192.168.10.128/25", "192.168.0.0/16"]
    requests = [
        ["GET", "/v1/user/state", None], ["GET", "/v1/user/capabilities", None],
        ["GET", "/v1/user/routes", None], ["GET", "/v1/user/rotations", None],
        ["POST", "/v1/user/relay", {"peers": everyone, "allocate": False}],
        ["POST", "/v1/user/relay", {"peers": everyone}],
        ["POST", "/v1/user/redeem", {"public_key": keys["router7"]}],
        ["POST", "/v1/user/rotation", {"public_key": keys["alicia"], "proofs": {}}],
        ["PUT", "/v1/user/candidates", []],
        ["GET", "/v1/user/peers", None], ["GET", "/v1/admin/peers", None],
        ["PUT", "/v1/admin/cidrs/3", {"name": "x", "cidr": "10.66.1.0/24", "parent": 1}],
    ] + [["GET", f"/v1/user/rotations?ip={a}", None] for a in everyone] + [
        ["POST", "/v1/user/routes", {"routes": [r]}] for r in [free] + routes] + [
        ["POST", "/v1/user/routes", {"routes": []}]]
    answers = http_as(eve, w, requests)
    text = []                               # what eve was told, echoes of its own asking out
    for method, path, status, body in answers:
        if path.startswith("/v1/user/rotations?ip="):
            ip = path.split("=", 1)[1]
            if ip not in mine:              # every other address: one answer, as if nobody
                assert (status, body.replace(ip, "<ip>")) == \
                    (404, '{"error": "no visible peer has <ip>"}'), (ip, body)
                continue
        if path == "/v1/user/relay":        # keyed by every address asked: checked below
            continue
        text.append(body)
    relay_view, relay = (json.loads(a[3]) for a in answers[4:6])
    for got in (relay_view, relay):
        assert got["relays"] == {} and got["offline"] == []
        assert {ip: why for ip, why in got["refused"].items() if ip not in mine} == \
            {ip: "no such peer" for ip in others}, got["refused"]
    advertised = [a for a in answers if a[1] == "/v1/user/routes" and a[0] == "POST"]
    first = advertised[0][3].replace(free, "<route>")
    for (_, _, status, body), r in zip(advertised[1:-1], routes):
        assert (status, body.replace(r, "<route>")) == (advertised[0][2], first), (r, body)

    names = [f"{n}.{w.net}.wg" for n in HIDDEN + ("nosuchpeer",)]
    questions = [[n, t] for n in names for t in ("A", "AAAA", "ANY")] + \
        [[str(ipaddress.ip_address(a).reverse_pointer), "PTR"] for a in everyone]
    told = dns_as(eve, questions)
    for name, rdtype, rcode, rrs in told:
        if any(name == ipaddress.ip_address(m).reverse_pointer for m in mine):
            continue
        assert (rcode, rrs) == ("NXDOMAIN", []), (name, rdtype, rcode, rrs)

    everything = "\n".join(text + [json.dumps([t[2:] for t in told])])   # not the questions
    for name in HIDDEN:
        assert not re.search(rf"\b{name}\b", everything), name
    for ip in hidden_ips:
        assert not re.search(rf"(?<![\d.]){re.escape(ip)}(?![\d])", everything), ip
