"""Security over real tunnels: the authorization matrix, simultaneous joins, secrets.

Issue 7. Every API route is called by every kind of caller from its own
namespace, through its own WireGuard interface (or, for the last kind, from
the underlay, another interface of the server). Zero unauthorized successes.
"""
import json
import os
import stat
import sys

import pytest

from lab import ROOT, Lab, start_network, wait_for
from lab import invite as lab_invite

from .conftest import BARE

pytestmark = pytest.mark.netns

HEADER = "X-Innernet-Server-Key"
WRONG_KEY = "DD5yKRfzExcV5+kDnTroDgCU15latdMjiQ59j1hEuk8="

RAW_UP = r"""
import sys
sys.path.insert(0, sys.argv[1])
import innernet as I
cfg = I.InterfaceConfig.from_toml(open(sys.argv[2]).read(), sys.argv[2])
I.bring_up("auto", sys.argv[3], private_key=cfg.private_key, address=cfg.address,
           listen_port=None, updates=[I.server_peer_update(cfg)], mtu=1280, routing=True)
"""

MATRIX = r"""
import json, socket, sys
server, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
key, routes = sys.argv[4], json.loads(sys.argv[5])
prove = None
if len(sys.argv) > 6:       # root on an admin's host: its client proves admin calls
    sys.path.insert(0, sys.argv[7])
    import innernet
    cfg = innernet.InterfaceConfig.from_toml(open(sys.argv[6]).read(), sys.argv[6])
    mac = innernet.admin_proof_key(innernet.shared_secret(cfg.private_key, key))
    prove = lambda method, path, data: innernet.admin_proof(mac, method, path, data)
out, refused = [], 0
for method, path, body in routes:
    if refused >= 2:                  # the tunnel (or interface) refuses us: stop knocking
        out.append(-1); continue
    try:
        s = socket.create_connection((server, port), timeout=2)
    except OSError:
        refused += 1; out.append(-1); continue
    data = b"" if body is None else json.dumps(body).encode()
    hdrs = {"Host": server, "Content-Length": str(len(data))}
    if mode != "none":
        hdrs[%r] = key if mode == "key" else %r
    if prove and path.startswith("/v1/admin/"):
        hdrs["X-Innernet-Admin-Proof"] = prove(method, path, data)
    req = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    try:
        s.sendall(req.encode() + b"\r\n" + data)
        s.settimeout(5)
        resp = b""
        while b"\r\n" not in resp:
            chunk = s.recv(4096)
            if not chunk:
                break
            resp += chunk
        out.append(int(resp.split()[1]) if resp else -1)
    except OSError:
        out.append(-1)
    s.close()
print(json.dumps(out))
""" % (HEADER, WRONG_KEY)


def routes(user_id):
    return [  # (method, path, body, role); redeem last: it changes the caller's key
        ("GET", "/v1/user/capabilities", None, "any"),
        ("GET", "/v1/user/state", None, "user"),
        ("PUT", "/v1/user/endpoint", {"option": "Unset"}, "user"),
        ("PUT", "/v1/user/candidates", [], "user"),
        ("GET", "/v1/admin/peers", None, "admin"),
        ("POST", "/v1/admin/peers", "new-peer", "admin"),
        ("PUT", f"/v1/admin/peers/{user_id}", "same-user", "admin"),
        ("DELETE", "/v1/admin/peers/999", None, "admin"),
        ("GET", "/v1/admin/cidrs", None, "admin"),
        ("POST", "/v1/admin/cidrs", "new-cidr", "admin"),
        ("PUT", "/v1/admin/cidrs/3", {"name": "humans", "cidr": "10.66.1.0/24", "parent": 1},
         "admin"),
        ("DELETE", "/v1/admin/cidrs/999", None, "admin"),
        ("GET", "/v1/admin/associations", None, "admin"),
        ("POST", "/v1/admin/associations", "new-assoc", "admin"),
        ("DELETE", "/v1/admin/associations/999", None, "admin"),
        ("POST", "/v1/user/routes", {"routes": ["192.168.77.0/24"]}, "user"),
        ("GET", "/v1/user/routes", None, "user"),
        ("PUT", f"/v1/admin/routes/{user_id}", {"routes": None}, "admin"),
        ("GET", "/v1/admin/route-approvers", None, "admin"),
        ("POST", "/v1/admin/route-approvers", {"route": "192.168.0.0/16", "cidr_id": 3},
         "admin"),
        ("DELETE", "/v1/admin/route-approvers/999", None, "admin"),
        ("GET", "/v1/admin/audit", None, "admin"),
        ("POST", "/v1/admin/plan", {"document": "x = 1"}, "admin"),
        ("POST", "/v1/admin/apply", {"document": "x = 1"}, "admin"),
        ("POST", "/v1/user/redeem", "redeem", "unredeemed"),
    ]


