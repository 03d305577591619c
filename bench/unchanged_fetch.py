#!/usr/bin/env python3
"""Benchmark 3: an unchanged fetch (304) against a full fetch, at 100/1,000/10,000 peers.

Bytes on the wire (request and response, headers included) and server CPU
per fetch, measured on loopback against innernet.py's server in a child
process. Baselines in the same run: a full fetch from the same server (as an
innernet client, which sends no If-None-Match), with and without gzip, and a
full fetch from a server with the per-revision cache turned off (innernet
re-runs the query and the JSON encoding for every request).

    python3 bench/unchanged_fetch.py [--quick]
"""
import os
import tempfile
import time

from common import RawClient, ServerProcess, quick, synthetic_network, table


def per_fetch(server, client, path, headers, n, seconds=1.0):
    """Per-request bytes and server CPU; at least ``n`` requests and ``seconds``
    of them, since /proc counts CPU in 10 ms ticks."""
    c0, b0, done = server.cpu(), client.sent + client.received, 0
    end = time.monotonic() + seconds
    while done < n or time.monotonic() < end:
        status, hdrs, body = client.get(path, headers)
        done += 1
    return status, (client.sent + client.received - b0) / done, \
        (server.cpu() - c0) / done * 1000, hdrs


def main():
    sizes = (100, 1000) if quick() else (100, 1000, 10000)
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "bench.db")
            key, ips = synthetic_network(db, n)
            reps = 20 if quick() else max(20, 20000 // n)
            with ServerProcess(db, key) as srv:
                cl = RawClient(srv.port, ips[0], srv.public_key)
                st, full_b, full_cpu, hdrs = per_fetch(srv, cl, "/v1/user/state", (), reps)
                etag = hdrs["etag"]
                _, gz_b, gz_cpu, _ = per_fetch(srv, cl, "/v1/user/state",
                                               [("Accept-Encoding", "gzip")], reps)
                st304, un_b, un_cpu, _ = per_fetch(srv, cl, "/v1/user/state",
                                                   [("If-None-Match", etag)], reps * 5)
                assert st == 200 and st304 == 304
            with ServerProcess(db, key, cache=False) as srv:
                cl = RawClient(srv.port, ips[0], srv.public_key)
                _, nc_b, nc_cpu, _ = per_fetch(srv, cl, "/v1/user/state", (), max(5, reps // 4))
        rows.append((n, f"{full_b:,.0f}", f"{gz_b:,.0f}", f"{un_b:,.0f}",
                     f"{un_b / full_b:.4%}", f"{nc_cpu:.2f}", f"{full_cpu:.3f}", f"{un_cpu:.3f}",
                     f"{un_cpu / max(nc_cpu, 1e-9):.2%}"))
    table("Unchanged fetch vs full fetch (bytes on the wire and server CPU per fetch)",
          ["peers", "full B", "full gzip B", "304 B", "304/full bytes",
           "full CPU ms (no cache)", "full CPU ms (cache)", "304 CPU ms", "304/full-no-cache CPU"],
          rows)


if __name__ == "__main__":
    main()
