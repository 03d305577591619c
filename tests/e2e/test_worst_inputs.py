"""Every verb with its worst inputs (issue 19, acceptance 2).

Empty strings, read-only and full directories, a second instance, an
unprivileged user: each run must exit non-zero with one `error:` line (and at
most one `hint:` line) on stderr, no traceback, and leave nothing half written:
the server's database rows and the client's and server's files are compared
before and after, and a directory a command could not write is listed from
inside the command's own mount namespace to show it holds no stray file.

Read-only and full directories are mounts made inside `ip netns exec`, which
gives each command a mount namespace of its own: nothing is mounted on the host.
"""
import hashlib
import os
import shlex
import sqlite3

import pytest

from lab import invite, wait_for

from .conftest import network_world

pytestmark = pytest.mark.netns

SHELL_HELPERS = r"""
set -e
ro() { mount --bind "$1" "$1"; mount -o remount,bind,ro "$1"; }
full() {
  s=$(mktemp -d); cp -a "$1"/. "$s"/
  mount -t tmpfs -o size=256k,mode=0700 tmpfs "$1"; cp -a "$s"/. "$1"/; rm -rf "$s"
  cat /dev/zero > "$1/.fill" 2>/dev/null || true
}
"""



@pytest.fixture(scope="module")
def world(pyz):
    with network_world(pyz, {"humans": "10.66.1.0/24"}) as w:
        w.cli = w.lab.add_host("cli")
        w.iface = w.lab.ifname("cli")
        w.cli.innernet("install", "--name", w.iface, "--no-write-hosts",
                       invite(w.srv, w.net, "cli", "humans", admin="true"))
        for d in ("ro-out", "full-out"):
            os.makedirs(w.cli.path(d))
            os.makedirs(w.srv.path(d))
        yield w


def db_rows(w):
    conn = sqlite3.connect(w.db, timeout=15)
    try:
        return (conn.execute("SELECT id, name, ip, cidr_id, public_key, is_admin, is_disabled, "
                             "is_redeemed FROM peers ORDER BY id").fetchall(),
                conn.execute("SELECT * FROM cidrs ORDER BY id").fetchall(),
                conn.execute("SELECT * FROM associations ORDER BY id").fetchall())
    finally:
        conn.close()


def files(w):
    """Every file under the lab hosts' config and data dirs: name, mode and content hash."""
    out = {}
    for host in (w.srv, w.cli):
        for root, _, names in os.walk(host.dir):
            for n in names:
                p = os.path.join(root, n)
                if n.endswith((".log", "-journal", "-wal", "-shm")) or n == "hosts":
                    continue
                if p.endswith(".db"):
                    continue                  # compared by rows: serve updates candidates
                st = os.stat(p)
                with open(p, "rb") as f:
                    out[p] = (oct(st.st_mode), hashlib.sha256(f.read()).hexdigest())
    return out


def run_case(w, host, argv, *, mounts=(), user=None):
    """argv in ``host``'s namespace, with ``mounts`` [(ro|full, dir)] applied first.

    Returns (proc, listing of each mounted dir taken inside the command's namespace)."""
    script = SHELL_HELPERS
    for kind, d in mounts:
        script += f"{kind} {shlex.quote(d)}\n"
    if user:
        argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups"] + list(argv)
    script += "set +e\n" + shlex.join(argv) + "\nrc=$?\n"
    for _, d in mounts:
        script += f"echo '@@ {d}'; ls -A {shlex.quote(d)}\n"
    script += "exit $rc\n"
    proc = host.exec(["sh", "-c", script], check=False, timeout=90)
    listing, cur = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("@@ "):
            cur = line[3:]
            listing[cur] = []
        elif cur is not None:
            listing[cur].append(line)
    return proc, listing


def assert_one_error(proc, prog):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 2:                      # argparse: usage, then its error
        assert lines[-1].startswith(f"{prog}: error:"), proc.stderr
        return lines[-1]
    errors = [line for line in lines if line.startswith(f"{prog}: error:")]
    hints = [line for line in lines if line.startswith("hint:")]
    assert len(errors) == 1 and len(hints) <= 1 and len(lines) == len(errors) + len(hints), \
        proc.stderr
    return errors[0]