ALLOWED = {"any": {"unredeemed", "user", "admin"}, "unredeemed": {"unredeemed"},
           "user": {"user", "admin"}, "admin": {"admin"}}


class World:
    pass


def invite(w, name, cidr, admin="false"):
    return lab_invite(w.srv, w.net, name, cidr, admin=admin)


@pytest.fixture(scope="module")
def world(pyz):
    lab = Lab(innernet_cmd=BARE + [pyz])
    w = World()
    w.lab = lab
    try:
        w.srv, w.net, w.serve = start_network(lab, {"humans": "10.66.1.0/24",
                                                    "others": "10.66.2.0/24"})
        srv = w.srv
        w.hosts = {}
        for name, admin in (("admin", "true"), ("user", "false"), ("disuser", "false"),
                            ("disadmin", "true")):
            host = lab.add_host(name)
            host.innernet("install", "--name", lab.ifname(name), "--no-write-hosts",
                          invite(w, name, "humans", admin))
            w.hosts[name] = host
        for name in ("disuser", "disadmin"):
            srv.server("disable-peer", w.net, "--name", name, "--yes")
        # unredeemed: the invitation key on a tunnel, never redeemed
        w.hosts["unredeemed"] = host = lab.add_host("unredeemed")
        host.exec([sys.executable, "-c", RAW_UP, ROOT, invite(w, "unredeemed", "humans"),
                   lab.ifname("unre")])
        # unknown: a key the server's device accepts, for an address no peer has
        w.hosts["unknown"] = host = lab.add_host("unknown")
        sys.path.insert(0, ROOT)
        import innernet
        k = innernet.generate_private_key()
        w.unknown_key = innernet.public_key(k)
        inject_unknown(w)
        cfg = innernet.InterfaceConfig.from_toml(open(srv.path("user.toml")).read(), "x")
        cfg = innernet.replaced(
            cfg, private_key=k, address=innernet.ipaddress.ip_interface("10.66.2.250/16"))
        with open(host.path("unknown.toml"), "w") as f:
            f.write(cfg.to_toml())
        host.exec([sys.executable, "-c", RAW_UP, ROOT, host.path("unknown.toml"),
                   lab.ifname("unkn")])
        # other interface: reaches 10.66.0.1 through the underlay, not the tunnel
        w.hosts["underlay"] = host = lab.add_host("underlay")
        host.exec(["ip", "route", "add", "10.66.0.0/16", "via", srv.underlay])
        w.server_key = innernet.public_key(
            innernet.ServerConfig.from_toml(open(srv.path("server", "etc", f"{w.net}.conf"))
                                            .read(), "c").private_key)
        w.db = srv.path("server", "lib", f"{w.net}.db")
        # A tunnel brought up before the server synced its key loses its first
        # handshake and WireGuard retries after 5 s: wait (bounded) for each.
        from lab import device
        for name, ifname in (("unredeemed", lab.ifname("unre")),):
            host = w.hosts[name]
            wait_for(lambda: host.python("import socket; socket.create_connection(("
                                         "'10.66.0.1', 51820), timeout=1)", check=False)
                     .returncode == 0 or device(host, ifname)["peers"][0]["last_handshake"],
                     20, f"{name}'s handshake")
        yield w
    finally:
        lab.close()


