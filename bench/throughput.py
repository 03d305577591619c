#!/usr/bin/env python3
"""Benchmark 4: full-state throughput and p50/p95 latency at 1,000 and 10,000 peers.

One keep-alive client on loopback fetching the whole state (as every innernet
client does each minute) for a fixed time. Baseline in the same run: the same
server with its per-revision cache off, i.e. the visibility query and the
JSON encoding redone for every request, as innernet does.

    python3 bench/throughput.py [--quick]
"""
import os
import tempfile
import time

from common import RawClient, ServerProcess, percentile, quick, synthetic_network, table


def hammer(srv, ip, seconds):
    cl = RawClient(srv.port, ip, srv.public_key)
    lat, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        status, _, _ = cl.get("/v1/user/state")
        lat.append(time.perf_counter() - t)
        assert status == 200
    cl.close()
    return len(lat) / seconds, percentile(lat, 50) * 1000, percentile(lat, 95) * 1000


def main():
    seconds = 1.5 if quick() else 5
    rows = []
    for n in ((1000,) if quick() else (1000, 10000)):
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "bench.db")
            key, ips = synthetic_network(db, n)
            results = {}
            for cache in (False, True):
                with ServerProcess(db, key, cache=cache) as srv:
                    results[cache] = hammer(srv, ips[0], seconds)
        (b_rps, b50, b95), (rps, p50, p95) = results[False], results[True]
        rows.append((n, f"{b_rps:.1f}", f"{b50:.1f}", f"{b95:.1f}", f"{rps:.1f}", f"{p50:.1f}",
                     f"{p95:.1f}", f"{rps / b_rps:.1f}x"))
    table("Full-state throughput, one keep-alive client on loopback",
          ["peers", "no cache req/s", "p50 ms", "p95 ms", "cached req/s", "p50 ms", "p95 ms",
           "speed-up"], rows)


if __name__ == "__main__":
    main()
