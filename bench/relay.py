#!/usr/bin/env python3
"""Benchmark (issue 11): time to a first packet and to a direct path, per NAT
scenario, and what the end-to-end relay carries and costs.

Network namespaces with nftables NAT routers (root, wireguard-go), driven by the
built innernet.pyz. innernet's own stepping (one candidate every 5 s,
no relay) runs on a pair of its own behind the same kind of NATs in the same
run. Times run from the moment both peers know each other (the second one's
install returned) to the first TCP answer between them.

    python3 bench/relay.py [--quick]      (as root)
"""
import os
import subprocess
import sys
import time

from common import ROOT, quick, table
from lab import Lab, device, device_peer_ips, invite, start_echo, start_network, tcp_reach

INNERNET_STEPPING = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import innernet as I
iface, cdir, ddir, other_ip, cap = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6])
peers, _, _ = I.load_data_store(f"{ddir}/{iface}.json")
peer = next(p for p in peers if p.ip == other_ip)
wg = I.UserspaceBackend()
dp = wg.get(iface).peer(peer.public_key)
wg.apply(iface, updates=[I.PeerUpdate(peer.public_key, remove=True)])
t0 = time.time()
wg.apply(iface, updates=[I.PeerUpdate(peer.public_key, keepalive=25, allowed_ips=dp.allowed_ips)])
def connected():
    d = wg.get(iface).peer(peer.public_key)
    return d is not None and d.last_handshake > t0
work = [c for c in peer.candidates[:10] if c != peer.endpoint]
work.insert(0, peer.endpoint)
while time.time() - t0 < cap and not connected():
    if work:
        ep = I.resolve_endpoint(work.pop())
        if ep:
            wg.apply(iface, updates=[I.PeerUpdate(peer.public_key, endpoint=ep)])
    step = time.time()
    while time.time() - step < 5 and not connected() and time.time() - t0 < cap:
        time.sleep(0.1)
print(time.time() - t0 if connected() else "nan")
"""

CRON = r"""
import subprocess, sys, time
deadline = time.monotonic() + 900
while time.monotonic() < deadline:
    subprocess.run(sys.argv[1:])
    time.sleep(1)
"""

SEND = r"""
import socket, sys, time
n = int(sys.argv[2])
s = socket.create_connection((sys.argv[1], 7001), timeout=30)
t0 = time.monotonic()
chunk = b"x" * 65536
left = n
while left > 0:
    s.sendall(chunk[:min(left, len(chunk))])
    left -= len(chunk)
s.shutdown(socket.SHUT_WR)
s.settimeout(60)
s.recv(100)
print(time.monotonic() - t0)
"""

SINK = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 7001)); srv.listen(4)
print("listening", flush=True)
while True:
    c, _ = srv.accept()
    while c.recv(1 << 16):
        pass
    c.sendall(b"done")
    c.close()
"""

BLOCK = """table inet block {{
  chain f {{ type filter hook forward priority -5; ip daddr {other} drop; ip saddr {other} drop; }}
}}
"""


def hub_loopback(seconds):
    """The relay's Python loop alone: 1312-byte datagrams through a RelayHub on
    loopback, as fast as one sender can push them. (datagrams/s, MB/s)."""
    import threading
    sys.path.insert(0, ROOT)
    import innernet as I
    import test_relay as T
    I.RELAY_PPS = 10 ** 9
    h = T.Hub()
    try:
        h.to_relay(h.sa, h.port_a, T.initiation(h.b_pub))
        h.to_relay(h.sb, h.port_b, T.initiation(h.a_pub))
        T.received(h.sa)
        h.sb.setblocking(False)
        got = [0]
        stop = threading.Event()

        def drain():
            while not stop.is_set():
                try:
                    h.sb.recv(2048)
                    got[0] += 1
                except BlockingIOError:
                    time.sleep(0.0005)
        t = threading.Thread(target=drain)
        t.start()
        pkt = T.data_packet(1312)
        before = h.hub.stats["datagrams"]
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            for _ in range(200):
                try:
                    h.sa.sendto(pkt, ("127.0.0.1", h.port_a))
                except OSError:
                    pass
        took = time.monotonic() - t0
        time.sleep(0.2)
        stop.set()
        t.join()
        n = h.hub.stats["datagrams"] - before
        return n / took, n * 1312 / took / 1e6
    finally:
        h.close()


