"""The outside review's end-to-end findings (issue 10: 1, 2, 3, 5, 6, 7) and new
users' mistakes (issue 19: 1, 2, 6, 7), over real WireGuard in namespaces, with
the built innernet.pyz. Each test failed on the code before its fix.
"""
import base64
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys

import pytest

from lab import (ROOT, Lab, db_write, device, device_peer_ips, invite, start_network, start_serve,
                 wait_for)

from .conftest import BARE, network_world

pytestmark = pytest.mark.netns

HTTP = r"""
import json, socket, sys
host, port, method, path, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
body = b"" if sys.argv[6] == "-" else sys.argv[6].encode()
proof = ""
if len(sys.argv) > 7 and path.startswith("/v1/admin/"):   # root with the peer's config
    sys.path.insert(0, sys.argv[8])
    import innernet
    cfg = innernet.InterfaceConfig.from_toml(open(sys.argv[7]).read(), sys.argv[7])
    mac = innernet.admin_proof_key(innernet.shared_secret(cfg.private_key, key))
    proof = f"X-Innernet-Admin-Proof: {innernet.admin_proof(mac, method, path, body)}\r\n"
s = socket.create_connection((host, port), timeout=5)
s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nX-Innernet-Server-Key: {key}\r\n"
          f"{proof}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
          + body)
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
head, _, rest = data.partition(b"\r\n\r\n")
print(json.dumps({"status": int(head.split()[1]), "body": rest.decode(errors="replace")}))
"""



def server_key(w):
    sys.path.insert(0, ROOT)
    import innernet
    conf = w.srv.path("server", "etc", f"{w.net}.conf")
    return innernet.public_key(innernet.ServerConfig.from_toml(open(conf).read(), conf).private_key)


def http(host, method, path, body=None, *, key, as_user=None, target="10.66.0.1"):
    argv = [sys.executable, "-c", HTTP, target, "51820", method, path, key,
            "-" if body is None else json.dumps(body)]
    config = host.path("client", "etc", f"{host.lab.ifname(host.name)}.conf")
    if as_user:
        argv = ["setpriv", f"--reuid={as_user}", "--regid=nogroup", "--clear-groups",
                "/usr/bin/python3"] + argv[1:]
    elif os.path.exists(config):      # root on a peer's host: proves as our client does
        argv += [config, ROOT]
    out = host.exec(argv, timeout=30)
    return json.loads(out.stdout)


