#!/usr/bin/env python3
"""Benchmark 7: one changed peer among 5,000 on a device, against `wg setconf` of all.

A wireguard-go device in a network namespace (root) holds 5,000 peers. One
peer's endpoint changes. innernet.py reads the device, diffs it against the
5,000 desired peers and applies the one change over UAPI; the figures are
the whole path and the apply alone. Baseline in the same run: `wg setconf`
with the full 5,000-peer configuration (wireguard-tools).

    python3 bench/apply_one.py [--quick]      (as root)
"""
import base64
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import quick, table
from lab import Lab

import innernet


def main():
    if shutil.which("wg") is None:
        sys.exit("bench: needs wg (apt install wireguard-tools)")
    n = 1000 if quick() else 5000
    reps = 3 if quick() else 7
    lab = Lab()
    try:
        host = lab.add_host("dev")
        ifname = lab.ifname("d")
        host.exec(["wireguard-go", ifname])
        wg = innernet.UserspaceBackend()
        priv = innernet.generate_private_key()
        peers = [innernet.Peer(i, f"p{i}", f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
                               1, base64.b64encode(os.urandom(32)).decode(),
                               f"198.18.{(i >> 8) & 255}.{i & 255}:51820", 25, is_redeemed=True)
                 for i in range(1, n + 1)]
        wg.apply(ifname, private_key=priv, listen_port=0, replace_peers=True,
                 updates=innernet.diff_peers([], peers, None, time.time(), resolve=innernet.resolve_endpoint))
        conf = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
        conf.write(f"[Interface]\nPrivateKey = {priv}\n")
        for p in peers:
            conf.write(f"[Peer]\nPublicKey = {p.public_key}\nAllowedIPs = {p.ip}/32\n"
                       f"Endpoint = {p.endpoint}\nPersistentKeepalive = 25\n")
        conf.close()
        whole, apply_only, setconf = [], [], []
        for r in range(reps):
            peers[n // 2] = innernet.replaced(peers[n // 2], endpoint=f"198.19.0.{r + 1}:4000")
            t0 = time.perf_counter()
            dev = wg.get(ifname)
            ups = [u for u in innernet.diff_peers(dev.peers, peers, None, time.time(), resolve=innernet.resolve_endpoint)
                   if u.touches_device]
            t1 = time.perf_counter()
            wg.apply(ifname, updates=ups)
            t2 = time.perf_counter()
            assert len(ups) == 1
            whole.append(t2 - t0)
            apply_only.append(t2 - t1)
            t = time.perf_counter()
            subprocess.run(["wg", "setconf", ifname, conf.name], check=True)
            setconf.append(time.perf_counter() - t)
        os.unlink(conf.name)
    finally:
        lab.close()
    w, a, s = (statistics.median(x) * 1000 for x in (whole, apply_only, setconf))
    table(f"One changed peer among {n:,} (median of {reps})",
          ["peers", "wg setconf ms", "read+diff+apply ms", "ratio", "apply only ms", "ratio",
           "target"],
          [(n, f"{s:.1f}", f"{w:.1f}", f"{w / s:.1%}", f"{a:.2f}", f"{a / s:.2%}", "<= 1%")])


if __name__ == "__main__":
    main()
