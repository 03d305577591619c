#!/usr/bin/env python3
"""Benchmark 5: the server's resident memory at 10,000 peers.

innernet.py's API server in a child process with a 10,000-peer database,
after 200 different peers fetched their state and an admin listed all peers.
Baseline in the same run: the same server with 10 peers. (The userspace
WireGuard daemon is a separate process: wireguard-go holds ~10.5 KiB per
peer.)

    python3 bench/server_rss.py [--quick]
"""
import os
import tempfile

from common import RawClient, ServerProcess, quick, synthetic_network, table


def measure(n, callers):
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "bench.db")
        key, ips = synthetic_network(db, n)
        with ServerProcess(db, key) as srv:
            for ip in ips[:callers]:
                cl = RawClient(srv.port, ip, srv.public_key)
                assert cl.get("/v1/user/state")[0] == 200
                cl.close()
            return srv.rss_mib(), srv.rss_mib("VmHWM")


def main():
    n = 2000 if quick() else 10000
    base_rss, base_hwm = measure(10, 10)
    rss, hwm = measure(n, 200)
    table(f"Server memory with {n:,} peers (200 callers served)",
          ["peers", "RSS MiB", "peak RSS MiB", "baseline (10 peers) RSS MiB", "ratio",
           "target"], [(n, f"{rss:.1f}", f"{hwm:.1f}", f"{base_rss:.1f}",
                        f"{rss / base_rss:.1f}x", "<= 100 MiB")])


if __name__ == "__main__":
    main()
