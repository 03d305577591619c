#!/usr/bin/env python3
"""Benchmark 6: `innernet.pyz fetch` with nothing changed, at 1,000 peers.

In network namespaces (root): a server whose database has 1,000 peers in the
client's CIDR, and one client that joined and holds all of them on its
wireguard-go device. Each run is `python3 -S -I innernet.pyz fetch IFACE`;
wall time and peak RSS (GNU time's %M) are measured. Baselines in the same run: a full
fetch (the cached ETag removed first), the bare interpreter
(`python3 -S -I -c pass`), and `innernet.pyz --version` (start-up and import).
innernet's compiled client takes about 25 ms and 4.5 MB here (issue 6).

    python3 bench/fetch_cost.py [--quick]     (as root)
"""
import json
import os
import statistics

from common import ROOT, quick, synthetic_server, table, timed
from lab import Lab, start_serve

import innernet


def main():
    n = 300 if quick() else 1000
    runs = 3 if quick() else 10
    bare = ["/usr/bin/python3", "-S", "-I"]
    pyz = os.environ.get("INNERNET_PYZ") or os.path.join(ROOT, "innernet.pyz")
    lab = Lab(innernet_cmd=bare + [pyz])
    rows = {}
    try:
        srv, net, _ = synthetic_server(lab, n)
        start_serve(srv, net)
        cl = lab.add_host("client")
        ifname = lab.ifname("c")
        cl.innernet("install", "--name", ifname, "--no-write-hosts", srv.path("c.toml"))
        assert len(innernet.UserspaceBackend().get(ifname).peers) >= n
        ns = ["nsenter", f"--net=/var/run/netns/{cl.ns}"]
        fetch = ns + cl.innernet_argv("fetch", ifname, "--no-write-hosts")
        store = cl.path("client", "lib", f"{ifname}.json")

        def forget_etag():
            data = json.load(open(store))
            data.pop("etag", None)
            innernet.atomic_write(store, json.dumps(data, indent=2) + "\n")
        cases = [("unchanged fetch (304)", fetch, None), ("full fetch", fetch, forget_etag),
                 ("python3 -S -I -c pass", ns + bare + ["-c", "pass"], None),
                 ("innernet.pyz --version", ns + bare + [pyz, "--version"], None)]
        for name, argv, before in cases:
            walls, rss = [], []
            for _ in range(runs):
                if before:
                    before()
                w, r = timed(argv)
                walls.append(w)
                rss.append(r)
            rows[name] = (statistics.median(walls), max(rss))
    finally:
        lab.close()
    base_w, base_r = rows["full fetch"]
    table(f"`innernet.pyz fetch` at {n:,} peers (median wall of {runs}, peak RSS)",
          ["run", "wall ms", "peak RSS MiB", "vs full fetch (wall)"],
          [(k, f"{w:.0f}", f"{r:.1f}", f"{w / base_w:.2f}") for k, (w, r) in rows.items()]
          + [("innernet (compiled), reported", "~25", "~4.5", "")])


if __name__ == "__main__":
    main()
