#!/usr/bin/env python3
"""Benchmark 11: the cron fetch and the memory footprint, as issue 13 measured them.

In network namespaces (root), for each size: a server whose database has N
peers in the client's CIDR, `innernet.pyz serve` on Debian's python3, and a
client that joined and holds all N peers on its wireguard-go device.
Everything runs as a user runs it, `ip netns exec NS python3 innernet.pyz ...`
(with -S -I: no site directory, as on an appliance), timed from outside
with GNU time (wall, peak RSS):

* `fetch`, nothing changed (median of the runs; the first run after a sync
  is done before the timed ones), and how many of them the fast path
  answered (a full sync rewrites `<iface>.fetch`; peers without a path make
  one every 30 or 300 s, see next_path_work);
* a first fetch: the interface down and the client's data store removed,
  then `up IFACE` (one fetch; `fetch` itself wants the interface up), which
  creates the device and adds all N peers (at the largest size);
* the server's resident memory (VmRSS, and the high-water mark VmHWM) after
  the client made 200 full state requests over the tunnel.

Baselines in the same run: the bare interpreter (`python3 -S -I -c pass`) for
the fetch, and the same server at the smallest size for memory. innernet
1.5.5's figures (compiled Rust, the issue's side-by-side run on a machine of
this kind) are printed beside ours for comparison; innernet's crates cannot
be built here.

    python3 bench/footprint.py [--quick]      (as root)
"""
import os
import statistics

from common import ROOT, quick, synthetic_server, table, timed
from lab import Lab, start_serve, wait_for

import innernet

BARE = ["/usr/bin/python3", "-S", "-I"]
INNERNET_FETCH = {100: (16, 4.2), 1000: (80, 5.6), 5000: (1097, 12.9)}   # ms, MB
INNERNET_SERVER = {100: 8.4, 1000: 9.8, 5000: 12.0}                         # MB
INNERNET_FIRST_5000 = 1.43                                                  # s

REQUESTS = r"""
import http.client, sys
host, key, header, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
c = http.client.HTTPConnection(host, 51820, timeout=30)
for _ in range(n):
    c.request("GET", "/v1/user/state", headers={header: key})
    r = c.getresponse()
    body = r.read()
    assert r.status == 200 and len(body) > 100, (r.status, body[:200])
print("ok")
"""


def status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


def measure(n, runs, first):
    pyz = os.environ.get("INNERNET_PYZ") or os.path.join(ROOT, "innernet.pyz")
    lab = Lab(innernet_cmd=BARE + [pyz])
    out = {}
    try:
        srv, net, key = synthetic_server(lab, n)
        serve = start_serve(srv, net)
        cl = lab.add_host("client")
        ifname = lab.ifname("c")
        cl.innernet("install", "--name", ifname, "--no-write-hosts", srv.path("c.toml"),
                    timeout=300)
        assert len(innernet.UserspaceBackend().get(ifname).peers) >= n
        ns = ["nsenter", f"--net=/var/run/netns/{cl.ns}"]
        fetch = ns + cl.innernet_argv("fetch", ifname, "--no-write-hosts")
        record = cl.path("client", "lib", f"{ifname}.fetch")
        timed(fetch)                         # settles; leaves the record the fast path reads

        def stamp():
            st = os.stat(record) if os.path.exists(record) else None
            return st and (st.st_ino, st.st_mtime_ns)
        walls, rss, full = [], [], 0
        for _ in range(runs):
            before = stamp()
            w, r = timed(fetch)
            full += stamp() != before or before is None    # a full sync rewrites the record
            walls.append(w)
            rss.append(r)
        out["unchanged"] = (statistics.median(walls), statistics.median(rss), max(rss), full)
        walls, rss = [], []
        for _ in range(runs):
            w, r = timed(ns + BARE + ["-c", "pass"])
            walls.append(w)
            rss.append(r)
        out["bare"] = (statistics.median(walls), max(rss))
        r = cl.python(REQUESTS, "10.66.0.1", innernet.public_key(key),
                      innernet.SERVER_KEY_HEADER, "200", timeout=600)
        assert r.stdout.strip() == "ok", r.stdout + r.stderr
        out["server"] = (status(serve.pid, "VmRSS"), status(serve.pid, "VmHWM"))
        if first:
            firsts = []
            for _ in range(3):
                cl.innernet("down", ifname, timeout=120)
                for name in (f"{ifname}.json", f"{ifname}.fetch", f"{ifname}.paths.json"):
                    path = cl.path("client", "lib", name)
                    if os.path.exists(path):
                        os.unlink(path)
                w, _ = timed(ns + cl.innernet_argv("up", ifname, "--no-write-hosts"))
                wait_for(lambda: len(innernet.UserspaceBackend().get(ifname).peers) >= n, 30,
                         "every peer on the device")
                firsts.append(w / 1000)
            out["first"] = statistics.median(firsts)
    finally:
        lab.close()
    return out


def main():
    sizes = [100, 300] if quick() else [100, 1000, 5000]
    runs = 3 if quick() else 10
    results = {n: measure(n, runs, first=(n == sizes[-1])) for n in sizes}
    big = 300 if quick() else 10000
    results[big] = measure(big, 1, first=False) if big not in results else results[big]
    fetch_rows = []
    for n in sizes:
        r = results[n]
        w, m, mmax, full = r["unchanged"]
        bw, bm = r["bare"]
        iw, im = INNERNET_FETCH.get(n, ("-", "-"))
        ratio = f"{w / iw:.2f}" if isinstance(iw, int) else "-"
        fetch_rows.append((f"{n:,}", f"{w:.0f}", f"{m:.1f} ({mmax:.1f})",
                           f"{bw:.0f} / {bm:.1f}", f"{w / bw:.1f}x", iw, im, ratio,
                           f"{runs - full} of {runs}"))
    table(f"Unchanged `innernet.pyz fetch` through ip netns exec (median of {runs})",
          ["peers", "wall ms", "peak RSS MiB, median (max)", "bare python3 ms / MiB",
           "vs bare", "innernet 1.5.5 ms", "innernet MB", "wall vs innernet",
           "runs on the fast path"], fetch_rows)
    n = sizes[-1]
    first = results[n]["first"]
    table(f"First `fetch`: the device created and {n:,} peers added (median of 3)",
          ["peers", "innernet.py s", "innernet 1.5.5 s (5,000)", "ratio"],
          [(f"{n:,}", f"{first:.2f}", INNERNET_FIRST_5000,
            f"{first / INNERNET_FIRST_5000:.2f}")])
    base = results[sizes[0]]["server"][0]
    rows = []
    for k in sorted(results):
        rss, hwm = results[k]["server"]
        rows.append((f"{k:,}", f"{rss:.1f}", f"{hwm:.1f}", f"{rss / base:.2f}",
                     INNERNET_SERVER.get(k, "-")))
    table("`innernet.pyz serve` resident memory after 200 full state requests",
          ["peers", "RSS MiB", "peak RSS MiB", f"vs {sizes[0]} peers", "innernet 1.5.5 MB"],
          rows)


if __name__ == "__main__":
    main()
