#!/usr/bin/env python3
"""Benchmark 2: how fast a new and a disabled peer reach another peer's device.

In network namespaces (root). An observer peer runs `up --daemon`; a new peer
joins, then the server disables it; each time we measure from the change on
the server until the observer's WireGuard device shows it. innernet.py's
daemon long-polls the server. Baseline in the same run: the same daemon with
--no-long-poll, syncing every --interval seconds as innernet does (60 s; 5 s
in --quick, so CI stays short).

    python3 bench/propagation.py [--quick]    (as root)
"""
import os
import signal
import statistics
import time

from common import ROOT, quick, table
from lab import Lab, invite, start_network

import innernet


def watch(ifname, ip, present, timeout):
    """Seconds until ``ip`` appears on (or leaves) a device; polled over UAPI."""
    wg = innernet.UserspaceBackend()
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        ips = {a.split("/")[0] for p in wg.get(ifname).peers for a in p.allowed_ips}
        if (ip in ips) == present:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"{ip} did not {'appear' if present else 'leave'} within {timeout} s")


def main():
    samples = 2 if quick() else 3
    interval = 5 if quick() else 60
    pyz = os.environ.get("INNERNET_PYZ") or os.path.join(ROOT, "innernet.pyz")
    lab = Lab(innernet_cmd=["/usr/bin/python3", "-S", "-I", pyz])
    results = {}
    try:
        srv, net, _ = start_network(lab, {"c": "10.66.1.0/24"})
        count = [0]

        def invite_and_join():
            count[0] += 1
            name = f"n{count[0]}"
            host = lab.add_host(name)
            host.innernet("install", "--name", lab.ifname(name), "--no-write-hosts",
                          invite(srv, net, name, "c"))
            return name, host
        _, obs = invite_and_join()
        obs_if = lab.ifname("n1")
        for mode, extra in (("long poll", []), ("interval", ["--no-long-poll"])):
            daemon = obs.spawn(obs.innernet_argv("up", obs_if, "--daemon", "--interval",
                                                 str(interval), "--no-write-hosts", *extra),
                               f"up-{len(results)}.log")
            time.sleep(1.5)
            added, disabled = [], []
            for _ in range(samples):
                name, host = invite_and_join()
                conf = open(host.path("client", "etc", f"{lab.ifname(name)}.conf")).read()
                ip = conf.split('address = "')[1].split("/")[0]
                added.append(watch(obs_if, ip, True, interval * 2 + 10))
                srv.server("disable-peer", net, "--name", name, "--yes")
                disabled.append(watch(obs_if, ip, False, interval * 2 + 10))
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=10)
            results[mode] = (added, disabled)
    finally:
        lab.close()
    rows = []
    for what, i in (("new peer", 0), ("disabled peer", 1)):
        lp, iv = results["long poll"][i], results["interval"][i]
        rows.append((what, f"{statistics.mean(lp):.2f}", f"{max(lp):.2f}",
                     f"{statistics.mean(iv):.2f}", f"{max(iv):.2f}",
                     f"{statistics.mean(lp) / statistics.mean(iv):.3f}"))
    table(f"Propagation to another peer's device ({samples} samples; baseline --interval "
          f"{interval})", ["change", "long poll mean s", "max s", f"interval {interval} s mean s",
                          "max s", "ratio"], rows)


if __name__ == "__main__":
    main()
