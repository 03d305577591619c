#!/usr/bin/env python3
"""Demonstration: a server and three peers in namespaces, talking over WireGuard.

Run through tests/demo.sh (root). Builds innernet.pyz, creates the network
'demo' with CIDRs 'humans' and 'robots', joins alice and bob (humans) and
robo (robots), associates the CIDRs, prints `innernet list --tree` and moves
traffic between the peers, directly.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import (ROOT, Lab, have_lab_tools, invite, link_bytes, start_echo,  # noqa: E402
                 start_network, tcp_reach, wait_for)

BARE = ["/usr/bin/python3", "-S", "-I"]


def say(text):
    print(f"\n== {text}", flush=True)


def main():
    ok, reason = have_lab_tools()
    if not ok:
        sys.exit(f"demo: {reason}")
    tmp = tempfile.mkdtemp(prefix="innernet-demo-")
    try:
        pyz = os.path.join(tmp, "innernet.pyz")
        subprocess.run([sys.executable, os.path.join(ROOT, "build_zipapp.py"), "-o", pyz],
                       check=True)
        run(Lab(innernet_cmd=BARE + [pyz]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("demo finished; namespaces and files removed")


def run(lab):
    try:
        say("server: a network (10.77.0.0/16) with CIDRs humans and robots")
        srv, net, _ = start_network(lab, {"humans": "10.77.1.0/24", "robots": "10.77.2.0/24"},
                                    network="10.77.0.0/16")
        peers = {n: lab.add_host(n) for n in ("alice", "bob", "robo")}
        for name, cidr in (("alice", "humans"), ("bob", "humans"), ("robo", "robots")):
            invite(srv, net, name, cidr, admin="true" if name == "alice" else "false")
        for name, host in peers.items():
            start = time.monotonic()
            host.innernet("install", "--name", lab.ifname(name[:4]), "--hosts-path",
                          host.hosts_path, srv.path(f"{name}.toml"))
            print(f"{name} joined in {time.monotonic() - start:.2f} s")
        iface = {n: lab.ifname(n[:4]) for n in peers}
        say("alice (admin) associates humans and robots over the API")
        peers["alice"].innernet("add-association", iface["alice"], "humans", "robots")
        for name, host in peers.items():
            host.innernet("fetch", iface[name], "--hosts-path", host.hosts_path)
        say("innernet list --tree, on alice")
        print(peers["alice"].innernet("list", "--tree").stdout)
        ips = {"alice": "10.77.1.1", "bob": "10.77.1.2", "robo": "10.77.2.1"}
        for name, host in peers.items():
            start_echo(host, ips[name])
        say("traffic between peers")
        before = link_bytes(srv)
        for a, b in (("alice", "bob"), ("bob", "robo"), ("robo", "alice")):
            wait_for(lambda: tcp_reach(peers[a], ips[b]), 20, f"{a} -> {b}")
            out = peers[a].python(
                "import socket,sys; s=socket.create_connection((sys.argv[1],7000),timeout=10);"
                "s.sendall(b'x'*500000+b'\\n'); print(s.recv(100).decode().strip())", ips[b]).stdout
            print(f"{a} -> {b} ({ips[b]}): {out.strip()}")
        after = link_bytes(srv)
        print(f"bytes through the server's link meanwhile: {sum(after) - sum(before)} "
              "(peers talk directly)")
        say("innernet show, on bob")
        print(peers["bob"].innernet("show").stdout)
    finally:
        lab.close()


if __name__ == "__main__":
    main()