def rows(w, sql, args=()):
    conn = sqlite3.connect(w.db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def join(w, name, cidr="humans", admin="false"):
    host = w.lab.add_host(name)
    host.innernet("install", "--name", w.lab.ifname(name), "--no-write-hosts",
                  invite(w.srv, w.net, name, cidr, admin=admin))
    w.hosts[name] = host
    return host


FAKE_NFT = """#!/bin/sh
# nft, except that it fails while the marker file exists (tests/e2e/test_hardening.py)
if [ -e {marker} ]; then echo "Error: injected failure for the test" >&2; exit 1; fi
exec {nft} "$@"
"""


@pytest.fixture(scope="module")
def world(pyz):
    with network_world(pyz, {"humans": "10.66.1.0/24"}, serve=False) as w:
        # serve runs with an nft that can be made to fail (a marker file)
        fakebin = w.srv.path("fakebin")
        os.makedirs(fakebin)
        w.marker = w.srv.path("nft-fails")
        nft = subprocess.run(["sh", "-c", "command -v nft"], capture_output=True,
                             text=True).stdout.strip() or "/usr/sbin/nft"
        with open(os.path.join(fakebin, "nft"), "w") as f:
            f.write(FAKE_NFT.format(marker=shlex.quote(w.marker), nft=nft))
        os.chmod(os.path.join(fakebin, "nft"), 0o755)
        w.serve = w.srv.spawn(["env", f"PATH={fakebin}:{os.environ.get('PATH', '')}"]
                              + w.srv.innernet_argv("serve", w.net, "--no-write-hosts",
                                                    server=True), "serve.log")
        wait_for(lambda: "serving network" in w.srv.log("serve.log"), 30, "serve")
        w.key = server_key(w)
        for name, admin in (("admin", "true"), ("alice", "false"), ("bob", "false")):
            join(w, name, admin=admin)
        yield w


def table(w):
    table = "innernet_" + w.net.replace("-", "_")
    return w.srv.exec(["nft", "list", "table", "inet", table], check=False).stdout


def forwarding(w):
    return w.srv.exec(["cat", f"/proc/sys/net/ipv4/conf/{w.net}/forwarding"]).stdout.strip()


# -- 10.1: local processes on the server host are not admins --------------------------------

@pytest.mark.parametrize("user", [None, "nobody"])
def test_a_local_process_on_the_server_host_is_not_an_admin(world, user):
    body = {"name": "evil-admin", "ip": "10.66.1.200", "cidr_id": 3, "endpoint": None,
            "public_key": "IIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIII=",
            "persistent_keepalive_interval": None, "is_admin": True, "is_disabled": False,
            "is_redeemed": True, "invite_expires": None, "candidates": []}
    answer = http(world.srv, "POST", "/v1/admin/peers", body, key=world.key, as_user=user)
    assert answer["status"] == 401 and "local processes" in answer["body"]
    assert http(world.srv, "GET", "/v1/admin/peers", key=world.key, as_user=user)["status"] == 401
    assert rows(world, "SELECT name FROM peers WHERE name = 'evil-admin'") == []
    # the real admin, through its tunnel, still is one
    assert http(world.hosts["admin"], "GET", "/v1/admin/peers", key=world.key)["status"] == 200


# -- 10.5: the server's own endpoint and CIDR are not the API's to change ----------------------

def test_an_admin_cannot_point_the_servers_endpoint_elsewhere(world):
    before = rows(world, "SELECT * FROM peers WHERE id = 1")
    (server,) = [p for p in json.loads(http(world.hosts["admin"], "GET", "/v1/admin/peers",
                                            key=world.key)["body"]) if p["id"] == 1]
    body = {k: v for k, v in server.items() if k != "id"}
    body["endpoint"] = "203.0.113.66:51820"
    answer = http(world.hosts["admin"], "PUT", "/v1/admin/peers/1", body, key=world.key)
    assert answer["status"] == 400 and "endpoint" in answer["body"]
    answer = http(world.hosts["admin"], "PUT", "/v1/admin/cidrs/2",
                  {"name": "renamed", "cidr": "10.66.0.1/32", "parent": 1}, key=world.key)
    assert answer["status"] == 400
    assert rows(world, "SELECT * FROM peers WHERE id = 1") == before


# -- 10.2: the relay firewall with nested CIDRs --------------------------------------------------

def test_nested_cidrs_and_associations_keep_the_relay_table(world):
    srv, net = world.srv, world.net
    srv.server("add-cidr", net, "--name", "eng", "--cidr", "10.66.4.0/22", "--parent", net,
               "--yes")
    srv.server("add-cidr", net, "--name", "eng-a", "--cidr", "10.66.4.0/24", "--parent", "eng",
               "--yes")
    admin = world.hosts["admin"]
    admin.innernet("add-association", world.lab.ifname("admin"), "humans", "eng", "--yes")
    wait_for(lambda: "10.66.1.0/24 . 10.66.4.0/22" in table(world), 15, "the relay pair")
    assert forwarding(world) == "1"
    # an admin write that syncs the device answers success (it was 400 before)
    path = admin.path("eve.toml")
    admin.innernet("add-peer", world.lab.ifname("admin"), "--name", "eve", "--cidr", "eng-a",
                   "--auto-ip", "--admin", "false", "--save-config", path, "--invite-expires", "1h",
                   "--yes")
    assert os.path.exists(path)
    assert "relay rules not updated" not in srv.log("serve.log")
    # a peer in a CIDR with children (the root) is refused, not stored
    body = {"name": "rooted", "ip": "10.66.200.2", "cidr_id": 1, "endpoint": None,
            "public_key": "JJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJJ=",
            "persistent_keepalive_interval": None, "is_admin": False, "is_disabled": False,
            "is_redeemed": False, "invite_expires": None, "candidates": []}
    answer = http(admin, "POST", "/v1/admin/peers", body, key=world.key)
    assert answer["status"] == 400 and "child CIDRs" in answer["body"]


def test_a_relay_rule_failure_is_not_a_failed_write_and_is_repaired(world):
    srv, net, admin = world.srv, world.net, world.hosts["admin"]
    srv.server("add-cidr", net, "--name", "ops", "--cidr", "10.66.8.0/24", "--parent", net,
               "--yes")
    open(world.marker, "w").close()
    try:
        # committed, so it succeeds; the relay is switched off rather than left stale
        admin.innernet("add-association", world.lab.ifname("admin"), "humans", "ops", "--yes")
        assert rows(world, "SELECT COUNT(*) FROM associations WHERE cidr_id_2 = "
                           "(SELECT id FROM cidrs WHERE name = 'ops')") == [(1,)]
        wait_for(lambda: "relay rules not updated" in srv.log("serve.log"), 15, "the warning")
        wait_for(lambda: forwarding(world) == "0", 15, "forwarding off while rules are stale")
    finally:
        os.unlink(world.marker)
    wait_for(lambda: "10.66.1.0/24 . 10.66.8.0/24" in table(world), 15, "the repaired table")
    wait_for(lambda: forwarding(world) == "1", 15, "forwarding back on")
    assert "in sync again" in srv.log("serve.log")
    assert "Traceback" not in srv.log("serve.log")


# -- 10.3: pinning survives a compromised server's two-step move ---------------------------------

def test_moving_a_pinned_peer_away_does_not_free_its_address(world):
    alice = world.hosts["alice"]
    a_if = world.lab.ifname("alice")
    (bob_ip, bob_key), = rows(world, "SELECT ip, public_key FROM peers WHERE name = 'bob'")
    alice.innernet("fetch", a_if, "--no-write-hosts")
    assert bob_ip in device_peer_ips(alice, a_if)
    def fetched_and_routes(ip):
        alice.innernet("fetch", a_if, "--no-write-hosts")
        return ip in device_peer_ips(alice, a_if)

    def refused():
        proc = alice.innernet("fetch", a_if, "--no-write-hosts", check=False)
        return proc if "PINNING" in proc.stderr else None

    db_write(world.db, "UPDATE peers SET ip = '10.66.1.150' WHERE name = 'bob'")
    try:
        wait_for(lambda: fetched_and_routes("10.66.1.150"), 20, "alice to follow the move")
        sys.path.insert(0, ROOT)
        import innernet
        mallory = innernet.public_key(innernet.generate_private_key())
        db_write(world.db, "INSERT INTO peers (name, ip, cidr_id, public_key, is_admin, is_disabled,"
                        " is_redeemed, candidates) VALUES ('mallory', ?, 3, ?, 0, 0, 1, '[]')",
                 (bob_ip, mallory))
        out = wait_for(refused, 20, "the refusal")
        assert out.returncode == 1 and out.stderr.count("PINNING ERROR") == 1
        peers = device(alice, a_if)["peers"]
        assert not any(p["public_key"] == mallory for p in peers)
        assert not any(f"{bob_ip}/32" in p["allowed_ips"] and p["public_key"] != bob_key
                       for p in peers)
    finally:
        db_write(world.db, "DELETE FROM peers WHERE name = 'mallory'")
        db_write(world.db, "UPDATE peers SET ip = ? WHERE name = 'bob'", (bob_ip,))
    wait_for(lambda: fetched_and_routes(bob_ip), 20, "bob back where he was")


# -- 10.6 and 19.2: a config directory that cannot take the file burns nothing ------------------

def install_in(host, w, inv, mount_opts, fill=False):
    """`install` with its config directory a tmpfs mounted with ``mount_opts``
    (private to this command: `ip netns exec` has its own mount namespace)."""
    etc = host.path("client", "etc")
    os.makedirs(etc, exist_ok=True)
    argv = host.innernet_argv("install", "--name", w.lab.ifname(host.name), "--no-write-hosts",
                              inv)
    script = f"mount -t tmpfs -o {mount_opts} tmpfs {shlex.quote(etc)} && "
    if fill:
        script += f"(cat /dev/zero > {shlex.quote(etc)}/fill 2>/dev/null; true) && "
    script += "exec " + shlex.join(argv)
    return host.exec(["sh", "-c", script], check=False, timeout=60)


def one_error(proc, prog="innernet"):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Error:" not in proc.stdout
    return errors[0]


@pytest.mark.parametrize("case", ["full", "read-only"])
def test_install_into_a_full_or_read_only_config_dir_keeps_the_invitation(world, case):
    name = "carol" if case == "full" else "dan"
    inv = invite(world.srv, world.net, name, "humans")
    host = world.lab.add_host(name)
    proc = install_in(host, world, inv, "size=4k" if case == "full" else "ro", fill=case == "full")
    line = one_error(proc)
    assert ("No space left" in line) if case == "full" else ("read-only" in line.lower()
                                                             or "Read-only" in line)
    assert rows(world, "SELECT is_redeemed FROM peers WHERE name = ?", (name,)) == [(0,)]
    ifname = world.lab.ifname(name)
    assert not os.path.exists(f"/var/run/wireguard/{ifname}.sock")   # nothing left running
    host.innernet("install", "--name", ifname, "--no-write-hosts", inv)   # the retry works
    assert rows(world, "SELECT is_redeemed FROM peers WHERE name = ?", (name,)) == [(1,)]
    world.hosts[name] = host


# -- 19.1: the interface outlives the terminal that started it -----------------------------------

def under_closed_pty(host, argv):
    """Run argv in the host's namespace under `script`: a pseudo-terminal that is
    closed (hung up) when the command ends."""
    cmd = shlex.join(["ip", "netns", "exec", host.ns] + list(argv))
    return subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_up_and_install_under_a_terminal_that_closes(world):
    bob = world.hosts["bob"]
    b_if = world.lab.ifname("bob")
    bob.innernet("down", b_if)
    proc = under_closed_pty(bob, bob.innernet_argv("up", b_if, "--no-write-hosts"))
    assert proc.returncode == 0, proc.stdout
    assert device(bob, b_if)["listen_port"]                 # still answering after the hangup
    assert bob.innernet("fetch", b_if, "--no-write-hosts").returncode == 0
    host = world.lab.add_host("erin")
    inv = invite(world.srv, world.net, "erin", "humans")
    proc = under_closed_pty(host, host.innernet_argv("install", "--name", world.lab.ifname("erin"),
                                                     "--no-write-hosts", inv))
    assert proc.returncode == 0, proc.stdout
    assert host.innernet("fetch", world.lab.ifname("erin"), "--no-write-hosts").returncode == 0
    world.hosts["erin"] = host


# -- 19.6 and 19.7: local settings reach the device and the server at once ------------------------

def test_unsetting_a_peer_endpoint_override_reaches_the_device(world):
    alice = world.hosts["alice"]
    a_if = world.lab.ifname("alice")
    bob_key, = rows(world, "SELECT public_key FROM peers WHERE name = 'bob'")[0]
    real = next(p for p in device(alice, a_if)["peers"] if p["public_key"] == bob_key)["endpoint"]
    alice.innernet("override-peer-endpoint", a_if, "--name", "bob", "--endpoint",
                   "198.18.0.250:9", "--yes")
    assert next(p for p in device(alice, a_if)["peers"]
                if p["public_key"] == bob_key)["endpoint"] == "198.18.0.250:9"
    alice.innernet("override-peer-endpoint", a_if, "--name", "bob", "--unset", "--yes")
    now = next(p for p in device(alice, a_if)["peers"] if p["public_key"] == bob_key)["endpoint"]
    assert now != "198.18.0.250:9" and now.split(":")[0] == real.split(":")[0]


def test_a_new_listen_port_is_told_to_the_server_at_once(world):
    alice, bob = world.hosts["alice"], world.hosts["bob"]
    a_if, b_if = world.lab.ifname("alice"), world.lab.ifname("bob")
    alice.innernet("set-listen-port", a_if, "--listen-port", "51999", "--yes")

    def bob_sees_it():
        bob.innernet("fetch", b_if, "--no-write-hosts")
        with open(bob.path("client", "lib", f"{b_if}.json")) as f:
            store = json.load(f)
        alice_peer = next(p for p in store["peers"] if p["name"] == "alice")
        return (alice_peer["endpoint"] or "").endswith(":51999")
    # WireGuard's keepalive would tell the server within 25 s; the verb does at once
    wait_for(bob_sees_it, 4, "bob to learn alice's new port from the server")


# -- 10.1 (last: it stops serve): the relay table goes with the server --------------------------

def test_serve_removes_its_table_and_forwarding_on_exit(world):
    assert "table inet" in table(world) and forwarding(world) == "1"
    world.serve.send_signal(signal.SIGTERM)
    world.serve.wait(timeout=20)
    assert table(world) == "" and forwarding(world) == "0"


# -- 10.7: one peer cannot grow the server's memory ---------------------------------------------

def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


CHURN = r"""
import gzip, http.client, json, sys
key, rounds = sys.argv[1], int(sys.argv[2])
c = http.client.HTTPConnection("10.66.0.1", 51820, timeout=10)
statuses = {}
h = {"X-Innernet-Server-Key": key, "Accept-Encoding": "gzip"}
for i in range(rounds):
    body = json.dumps([f"192.0.2.{i % 250 + 1}:{1000 + i}"]).encode()
    c.request("PUT", "/v1/user/candidates", body=body,
              headers=dict(h, **{"Content-Length": str(len(body))}))
    r = c.getresponse(); r.read()
    statuses[r.status] = statuses.get(r.status, 0) + 1
    c.request("GET", "/v1/user/state", headers=h)
    r = c.getresponse(); r.read()
print(json.dumps(statuses))
"""


def test_candidate_churn_does_not_grow_the_server(pyz):
    lab = Lab(innernet_cmd=BARE + [pyz])
    try:
        srv, net, _ = start_network(lab, {"humans": "10.66.16.0/20"}, serve=False)
        db = srv.path("server", "lib", f"{net}.db")
        # 3,000 redeemed peers in the churning peer's CIDR, as in the finding
        conn = sqlite3.connect(db)
        with conn:
            conn.executemany(
                "INSERT INTO peers (name, ip, cidr_id, public_key, endpoint, is_admin, "
                "is_disabled, is_redeemed, candidates) VALUES (?, ?, 3, ?, ?, 0, 0, 1, '[]')",
                [(f"bulk{i}", f"10.66.{17 + i // 250}.{i % 250 + 2}", base64.b64encode(
                    os.urandom(32)).decode(), f"198.19.{i // 250}.{i % 250 + 1}:51820")
                 for i in range(3000)])
        conn.close()
        serve = start_serve(srv, net)
        host = lab.add_host("churn")
        host.innernet("install", "--name", lab.ifname("churn"), "--no-write-hosts",
                      invite(srv, net, "churn", "humans"))
        key = server_key(type("W", (), {"srv": srv, "net": net})())
        host.python(CHURN, key, 20, timeout=300)          # warm up: caches, the first burst
        before = rss_kb(serve.pid)
        statuses = json.loads(host.python(CHURN, key, 300, timeout=600).stdout)
        after = rss_kb(serve.pid)
        print(f"server RSS {before / 1024:.1f} MB -> {after / 1024:.1f} MB after 300 rounds; "
              f"answers {statuses}")
        assert after - before < 25 * 1024, (before, after)
        assert statuses.get("429", 0) > 200            # the peer is slowed down, not served
    finally:
        lab.close()


TWIN = "mount -t tmpfs tmpfs /var/run/wireguard && exec wireguard-go -f \"$0\""


def test_taking_an_interface_down_stops_only_this_namespaces_wireguard_go():
    """Two namespaces, each with its own /var/run/wireguard, run wireguard-go
    for the same interface name (containers, the README's lab). Deleting it in
    one must not stop the other's: a TUN's name is per namespace (an outside
    review saw `down` and a failed `install` stop every namespace's daemon of
    that name, the server's among them)."""
    lab = Lab()
    try:
        _twins(lab)
    finally:
        lab.close()


def _twins(lab):
    a, b = lab.add_host("a"), lab.add_host("b")
    name = lab.ifname("twin")
    for host in (a, b):
        host.spawn(["unshare", "-m", "--propagation", "private", "sh", "-c", TWIN, name],
                   "wg.log")
    for host in (a, b):
        wait_for(lambda: host.exec(["ip", "link", "show", name], check=False).returncode == 0,
                 30, f"{name} in {host.name}")
    b.python("import sys; sys.path.insert(0, sys.argv[1]); import innernet; "
             "innernet.UserspaceBackend().delete(sys.argv[2])", ROOT, name)
    assert b.exec(["ip", "link", "show", name], check=False).returncode != 0
    assert a.exec(["ip", "link", "show", name], check=False).returncode == 0
    assert a.procs[-1].poll() is None, a.log("wg.log")