def client_cases(w):
    c, n = w.cli, w.iface
    etc, lib = c.path("client", "etc"), c.path("client", "lib")
    ro_out, full_out = c.path("ro-out"), c.path("full-out")
    inv = invite(w.srv, w.net, "spare", "humans")
    peer = ["--cidr", "humans", "--auto-ip", "--admin", "false", "--invite-expires", "1h",
            "--yes"]
    return [
        ("install ''", ["install", ""], (), "does not exist"),
        ("install --name ''", ["install", "--name", "", inv], (), "invalid interface name"),
        # --no-routing: this host's interface already routes the network's range,
        # which install refuses first (issue 29 item 8); the files are the point here
        ("install, config dir read-only", ["--no-routing", "install", "--name",
                                           w.lab.ifname("sp"), inv], [("ro", etc)], "read-only"),
        ("install, data dir full", ["--no-routing", "install", "--name", w.lab.ifname("sp"),
                                    inv], [("full", lib)], "No space left"),
        ("add-peer --name ''", ["add-peer", n, "--name", "", "--save-config",
                                c.path("x.toml")] + peer, (), "invalid peer name"),
        ("add-peer --cidr ''", ["add-peer", n, "--name", "x", "--cidr", "", "--auto-ip",
                                "--admin", "false", "--save-config", c.path("x.toml"),
                                "--yes"], (), "does not exist"),
        ("add-peer --save-config ''", ["add-peer", n, "--name", "x", "--save-config", ""] + peer,
         (), "empty string"),
        ("add-peer into a read-only dir", ["add-peer", n, "--name", "x", "--save-config",
                                           os.path.join(ro_out, "x.toml")] + peer,
         [("ro", ro_out)], "read-only"),
        ("add-peer into a full dir", ["add-peer", n, "--name", "x", "--save-config",
                                      os.path.join(full_out, "x.toml")] + peer,
         [("full", full_out)], "No space left"),
        ("add-cidr --name ''", ["add-cidr", n, "--name", "", "--cidr", "10.66.9.0/24",
                                "--parent", w.net, "--yes"], (), "invalid CIDR name"),
        ("add-cidr --cidr ''", ["add-cidr", n, "--name", "x", "--cidr", "", "--parent", w.net,
                                "--yes"], (), "invalid CIDR"),
        ("add-association '' humans", ["add-association", n, "", "humans", "--yes"], (),
         "does not exist"),
        ("add-association humans humans", ["add-association", n, "humans", "humans", "--yes"],
         (), "cannot be associated with itself"),
        ("delete-association '' ''", ["delete-association", n, "", "", "--yes"], (),
         "does not exist"),
        ("rename-peer --name ''", ["rename-peer", n, "--name", "", "--new-name", "x", "--yes"],
         (), "does not exist"),
        ("rename-peer --new-name ''", ["rename-peer", n, "--name", "cli", "--new-name", "",
                                       "--yes"], (), "invalid peer name"),
        ("rename-cidr --new-name ''", ["rename-cidr", n, "--name", "humans", "--new-name", "",
                                       "--yes"], (), "invalid CIDR name"),
        ("disable-peer --name ''", ["disable-peer", n, "--name", "", "--yes"], (),
         "does not exist"),
        ("enable-peer --name ''", ["enable-peer", n, "--name", "", "--yes"], (),
         "does not exist"),
        ("delete-cidr --name ''", ["delete-cidr", n, "--name", "", "--yes"], (),
         "does not exist"),
        ("set-listen-port ''", ["set-listen-port", n, "--listen-port", "", "--yes"], (),
         "invalid port"),
        ("set-listen-port, config dir read-only", ["set-listen-port", n, "--listen-port",
                                                   "51999", "--yes"], [("ro", etc)],
         "read-only"),
        ("override-endpoint ''", ["override-endpoint", n, "--endpoint", "", "--yes"], (),
         "invalid endpoint"),
        ("override-peer-endpoint --name ''", ["override-peer-endpoint", n, "--name", "",
                                              "--endpoint", "1.2.3.4:5", "--yes"], (),
         "does not exist"),
        ("override-peer-endpoint, config dir full", ["override-peer-endpoint", n, "--name",
                                                     "innernet-server", "--endpoint",
                                                     "1.2.3.4:5", "--yes"], [("full", etc)],
         "No space left"),
        ("fetch ''", ["fetch", ""], (), "invalid interface name"),
        ("up ''", ["up", ""], (), "invalid interface name"),
        ("down ''", ["down", ""], (), "invalid interface name"),
        ("show ''", ["show", ""], (), "invalid interface name"),
        ("show nosuch", ["show", "nosuch"], (), "is installed"),
        ("list-cidrs ''", ["list-cidrs", ""], (), "invalid interface name"),
        ("list-associations ''", ["list-associations", ""], (), "invalid interface name"),
        ("uninstall, config dir read-only", ["uninstall", n, "--yes"], [("ro", etc)],
         "read-only"),
        ("uninstall ''", ["uninstall", "", "--yes"], (), "invalid interface name"),
    ]


def walk(world, host, cases, server=False):
    """Run each case; one error line, the expected words, nothing changed."""
    for what, args, mounts, expected in cases:
        before_db, before_files = db_rows(world), files(world)
        mounted = {d: sorted(os.listdir(d)) for _, d in mounts}
        proc, listing = run_case(world, host, host.innernet_argv(*args, server=server),
                                 mounts=mounts)
        line = assert_one_error(proc, "innernet")
        assert expected.lower() in line.lower(), (what, line)
        assert db_rows(world) == before_db, what
        assert files(world) == before_files, what
        for d, names in listing.items():
            assert sorted(set(names) - {".fill"}) == mounted[d], (what, d, names)
    return len(cases)


def test_every_client_verb_with_its_worst_inputs(world, counts):
    checked = walk(world, world.cli, client_cases(world))
    # the interface survived all of it
    assert world.cli.innernet("fetch", world.iface, "--no-write-hosts").returncode == 0
    counts["worst-input runs of client verbs (one line, nothing changed)"] = checked


