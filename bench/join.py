#!/usr/bin/env python3
"""Benchmark 1: join time, from `innernet.pyz join` until traffic flows to the server.

In network namespaces over wireguard-go (root). Baseline in the same run:
innernet's client-side join sequence (`innernet install`: bring up with the invitation
key, redeem, set the new key, sleep 5 s, fetch up to 3 times 1 s apart),
written with innernet.py's own building blocks and run against the same
server. innernet's server also waits 5 s before it swaps the key, which this
baseline does not copy, so it is a lower bound of innernet's 5.2-11.3 s.

    python3 bench/join.py [--quick]          (as root)
"""
import os
import sys
import time

from common import ROOT, quick, table
from lab import Lab, invite, start_network, tcp_reach, wait_for

INNERNET_STYLE = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import innernet as I
invite_path, iface, cdir, ddir = sys.argv[2:6]
files = I.ClientFiles(iface=iface, config_dir=cdir, data_dir=ddir)
opts = I.FetchOptions(hosts=I.HostsOptions(write=False), no_nat_candidates=True)
inv = I.InterfaceConfig.from_toml(open(invite_path).read(), invite_path)
I.ensure_dir(cdir); I.ensure_dir(ddir)
server = I.server_peer_update(inv)
backend = I.bring_up("auto", iface, private_key=inv.private_key, address=inv.address,
                     listen_port=None, updates=[server], mtu=1280, routing=True)
new = I.generate_private_key()
api = I.ApiClient(inv.server_internal_endpoint, inv.server_public_key)
api.call("POST", "/user/redeem", {"public_key": I.public_key(new)})
api.close()
I.atomic_write(f"{cdir}/{iface}.conf", I.replaced(inv, private_key=new).to_toml())
backend.apply(iface, private_key=new)
time.sleep(5)                      # innernet: REDEEM_TRANSITION_WAIT
for attempt in range(3):
    try:
        I.fetch_interface(files, opts, allow_bring_up=True)
        break
    except I.InnernetError:
        time.sleep(1)
"""


def main():
    runs = 2 if quick() else 5
    bare = ["/usr/bin/python3", "-S", "-I"]
    pyz = os.environ.get("INNERNET_PYZ") or os.path.join(ROOT, "innernet.pyz")
    if not os.path.exists(pyz):
        sys.exit(f"bench: build {pyz} first (python3 build_zipapp.py)")
    lab = Lab(innernet_cmd=bare + [pyz])
    try:
        srv, net, _ = start_network(lab, {"c": "10.66.1.0/24"})
        for i in range(2 * runs):
            invite(srv, net, f"p{i}", "c")
        ours, theirs = [], []
        for i in range(2 * runs):
            host = lab.add_host(f"p{i}")
            start = time.monotonic()
            if i % 2 == 0:
                host.innernet("install", "--name", lab.ifname(f"p{i}"), "--no-write-hosts",
                              srv.path(f"p{i}.toml"))
            else:
                host.exec([sys.executable, "-c", INNERNET_STYLE, ROOT, srv.path(f"p{i}.toml"),
                           lab.ifname(f"p{i}"), host.path("etc"), host.path("lib")], timeout=60)
            wait_for(lambda: tcp_reach(host, "10.66.0.1", 51820, timeout=1) or
                     host.python("import socket; socket.create_connection(('10.66.0.1', 51820),"
                                 " timeout=1)", check=False).returncode == 0, 30, "traffic")
            (ours if i % 2 == 0 else theirs).append(time.monotonic() - start)
    finally:
        lab.close()
    o, t = sorted(ours), sorted(theirs)
    table("Join time: command start until a TCP connection to the server succeeds",
          ["runs", "innernet.py median s", "min-max s", "innernet-style median s", "min-max s",
           "ratio"],
          [(runs, f"{o[len(o) // 2]:.2f}", f"{o[0]:.2f}-{o[-1]:.2f}", f"{t[len(t) // 2]:.2f}",
            f"{t[0]:.2f}-{t[-1]:.2f}", f"{o[len(o) // 2] / t[len(t) // 2]:.3f}")])


if __name__ == "__main__":
    main()