def inject_unknown(w):
    """Put a key on the server's device for 10.66.2.250, an address no peer has.

    serve removes it again at its next sync (it is not in the database), so
    the matrix re-injects it right before the row that uses it."""
    sys.path.insert(0, ROOT)
    import innernet
    innernet.UserspaceBackend().apply(w.net, updates=[innernet.PeerUpdate(
        w.unknown_key, allowed_ips=["10.66.2.250/32"], keepalive=25)])


def unknown_tunnel_up(w):
    """Inject the unknown key (again: serve's sync may have removed it) and
    report whether a connection through it reaches the API port."""
    inject_unknown(w)
    return w.hosts["unknown"].python(
        "import socket; socket.create_connection(('10.66.0.1', 51820), timeout=1)",
        check=False).returncode == 0


def bodies(w, body):
    if body == "new-peer":
        return {"name": "matrix-peer", "ip": "10.66.1.200", "cidr_id": 3, "endpoint": None,
                "public_key": "IIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIII=",
                "persistent_keepalive_interval": None, "is_admin": False, "is_disabled": False,
                "is_redeemed": False, "invite_expires": None, "candidates": []}
    if body == "same-user":
        return {"name": "user", "ip": "10.66.1.2", "cidr_id": 3, "endpoint": None,
                "public_key": WRONG_KEY, "persistent_keepalive_interval": None, "is_admin": False,
                "is_disabled": False, "is_redeemed": True, "invite_expires": None,
                "candidates": []}
    if body == "new-cidr":
        return {"name": "matrix-cidr", "cidr": "10.66.77.0/24", "parent": 1}
    if body == "new-assoc":
        return {"cidr_id_1": 3, "cidr_id_2": 4}
    if body == "redeem":
        return {"public_key": "MMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMM="}
    return body


def run_matrix(w, host, mode, target="10.66.0.1", as_user=None, prove=False):
    import sqlite3
    user_id = sqlite3.connect(w.db).execute("SELECT id FROM peers WHERE name='user'").fetchone()[0]
    table = routes(user_id)
    wire = [(m, p, bodies(w, b)) for m, p, b, _ in table]
    args = [target, 51820, mode, w.server_key, json.dumps(wire)]
    if prove:       # as root there, with the key of the peer's config
        args += [host.path("client", "etc", f"{w.lab.ifname(host.name)}.conf"), ROOT]
    if as_user:     # a process of an unprivileged user on that host
        out = host.exec(["setpriv", f"--reuid={as_user}", "--regid=nogroup", "--clear-groups",
                         "/usr/bin/python3", "-c", MATRIX] + [str(a) for a in args], timeout=120)
    else:
        out = host.python(MATRIX, *args, timeout=120)
    return list(zip(table, json.loads(out.stdout)))


def debug_state(w):
    from lab import device
    return {"server": device(w.srv, w.net), "unredeemed": device(
        w.hosts["unredeemed"], w.lab.ifname("unre")), "log": w.srv.log("serve.log")[-2000:]}