class Bench:
    def __init__(self, lab, pyz):
        self.lab = lab
        self.srv, self.net, self.serve = start_network(lab, {"c": "10.66.1.0/24"},
                                                       underlay="198.18.0.1/24")
        self.hosts, self.ips, self.n = {}, {}, 0

    def nat(self, symmetric):
        self.n += 1
        return self.lab.add_nat(f"nat{self.n}", f"198.18.0.{40 + self.n}", f"198.19.{30 + self.n}",
                                symmetric=symmetric)

    def join(self, name, nat, *extra):
        host = self.lab.add_behind(nat, name)
        host.innernet("install", "--name", self.lab.ifname(name), "--no-write-hosts", *extra,
                      invite(self.srv, self.net, name, "c"))
        conf = open(host.path("client", "etc", f"{self.lab.ifname(name)}.conf")).read()
        self.ips[name] = conf.split('address = "')[1].split("/")[0]
        self.hosts[name] = host
        start_echo(host, self.ips[name])
        return host

    def run(self, name, how):
        host, ifname = self.hosts[name], self.lab.ifname(name)
        if how == "daemon":
            host.spawn(host.innernet_argv("up", ifname, "--daemon", "--interval", "60",
                                          "--no-write-hosts"), "up.log")
        else:
            host.spawn(["python3", "-c", CRON] + host.innernet_argv("fetch", ifname,
                                                                    "--no-write-hosts"), "up.log")

    def path(self, a, b):
        import json
        show = json.loads(self.hosts[a].innernet("show", self.lab.ifname(a), "--json").stdout)
        return {p["name"]: p["path"] for p in show[0]["peers"]}.get(b)

    def until(self, predicate, cap):
        t0 = time.monotonic()
        while time.monotonic() - t0 < cap:
            if predicate():
                return time.monotonic() - t0
            time.sleep(0.05)
        return float("nan")

    def pair(self, a, b, mode, symmetric, blocked=False):
        """(s to first packet, s to direct or nan) for a new pair."""
        nats = [self.nat(symmetric), self.nat(symmetric)]
        if blocked:
            for x, y in ((0, 1), (1, 0)):
                nats[x].exec(["nft", "-f", "-"], input=BLOCK.format(other=nats[y].underlay))
        self.join(a, nats[0])
        self.run(a, mode)
        self.join(b, nats[1])
        t0 = time.monotonic()
        self.run(b, mode)
        first = self.until(lambda: tcp_reach(self.hosts[b], self.ips[a], timeout=0.5), 60)
        first = time.monotonic() - t0 if first == first else first
        if blocked:
            for n in nats:
                n.exec(["nft", "delete", "table", "inet", "block"])
            t0 = time.monotonic()
        direct = self.until(lambda: self.path(a, b) == "direct" == self.path(b, a),
                            10 if symmetric else 90)
        return first, (time.monotonic() - t0 if direct == direct else direct), nats

    def innernet_pair(self, a, b, symmetric, cap):
        nats = [self.nat(symmetric), self.nat(symmetric)]
        for name, nat in ((a, nats[0]), (b, nats[1])):
            self.join(name, nat, "--no-nat-traversal")
        for name in (a, b):       # both know the other's endpoint and candidates
            self.hosts[name].innernet("fetch", self.lab.ifname(name), "--no-write-hosts",
                                      "--no-nat-traversal")
        procs = []
        for name, other in ((a, b), (b, a)):
            h = self.hosts[name]
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", h.ns, sys.executable, "-c", INNERNET_STEPPING, ROOT,
                 self.lab.ifname(name), h.path("client", "etc"), h.path("client", "lib"),
                 self.ips[other], str(cap)], stdout=subprocess.PIPE, text=True))
        times = [float(p.communicate(timeout=cap + 60)[0]) for p in procs]
        return max(times)

    def transfer(self, a, b, mb):
        """(MB/s, server CPU s per MB, bytes the server's WireGuard device counted)."""
        sink = self.hosts[b].spawn([sys.executable, "-c", SINK, self.ips[b]], "sink.log")
        self.until(lambda: "listening" in self.hosts[b].log("sink.log"), 10)
        with open(f"/proc/{self.serve.pid}/stat") as f:
            cpu0 = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        wg0 = sum(p["rx_bytes"] + p["tx_bytes"] for p in device(self.srv, self.net)["peers"])
        took = float(self.hosts[a].python(SEND, self.ips[b], mb * 1000000, timeout=300).stdout)
        with open(f"/proc/{self.serve.pid}/stat") as f:
            cpu1 = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        wg1 = sum(p["rx_bytes"] + p["tx_bytes"] for p in device(self.srv, self.net)["peers"])
        sink.terminate()
        cpu = (cpu1 - cpu0) / os.sysconf("SC_CLK_TCK")
        return mb / took, cpu / mb, wg1 - wg0


