#!/usr/bin/env python3
"""Benchmark 12: the unchanged sync through every door users take, beside
innernet 1.5.5 in the same run.

In network namespaces (root), for each size: a server (ours) whose network
has N peers in the clients' CIDR, and two clients that joined it and hold all
N peers on their wireguard-go devices: one of ours and one of innernet
1.5.5's (the real binary). Every command runs as cron or a timer runs it,
`ip netns exec NS COMMAND` with Debian's python3 first on PATH, timed from
outside (wall; GNU time for peak RSS; user + system CPU from the kernel); median of the runs after one that
settles (and, for ours, leaves the record the fast path reads), each run of
ours followed by one of innernet's and one of the bare interpreter, so that
every cell's figures come from the same minutes (the machine is shared).

Doors, each with `fetch IFACE` and `up IFACE`, bare and with the global
`--backend userspace` (as innernet's users write it without the kernel
module):

* `./innernet.pyz ...`: the archive started as a program (its shell preamble);
* the Debian package's /usr/bin/innernet: the launcher build_zipapp.py
  writes, with the modules byte-compiled beside it (in a temporary directory
  instead of /usr/share/innernet; nothing is installed);
* innernet 1.5.5: `innernet --backend userspace fetch|up IFACE` (it has no
  other way on wireguard-go).

The baseline is innernet's figure in the same run; the bare interpreter
(`python3 -S -I -c pass`) is shown as the floor. How many of our runs the fast
path answered is counted (a full sync rewrites `<iface>.fetch`).

    python3 bench/cron_path.py [--quick] [--sizes N,N]     (as root; INNERNET_REFERENCE_DIR
                                                 or ../shared/reference/innernet-1.5.5)

INNERNET_PYZ_BEFORE=OLD.pyz adds the rows of an older build (its own door,
the same commands) to the same run: a change's before and after.
"""
import os
import statistics
import sys
import tempfile
import time

from common import ROOT, quick, synthetic_server, table
from lab import Lab, debian_launcher, start_serve, wait_for

import build_zipapp
import innernet

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BARE = ["/usr/bin/python3", "-S", "-I"]


def reference_dir():
    d = os.environ.get("INNERNET_REFERENCE_DIR") or \
        os.path.join(os.path.dirname(ROOT), "shared", "reference", "innernet-1.5.5")
    if not os.access(os.path.join(d, "innernet"), os.X_OK):
        sys.exit(f"cron_path: innernet 1.5.5 is not at {d} (set INNERNET_REFERENCE_DIR)")
    return d