def test_authorization_matrix(world, counts):
    callers = [  # (kind, host, header mode, role it may act as)
        ("unknown address", "unknown", "key", None),
        ("disabled user", "disuser", "key", None),
        ("disabled admin", "disadmin", "key", None),
        ("missing server key (admin peer)", "admin", "none", None),
        ("wrong server key (admin peer)", "admin", "wrong", None),
        ("other interface (underlay)", "underlay", "key", None),
        ("local process on the server (root)", "srv", "key", None),
        ("local process on the server (nobody)", "srv:nobody", "key", None),
        ("nobody on the admin's host", "admin:nobody", "key", "user"),
        ("redeemed user", "user", "key", "user"),
        ("admin (its client's proofs)", "admin:prove", "key", "admin"),
        ("unredeemed", "unredeemed", "key", "unredeemed"),
    ]
    unauthorized_successes, requests, allowed_ok = [], 0, 0
    lines = []
    for kind, host, mode, role in callers:
        name, _, as_user = host.partition(":")
        prove = as_user == "prove"
        for _ in range(5):
            if host == "unknown":
                wait_for(lambda: unknown_tunnel_up(world), 20, "the unknown tunnel")
            results = run_matrix(world, world.srv if name == "srv" else world.hosts[name], mode,
                                 as_user=None if prove else as_user or None, prove=prove)
            # serve's periodic sync removes the injected key (no peer has it);
            # a row it cut short (no connection) is run again, not counted.
            if host != "unknown" or all(s != -1 for _, s in results):
                break
        for (method, path, _, need), status in results:
            requests += 1
            allowed = role is not None and role in ALLOWED[need]
            if allowed:
                assert status not in (401, -1), (kind, method, path, status, debug_state(world))
                allowed_ok += 1
            elif 200 <= status < 300:
                unauthorized_successes.append((kind, method, path, status))
        lines.append(f"{kind:34} " + " ".join(f"{s:>3}" for _, s in results))
        if kind == "other interface (underlay)":
            assert all(s == -1 for _, s in results), "the API answered off the tunnel"
        if kind == "unknown address" or kind.startswith("local process"):
            assert all(s == 401 for _, s in results), f"{kind} got past the API"
        if kind == "nobody on the admin's host":       # issue 28, item 6
            assert all(s in (401, 403) for (_, p, _, _), s in results if "/admin/" in p), \
                f"{kind} got past the admin API"
    print("\n".join(lines))
    counts["authorization matrix requests over real tunnels"] = requests
    counts["authorization matrix: unauthorized successes"] = len(unauthorized_successes)
    counts["authorization matrix: authorized calls answered"] = allowed_ok
    assert unauthorized_successes == []


def test_twenty_simultaneous_joins_get_distinct_addresses(world, counts):
    import subprocess
    hosts = []
    for i in range(20):
        hosts.append((world.lab.add_host(f"j{i}"), invite(world, f"j{i}", "others")))
    procs = [subprocess.Popen(["ip", "netns", "exec", h.ns] + h.innernet_argv(
        "install", "--name", world.lab.ifname(f"j{i}"), "--no-write-hosts", inv),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, (h, inv) in enumerate(hosts)]
    failures = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        if p.returncode:
            failures.append(err)
    assert failures == []
    import sqlite3
    ips = sqlite3.connect(world.db).execute(
        "SELECT ip FROM peers WHERE name LIKE 'j%' AND is_redeemed = 1").fetchall()
    assert len(ips) == 20 and len(set(ips)) == 20
    counts["simultaneous real joins over WireGuard (all succeeded)"] = 20


def test_no_private_key_in_any_output_and_key_files_are_private(world, counts):
    import glob
    keys, files = set(), []
    for path in glob.glob(os.path.join(world.lab.tmp, "**", "*"), recursive=True):
        if path.endswith((".conf", ".toml")) and os.path.isfile(path):
            text = open(path).read()
            for line in text.splitlines():
                if line.replace(" ", "").startswith("private-key="):
                    keys.add(line.split('"')[1])
                    files.append(path)
    assert len(keys) >= 25
    output = world.lab.all_output()
    leaked = [k for k in keys if k in output]
    assert leaked == []
    checked = 0
    for path in files + glob.glob(os.path.join(world.lab.tmp, "**", "*.db"), recursive=True) + \
            glob.glob(os.path.join(world.lab.tmp, "**", "*.json"), recursive=True):
        if path.endswith("unknown.toml"):
            continue                                   # written by this test, not innernet
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
        parent = os.path.dirname(path)
        if parent.endswith(("/etc", "/lib")):
            assert stat.S_IMODE(os.stat(parent).st_mode) == 0o700, parent
        checked += 1
    counts["private keys checked absent from all output"] = len(keys)
    counts["secret files checked 0600 (dirs 0700)"] = checked