def fmt(x):
    return "never" if x != x else f"{x:.2f}"


def main():
    pyz = os.environ.get("INNERNET_PYZ") or os.path.join(ROOT, "innernet.pyz")
    lab = Lab(innernet_cmd=["/usr/bin/python3", "-S", "-I", pyz])
    cap = 12 if quick() else 30
    mb = 10 if quick() else 50
    rows, thr = [], []
    try:
        b = Bench(lab, pyz)
        sym_d = b.pair("e", "f", "daemon", True)
        sym_c = b.pair("h", "i", "cron", True)
        pp = b.pair("a", "b", "daemon", False)
        late = b.pair("j", "k", "daemon", False, blocked=True)
        inn_sym = b.innernet_pair("s", "t", True, cap)
        inn_pp = b.innernet_pair("p", "q", False, cap)
        rows = [
            ("2 symmetric NATs, `up --daemon`", fmt(sym_d[0]), "relayed", fmt(inn_sym),
             f"never (> {cap} s)" if inn_sym != inn_sym else "-"),
            ("2 symmetric NATs, `fetch` every 1 s (cron mode)", fmt(sym_c[0]), "relayed",
             fmt(inn_sym), "-"),
            ("2 port-preserving NATs, `up --daemon`", fmt(pp[0]), fmt(pp[1]), fmt(inn_pp),
             f"{pp[0] / inn_pp:.2f}" if inn_pp == inn_pp else "-"),
            ("port-preserving, direct blocked at first (time to direct after unblocking)",
             fmt(late[0]), fmt(late[1]), "-", "-"),
        ]
        relay_mbs, relay_cpu, counted = b.transfer("e", "f", mb)
        direct_mbs, _, _ = b.transfer("a", "b", mb)
        peer_e = device_peer_ips(b.hosts["e"], lab.ifname("e"))[b.ips["f"]]["endpoint"]
        thr = [(f"relayed (e2e), {mb} MB TCP", f"{relay_mbs:.1f}", f"{relay_cpu * 1000:.1f}",
                str(counted), peer_e),
               (f"direct, {mb} MB TCP (same run)", f"{direct_mbs:.1f}", "-", "-", "-")]
    finally:
        lab.close()
    pps, mbs = hub_loopback(1 if quick() else 3)
    table("Time to a first packet and to a direct path (s, from both peers knowing each other)",
          ["scenario", "innernet.py first packet", "innernet.py direct path",
           "innernet-style first packet", "ratio"], rows)
    table("The end-to-end relay's cost",
          ["transfer", "MB/s", "server CPU ms per MB", "bytes on the server's WireGuard device",
           "e's endpoint for f"], thr)
    table("The relay's Python loop alone (1312-byte datagrams on loopback, one sender)",
          ["datagrams/s", "MB/s", "target", "vs target"],
          [(f"{pps:,.0f}", f"{mbs:.1f}", "20 MB/s", f"{mbs / 20:.1f}x")])


if __name__ == "__main__":
    main()
