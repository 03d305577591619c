#!/usr/bin/env python3
"""Benchmark (issue 4): from both peers learning of each other to a direct handshake.

Two peers behind two port-preserving NATs that drop unsolicited packets, in
network namespaces (root). Each trial removes the peers from each other's
devices, then both sides start at the same instant: innernet.py's traversal
(every candidate tried at once-per-step, a LAN address only when it is on our
LAN, 1 s steps) against innernet's, simulated in the same run with the same
primitives (innernet's client: candidates tried last to first, the server-observed
endpoint last, one every 5 s, polling every 100 ms).

    python3 bench/traversal.py [--quick]      (as root)
"""
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, quick, table
from lab import Lab, invite, start_network

TRIAL = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import innernet as I
mode, iface, cdir, ddir, other_ip, start = sys.argv[2:8]
cfg = I.InterfaceConfig.from_toml(open(f"{cdir}/{iface}.conf").read(), "c")
peers, _, _ = I.load_data_store(f"{ddir}/{iface}.json")
peer = next(p for p in peers if p.ip == other_ip)
wg = I.UserspaceBackend()
wg.apply(iface, updates=[I.PeerUpdate(peer.public_key, remove=True)])
time.sleep(max(0, float(start) - time.time()))
t0 = time.time()
wg.apply(iface, updates=[I.PeerUpdate(peer.public_key, keepalive=25,
                                      allowed_ips=[I.host_prefix(peer.ip)])])
def connected():
    d = wg.get(iface).peer(peer.public_key)
    return d is not None and d.last_handshake > t0
if mode == "ours":
    if len(sys.argv) > 8:
        I.set_verbosity(1)
    I.traverse_nat(wg, iface, cfg, [peer], budget=60)
else:                                   # innernet's traversal
    work = [c for c in peer.candidates[:10] if c != peer.endpoint]
    work.insert(0, peer.endpoint)
    while work and not connected():
        ep = I.resolve_endpoint(work.pop())
        if ep:
            wg.apply(iface, updates=[I.PeerUpdate(peer.public_key, endpoint=ep)])
        step = time.time()
        while time.time() - step < 5 and not connected():
            time.sleep(0.1)
deadline = time.time() + 30
while not connected() and time.time() < deadline:
    time.sleep(0.01)
print(time.time() - t0 if connected() else "nan")
"""


def main():
    trials = 1 if quick() else 5
    pyz = os.environ.get("INNERNET_PYZ") or os.path.join(ROOT, "innernet.pyz")
    lab = Lab(innernet_cmd=["/usr/bin/python3", "-S", "-I", pyz])
    results = {"ours": [], "innernet": []}
    try:
        srv, net, _ = start_network(lab, {"c": "10.66.1.0/24"}, underlay="198.18.0.1/24")
        hosts = {}
        for name, wan, lan in (("a", "198.18.0.21", "198.19.1"), ("b", "198.18.0.22", "198.19.2")):
            nat = lab.add_nat(f"nat{name}", wan, lan)
            hosts[name] = lab.add_behind(nat, name)
            hosts[name].innernet("install", "--name", lab.ifname(name), "--no-write-hosts",
                                 "--no-nat-traversal", invite(srv, net, name, "c"))
        for name, h in hosts.items():                 # both know the other's candidates
            h.innernet("fetch", lab.ifname(name), "--no-write-hosts", "--no-nat-traversal")
        ips = {"a": "10.66.1.1", "b": "10.66.1.2"}
        for trial in range(trials):
            for mode in ("ours", "innernet"):
                start = time.time() + 1.5
                procs = {}
                for name, h in hosts.items():
                    other = "b" if name == "a" else "a"
                    procs[name] = subprocess.Popen(
                        ["ip", "netns", "exec", h.ns, sys.executable, "-c", TRIAL, ROOT, mode,
                         lab.ifname(name), h.path("client", "etc"), h.path("client", "lib"),
                         ips[other], str(start)] + (["-v"] if os.environ.get("DEBUG") else []),
                        stdout=subprocess.PIPE, text=True)
                times = [float(p.communicate(timeout=120)[0]) for p in procs.values()]
                results[mode].append(max(times))
                time.sleep(1)
    finally:
        lab.close()
    o, i = statistics.median(results["ours"]), statistics.median(results["innernet"])
    span = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in results.items()}
    table(f"NAT traversal: both peers learn of each other -> direct handshake ({trials} trials)",
          ["NATs", "innernet.py median s", "min-max s", "innernet-style median s", "min-max s",
           "ratio"],
          [("2 port-preserving, drop unsolicited", f"{o:.2f}", span["ours"], f"{i:.2f}",
            span["innernet"], f"{o / i:.3f}")])


if __name__ == "__main__":
    main()