def timed(argv):
    """(wall ms, peak RSS MiB, CPU ms) of one run. GNU time reports the peak
    RSS (it forks from its own small image: a child of this large process
    would inherit its high-water mark); its CPU figures are in 10 ms steps,
    so the CPU time (user + system, GNU time's own 0.3 ms included) is read
    from the kernel's accounting of it and its child, in microseconds."""
    r, w = os.pipe()
    t = time.perf_counter()
    pid = os.posix_spawn("/usr/bin/time", ["/usr/bin/time", "-f", "maxrss=%M"] + argv,
                         os.environ, file_actions=[
                             (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
                             (os.POSIX_SPAWN_DUP2, w, 2)])
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t
    if status:
        raise AssertionError(f"{argv} failed: {err}")
    rss = int(err.strip().splitlines()[-1].split("=")[1])
    return wall * 1000, rss / 1024, (usage.ru_utime + usage.ru_stime) * 1000


def measure_door(argv, runs, record, others):
    """For our command line ``argv`` and, run in turn with it (the machine is
    shared: a busy moment falls on both), each of ``others`` (innernet's
    command, the bare interpreter): (median wall ms, median peak RSS MiB, max
    RSS, runs the fast path answered, median CPU ms), ours first. The fast path's record is
    per interface, so our doors cannot take turns with each other."""
    def stamp():
        if not os.path.exists(record):
            return None
        st = os.stat(record)
        return st.st_ino, st.st_mtime_ns
    timed(argv)                                      # settles; leaves the record
    samples = [([], [], []) for _ in range(1 + len(others))]
    fast = 0
    for _ in range(runs):
        before = stamp()
        for (walls, rss, cpus), cmd in zip(samples, [argv] + others):
            w, r, c = timed(cmd)
            walls.append(w)
            rss.append(r)
            cpus.append(c)
        fast += before is not None and stamp() == before
    return [(statistics.median(w), statistics.median(r), max(r), fast, statistics.median(c))
            for w, r, c in samples]


def measure(n, runs, ref, pyz, launcher, before=None):
    lab = Lab(innernet_cmd=BARE + [pyz])
    rows = []
    name_file = None
    try:
        srv, net, _ = synthetic_server(lab, n)
        start_serve(srv, net)
        srv.server("add-peer", net, "--name", "inn", "--cidr", "peers", "--admin", "false",
                   "--auto-ip", "--save-config", srv.path("r.toml"), "--invite-expires", "1h",
                   "--yes")
        with open(srv.path("r.toml")) as f:
            invite_key = innernet.public_key(
                innernet.InterfaceConfig.from_toml(f.read(), "r.toml").private_key)
        # innernet's install redeems at once: the server must have put the
        # invitation's key on its device first (serve does within a second)
        wait_for(lambda: any(p.public_key == invite_key for p in
                             innernet.UserspaceBackend().get(net).peers), 30,
                 "the invitation's key on the server's device")
        ours, theirs = lab.add_host("ours"), lab.add_host("theirs")
        oif, rif = lab.ifname("o"), lab.ifname("r")
        ours.innernet("install", "--name", oif, "--no-write-hosts", srv.path("c.toml"),
                      timeout=600)
        rbase = [os.path.join(ref, "innernet"), "--backend", "userspace",
                 "-c", theirs.path("etc"), "-d", theirs.path("lib")]
        theirs.exec(rbase + ["install", "--name", rif, "--no-write-hosts", "--delete-invite",
                             srv.path("r.toml")], timeout=600)
        # innernet 1.5.5's fetch finds a userspace device by this file, which
        # wireguard-go on Linux does not write (its `up` needs no such file).
        name_file = f"/var/run/wireguard/{rif}.name"
        with open(name_file, "w") as f:
            f.write(rif + "\n")
        wait_for(lambda: len(innernet.UserspaceBackend().get(oif).peers) >= n, 120,
                 "every peer on our device")
        env = ["env", f"PATH={PATH}"]
        ns_ours = ["ip", "netns", "exec", ours.ns] + env
        ns_theirs = ["ip", "netns", "exec", theirs.ns] + env
        dirs = ["-c", ours.path("client", "etc"), "-d", ours.path("client", "lib")]
        record = ours.path("client", "lib", f"{oif}.fetch")
        bare = ns_ours + BARE + ["-c", "pass"]
        for verb in ("fetch", "up"):
            # --no-nat-traversal: innernet tries every peer without a
            # handshake again at each run, 5 s a step (these peers are
            # synthetic and never answer); ours does that on its own schedule
            inn = ns_theirs + rbase + [verb, rif, "--no-write-hosts", "--no-nat-traversal"]
            timed(inn)                                               # settles
            doors = [("innernet.pyz", [pyz]), (".deb launcher", [launcher])]
            if before:
                doors.append(("innernet.pyz, before", [before]))
            for door, prog in doors:
                for backend in ((), ("--backend", "userspace")):
                    argv = ns_ours + prog + dirs + list(backend) + [verb, oif,
                                                                    "--no-write-hosts"]
                    rows.append((n, verb, door, " ".join(backend) or "(bare)",
                                 *measure_door(argv, runs, record, [inn, bare])))
    finally:
        if name_file and os.path.exists(name_file):
            os.unlink(name_file)
        lab.close()
    return rows


def main():
    ref = reference_dir()
    load = os.getloadavg()
    print(f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    sizes = [100, 300] if quick() else [100, 1000, 5000]
    if "--sizes" in sys.argv:                           # e.g. --sizes 100,1000
        sizes = [int(n) for n in sys.argv[sys.argv.index("--sizes") + 1].split(",")]
    runs = 3 if quick() else 7
    with tempfile.TemporaryDirectory() as tmp:
        pyz = os.environ.get("INNERNET_PYZ")
        if not pyz:
            pyz = os.path.join(tmp, "innernet.pyz")
            build_zipapp.build(pyz)
        launcher = debian_launcher(tmp)
        rows = []
        for n in sizes:
            rows += measure(n, runs, ref, pyz, launcher, os.environ.get("INNERNET_PYZ_BEFORE"))
    out = []
    for n, verb, door, backend, ours, inn, bare in rows:
        (w, m, mmax, fast, c), (iw, im, _, _, ic), (bw, bm, _, _, bc) = ours, inn, bare
        out.append((f"{n:,}", verb, door, backend, f"{w:.1f} / {c:.1f}",
                    f"{m:.2f} ({mmax:.2f})", f"{fast} of {runs}",
                    f"{iw:.1f} / {ic:.1f} / {im:.2f}", f"{w / iw:.2f} / {c / ic:.2f}",
                    f"{bw:.1f} / {bc:.1f} / {bm:.2f}"))
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    table(f"Unchanged sync through each door, beside innernet 1.5.5 (median of {runs}; "
          "wall ms, CPU ms (user + system), peak RSS MiB)",
          ["peers", "verb", "door", "backend", "ours wall / CPU", "ours MiB (max)", "fast path",
           "innernet 1.5.5 wall / CPU / MiB", "ratio ours / innernet: wall, CPU",
           "python3 -S -I wall / CPU / MiB"], out)


if __name__ == "__main__":
    main()