def test_a_second_daemon_on_the_same_interface_says_who_holds_it(world):
    c = world.cli
    first = c.spawn_innernet("daemon.log", "up", world.iface, "--daemon", "--no-write-hosts")
    try:
        lock = c.path("client", "lib", f"{world.iface}.lock")
        wait_for(lambda: os.path.exists(lock) and open(lock).read().strip(), 20, "the lock")
        proc = c.innernet("up", world.iface, "--daemon", "--no-write-hosts", check=False)
        line = assert_one_error(proc, "innernet")
        assert "already running" in line and open(lock).read().strip() in line
    finally:
        first.terminate()
        first.wait(timeout=20)


def test_an_unprivileged_user_is_told_permission_denied(world):
    c = world.cli
    # /usr/bin/python3 with the source module: nobody can read neither the lab's
    # directories (0700) nor the .pyz under pytest's 0700 temporary directory.
    from lab import ROOT
    base = ["/usr/bin/python3", os.path.join(ROOT, "innernet.py"), "-c", c.path("client", "etc"),
            "-d", c.path("client", "lib")]
    for args in (["fetch", world.iface], ["show", world.iface], ["list-cidrs", world.iface],
                 ["fetch"]):
        proc, _ = run_case(world, c, base + args, user="nobody")
        line = assert_one_error(proc, "innernet")
        assert "permission denied" in line, (args, line)
        assert "not installed" not in line and "no networks" not in line


def server_cases(w):
    s, n = w.srv, w.net
    etc, lib = s.path("server", "etc"), s.path("server", "lib")
    new = ["new", "--network-name", w.lab.ifname("x"), "--network-cidr", "10.67.0.0/16",
           "--external-endpoint", "198.18.0.9:51821", "--listen-port", "51821"]
    peer = ["--cidr", "humans", "--auto-ip", "--admin", "false", "--invite-expires", "1h",
            "--yes"]
    return [
        ("new --network-name ''", ["new", "--network-name", "", "--network-cidr",
                                   "10.67.0.0/16", "--external-endpoint", "198.18.0.9:51821",
                                   "--listen-port", "51821"], (), "invalid interface name"),
        ("new, config dir read-only", new, [("ro", etc)], "read-only"),
        ("new, data dir full", new, [("full", lib)], "disk is full"),
        ("serve, a second instance", ["serve", n, "--no-write-hosts"], (), "already running"),
        ("add-cidr, data dir read-only", ["add-cidr", n, "--name", "x", "--cidr",
                                          "10.66.9.0/24", "--parent", n, "--yes"],
         [("ro", lib)], "read-only"),
        ("add-cidr, data dir full", ["add-cidr", n, "--name", "x" * 60, "--cidr",
                                     "10.66.9.0/24", "--parent", n, "--yes"],
         [("full", lib)], "disk is full"),
        ("add-peer --save-config ''", ["add-peer", n, "--name", "x", "--save-config", ""] + peer,
         (), "empty string"),
        ("add-peer into a read-only dir", ["add-peer", n, "--name", "x", "--save-config",
                                           os.path.join(s.path("ro-out"), "x.toml")] + peer,
         [("ro", s.path("ro-out"))], "read-only"),
        ("add-peer, data dir read-only", ["add-peer", n, "--name", "x", "--save-config",
                                          s.path("x.toml")] + peer, [("ro", lib)], "read-only"),
        ("add-peer --cidr naming the root", ["add-peer", n, "--name", "x", "--cidr", n,
                                             "--auto-ip", "--admin", "false", "--save-config",
                                             s.path("x.toml"), "--yes"], (), "not eligible"),
        ("add-peer --cidr naming the server's", ["add-peer", n, "--name", "x", "--cidr",
                                                 "innernet-server", "--auto-ip", "--admin",
                                                 "false", "--save-config", s.path("x.toml"),
                                                 "--yes"], (), "not eligible"),
        ("add-peer --invite-expires 0s", ["add-peer", n, "--name", "x", "--cidr", "humans",
                                          "--auto-ip", "--admin", "false", "--save-config",
                                          s.path("x.toml"), "--invite-expires", "0s", "--yes"],
         (), "at least 1 s"),
        ("list-cidrs ''", ["list-cidrs", ""], (), "invalid interface name"),
        ("uninstall, data dir read-only", ["uninstall", n, "--yes"], [("ro", lib)],
         "read-only"),
        ("serve --host-suffix 'bad suffix!'", ["serve", n, "--host-suffix", "bad suffix!"], (),
         "invalid host suffix"),
    ]


def test_every_server_verb_with_its_worst_inputs(world, counts):
    checked = walk(world, world.srv, server_cases(world), server=True)
    assert world.serve.poll() is None                   # the first serve kept serving
    assert world.cli.innernet("fetch", world.iface, "--no-write-hosts").returncode == 0
    counts["worst-input runs of server verbs (one line, nothing changed)"] = checked
