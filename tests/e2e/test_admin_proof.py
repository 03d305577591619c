"""A local user of an admin peer's host is not a network admin (issue 28, item 6).

innernet knows an API caller by its overlay source address, so on b69cbf7
`nobody` on an admin's host got 200 on GET /v1/admin/peers and could add
peers. Now an admin peer that joined with innernet.py proves every admin call
with its WireGuard private key, which only root can read. Here, over real
tunnels: `nobody` there is refused (with and without a made-up proof), root's
`innernet add-peer` works, a captured request replayed is refused, the mark
survives a restart of `serve` and follows a key rotation, and innernet 1.5.5's
admin client still works against our server (keeping innernet's rule, as the
README says) until that peer once proves a call. From the outside review:
a future-dated proof (admin clock ahead) replayed after a restart is refused,
and `nobody` on a joining host cannot take the invitation while root's
`install` runs.
"""
import json
import os
import sqlite3
import stat
import sys

import pytest

from lab import ROOT, Lab, device_peer_ips, start_network, start_serve, wait_for
from lab import invite as lab_invite

from .conftest import BARE

pytestmark = pytest.mark.netns

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]

# Sends each raw request (latin-1 text) on its own connection to the API;
# prints [[status, body text], ...]. Self-contained: `nobody` runs it.
SEND = r"""
import json, socket, sys
server, port, reqs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
out = []
for raw in reqs:
    s = socket.create_connection((server, port), timeout=5)
    s.sendall(raw.encode("latin-1"))
    s.shutdown(socket.SHUT_WR)
    resp = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        resp += chunk
    s.close()
    head, _, body = resp.partition(b"\r\n\r\n")
    out.append([int(head.split()[1]), body.decode("utf-8", "replace")])
print(json.dumps(out))
"""

# As root on the admin's host: our ApiClient's own admin calls, each captured
# as the bytes it sent, with the server's answers: [[status, raw request], ...].
CAPTURE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import innernet as I
if len(sys.argv) > 4:                  # this host's clock, that many seconds ahead
    _now = time.time
    time.time = lambda: _now() + float(sys.argv[4])
cfg = I.InterfaceConfig.from_toml(open(sys.argv[2]).read(), sys.argv[2])
api = I.ApiClient(cfg.server_internal_endpoint, cfg.server_public_key,
                  proof_key=cfg.private_key)
sent = []
head = api._head
def record(method, path, hdrs, data):
    h = head(method, path, hdrs, data)
    sent.append((h + data).decode("latin-1"))
    return h
api._head = record
out = []
for method, path, body in json.loads(sys.argv[3]):
    status, _, _ = api.request(method, path, body)
    out.append([status, sent[-1]])
print(json.dumps(out))
"""


UAPI_GET = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"get=1\n\n")
print(s.recv(4096)[:20])
"""


def raw_request(method, path, server_key, body=None, extra=()):
    data = "" if body is None else json.dumps(body)
    hdrs = [("Host", "10.66.0.1:51820"), ("X-Innernet-Server-Key", server_key),
            ("Content-Type", "application/json"), ("Content-Length", str(len(data))),
            ("Connection", "close"), *extra]
    return f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs) \
        + "\r\n" + data


def new_peer(name, ip, key="IIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIIII="):
    return {"name": name, "ip": ip, "cidr_id": 3, "endpoint": None, "public_key": key,
            "persistent_keepalive_interval": None, "is_admin": False, "is_disabled": False,
            "is_redeemed": False, "invite_expires": None, "candidates": []}


class World:
    pass


@pytest.fixture(scope="module")
def world(pyz):
    lab = Lab(innernet_cmd=BARE + [pyz])
    w = World()
    w.lab = lab
    try:
        w.srv, w.net, w.serve = start_network(lab, {"humans": "10.66.1.0/24"})
        w.db = w.srv.path("server", "lib", f"{w.net}.db")
        w.admin = lab.add_host("admin")
        w.ifname = lab.ifname("adm")
        w.admin.innernet("install", "--name", w.ifname, "--no-write-hosts",
                         lab_invite(w.srv, w.net, "admin", "humans", admin="true"))
        w.config = w.admin.path("client", "etc", f"{w.ifname}.conf")
        sys.path.insert(0, ROOT)
        import innernet
        w.server_key = innernet.InterfaceConfig.from_toml(
            open(w.config).read(), w.config).server_public_key
        yield w
    finally:
        lab.close()


def as_nobody(w, host, reqs):
    """[(status, JSON body)] of raw requests sent by `nobody` on ``host``."""
    out = host.exec(NOBODY + ["/usr/bin/python3", "-S", "-c", SEND, "10.66.0.1", "51820",
                              json.dumps(reqs)], timeout=60)
    return [(s, json.loads(b) if b else None) for s, b in json.loads(out.stdout)]


def capture(w, calls, host=None, config=None, ahead=None):
    """Our client's admin calls as root: [(status, the raw request it sent)]."""
    out = (host or w.admin).python(CAPTURE, ROOT, config or w.config, json.dumps(calls),
                                   *([] if ahead is None else [ahead]))
    return json.loads(out.stdout)


def db_names(w):
    return {r[0] for r in sqlite3.connect(w.db).execute("SELECT name FROM peers")}


def admin_id(w):
    return sqlite3.connect(w.db).execute("SELECT id FROM peers WHERE name = 'admin'") \
        .fetchone()[0]


def admin_contents(w):
    """The admin peer's contents as they are (a PUT that changes nothing)."""
    row = sqlite3.connect(w.db).execute(
        "SELECT name, ip, cidr_id, public_key FROM peers WHERE name = 'admin'").fetchone()
    return dict(new_peer(row[0], row[1], row[3]), cidr_id=row[2], is_admin=True,
                is_redeemed=True)


def refused(results):
    return all(s in (401, 403) and isinstance(b, dict) and b.get("error") for s, b in results)


def test_nobody_on_an_admin_host_cannot_call_the_admin_api(world):
    w = world
    bogus = ("X-Innernet-Admin-Proof", "v1 1 " + "0" * 32 + " " + "0" * 64)
    results = as_nobody(w, w.admin, [
        raw_request("GET", "/v1/admin/peers", w.server_key),
        raw_request("POST", "/v1/admin/peers", w.server_key, new_peer("intruder", "10.66.1.77")),
        raw_request("GET", "/v1/admin/cidrs", w.server_key, extra=[bogus]),
        raw_request("POST", "/v1/admin/peers", w.server_key, new_peer("intruder2", "10.66.1.78"),
                    extra=[bogus]),
    ])
    assert refused(results), results
    assert "X-Innernet-Admin-Proof" in results[0][1]["error"]
    assert not {"intruder", "intruder2"} & db_names(w)
    # user calls of that host are as before (the peer's own, by its address)
    assert as_nobody(w, w.admin, [raw_request("GET", "/v1/user/state", w.server_key)])[0][0] \
        == 200
    # nobody cannot read the key the proof takes: innernet's own modes (the
    # lab's directories above them opened for this check)
    etc = os.path.dirname(w.config)
    assert stat.S_IMODE(os.stat(w.config).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(etc).st_mode) == 0o700
    for d in (w.lab.tmp, w.admin.dir, os.path.dirname(etc)):
        os.chmod(d, 0o711)
    r = w.admin.exec(NOBODY + ["cat", w.config], check=False)
    assert r.returncode != 0 and "ermission denied" in r.stderr
    # nor ask wireguard-go for it (its UAPI socket is root's, 0700)
    r = w.admin.exec(NOBODY + ["/usr/bin/python3", "-S", "-c", UAPI_GET,
                               f"/var/run/wireguard/{w.ifname}.sock"], check=False)
    assert r.returncode != 0 and "PermissionError" in r.stderr, r.stdout
    # root's admin commands work
    w.admin.innernet("add-peer", w.ifname, "--name", "byroot", "--cidr", "humans", "--admin",
                     "false", "--auto-ip", "--save-config", w.admin.path("byroot.toml"),
                     "--invite-expires", "1h", "--yes")
    assert "byroot" in db_names(w)


def test_a_captured_admin_request_replayed_is_refused(world):
    w = world
    calls = [["GET", "/admin/peers", None],
             ["POST", "/admin/peers", new_peer("replayed", "10.66.1.90",
                                               "RRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRQ=")]]
    sent = capture(w, calls)
    assert [s for s, _ in sent] == [200, 201]
    assert "X-Innernet-Admin-Proof: v1 " in sent[0][1]
    count = len(db_names(w))
    results = as_nobody(w, w.admin, [raw for _, raw in sent])
    assert refused(results) and all("replayed" in b["error"] for _, b in results), results
    assert len(db_names(w)) == count
    # the proof does not carry over to another request either
    head, _, _ = sent[0][1].partition("\r\n")
    moved = sent[0][1].replace(head, "GET /v1/admin/cidrs HTTP/1.1", 1)
    results = as_nobody(w, w.admin, [moved])
    assert refused(results) and "wrong admin proof" in results[0][1]["error"], results


def test_the_mark_survives_a_restart_and_follows_a_key_rotation(world):
    w = world
    before = capture(w, [["GET", "/admin/cidrs", None]])
    w.serve.terminate()
    w.serve.wait(timeout=30)
    w.serve = start_serve(w.srv, w.net)
    wait_for(lambda: capture(w, [["GET", "/admin/peers", None]])[0][0] == 200, 30,
             "the restarted server to answer the admin")
    results = as_nobody(w, w.admin, [raw_request("GET", "/v1/admin/peers", w.server_key),
                                     before[0][1]])
    assert refused(results), results
    assert "before the server started" in results[1][1]["error"]
    w.admin.innernet("rotate-key", w.ifname, "--yes")
    w.admin.innernet("add-peer", w.ifname, "--name", "afterrot", "--cidr", "humans",
                     "--admin", "false", "--auto-ip", "--save-config",
                     w.admin.path("afterrot.toml"), "--invite-expires", "1h", "--yes")
    assert "afterrot" in db_names(w)
    assert refused(as_nobody(w, w.admin, [raw_request("GET", "/v1/admin/peers",
                                                      w.server_key)]))


def test_a_future_dated_proof_replayed_after_a_restart_is_refused(world):
    """Review item 2: an admin whose clock is 100 s ahead dates its proofs
    after the restarted server's start; the newest stamp the server accepted
    from that peer, kept in the database, refuses the replay. (The admin's
    clock stays ahead from here on: a clock set back would be refused until
    it passes that stamp, at most ADMIN_PROOF_WINDOW s.)"""
    w = world
    put = [["PUT", f"/admin/peers/{admin_id(w)}", admin_contents(w)]]
    ahead = capture(w, put, ahead=100)
    assert ahead[0][0] == 204, ahead
    w.serve.terminate()
    w.serve.wait(timeout=30)
    w.serve = start_serve(w.srv, w.net)
    wait_for(lambda: capture(w, [["GET", "/admin/peers", None]], ahead=100)[0][0] == 200, 30,
             "the restarted server to answer the admin")
    results = as_nobody(w, w.admin, [ahead[0][1]])
    assert refused(results) and "not newer" in results[0][1]["error"], results


def reference_dir():
    here = os.environ.get("INNERNET_REFERENCE_DIR") or os.path.join(
        ROOT, "..", "shared", "reference", "innernet-1.5.5")
    if os.access(os.path.join(here, "innernet"), os.X_OK):
        return os.path.abspath(here)
    if os.environ.get("INNERNET_COMPAT_REQUIRED"):
        pytest.fail(f"innernet 1.5.5 binaries are required but not found in {here}")
    pytest.skip(f"innernet 1.5.5 binaries not found in {here} (set INNERNET_REFERENCE_DIR)")


def test_an_innernet_1_5_5_admin_still_works_until_it_once_proves_a_call(world):
    w = world
    ref = reference_dir()
    host = w.lab.add_host("old")
    ifname = w.lab.ifname("old")
    old = [os.path.join(ref, "innernet"), "--backend", "userspace", "-c",
           host.path("etc"), "-d", host.path("lib")]
    invitation = lab_invite(w.srv, w.net, "oldadmin", "humans", admin="true")
    # innernet's redemption times out where its first handshake is lost, so
    # the invitation's key is on the server's device first (serve syncs CLI
    # edits within a second).
    ip = sqlite3.connect(w.db).execute("SELECT ip FROM peers WHERE name = 'oldadmin'") \
        .fetchone()[0]
    wait_for(lambda: ip in device_peer_ips(w.srv, w.net), 20, "the invitation on the device")
    host.exec(old + ["install", "--name", ifname, "--no-write-hosts", "--delete-invite",
                     invitation], timeout=120, input="")

    def add(name):
        return host.exec(old + ["add-peer", ifname, "--name", name, "--cidr", "humans",
                                "--admin", "false", "--auto-ip", "--save-config",
                                host.path(f"{name}.toml"), "--invite-expires", "1h", "--yes"],
                         check=False, timeout=60, input="")
    r = add("viaold")
    assert r.returncode == 0, r.stderr
    assert "viaold" in db_names(w)
    # What innernet's rule still allows, as the README says: nobody there is
    # that admin while the peer has never proved a call.
    assert as_nobody(w, host, [raw_request("GET", "/v1/admin/peers", w.server_key)])[0][0] \
        == 200
    # Once root there runs innernet.py's admin client, the peer is marked:
    # innernet 1.5.5's client is then refused with a reason, as nobody is.
    config = host.path("etc", f"{ifname}.conf")
    assert capture(w, [["GET", "/admin/peers", None]], host, config)[0][0] == 200
    r = add("viaold2")
    assert r.returncode != 0 and "viaold2" not in db_names(w)
    assert "status code 403" in r.stdout, r.stdout       # innernet prints no body
    assert refused(as_nobody(w, host, [raw_request("GET", "/v1/admin/peers", w.server_key)]))


# `nobody` on a joining host: redeems the invitation with its own key, again
# and again, through root's tunnel as soon as it is up, until the server says
# the invitation is gone or the time is up; prints the statuses it got.
THIEF = r"""
import base64, json, socket, sys, time
server, port, server_key, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
body = json.dumps({"public_key": base64.b64encode(bytes(range(1, 33))).decode()})
req = ("POST /v1/user/redeem HTTP/1.1\r\nHost: x\r\nX-Innernet-Server-Key: %s\r\n"
       "Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
       % (server_key, len(body), body)).encode()
statuses, deadline = [], time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        s = socket.create_connection((server, port), timeout=6)
        s.sendall(req)
        resp = s.recv(65536)
        s.close()
        statuses.append(int(resp.split()[1]))
        if statuses[-1] in (401, 410):
            break
    except (OSError, IndexError, ValueError):
        time.sleep(0.01)
print(json.dumps(statuses), flush=True)
"""


def test_nobody_on_a_joining_host_cannot_steal_the_invitation_during_install(world):
    """Review item 1: nobody's unproved redemption through root's tunnel is held;
    root's install, proving it holds the invitation's key, wins."""
    w = world
    host = w.lab.add_host("join")
    ifname = w.lab.ifname("join")
    invitation = lab_invite(w.srv, w.net, "joiner", "humans", admin="true")
    ip = sqlite3.connect(w.db).execute("SELECT ip FROM peers WHERE name = 'joiner'") \
        .fetchone()[0]
    wait_for(lambda: ip in device_peer_ips(w.srv, w.net), 20, "the invitation on the device")
    thief = host.spawn(NOBODY + ["/usr/bin/python3", "-S", "-c", THIEF, "10.66.0.1", "51820",
                                 w.server_key, "40"], "thief.log")
    r = host.exec(host.innernet_argv("install", "--name", ifname,
                                      "--no-write-hosts", invitation),
                  check=False, timeout=120)
    thief.wait(timeout=60)
    statuses = json.loads(host.log("thief.log").strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr
    # it raced and lost: held, then refused (409), or it came just after
    # root's proved redemption had begun (410) or ended (401)
    assert statuses and set(statuses) <= {401, 409, 410}, statuses
    row = sqlite3.connect(w.db).execute(
        "SELECT public_key, is_redeemed FROM peers WHERE name = 'joiner'").fetchone()
    import base64
    assert row[1] == 1 and row[0] != base64.b64encode(bytes(range(1, 33))).decode()
    config = host.path("client", "etc", f"{ifname}.conf")
    sys.path.insert(0, ROOT)
    import innernet
    cfg = innernet.InterfaceConfig.from_toml(open(config).read(), config)
    assert row[0] == innernet.public_key(cfg.private_key)


def test_nobody_asking_for_the_state_on_a_peer_of_ours_makes_it_no_innernet_client(world):
    """Review: `nobody`'s request for the state (no gzip, no If-None-Match:
    innernet's client's way) through the tunnel of a peer that joined with
    innernet.py made the server record that peer as innernet's client, and
    the admin's `rotate-key` then told it to delete that peer's data store.
    The peer proved its redemption with its private key: nothing is recorded
    and the rotation names it nowhere."""
    w = world
    host = w.lab.add_host("curl")
    host.innernet("install", "--name", w.lab.ifname("curl"), "--no-write-hosts",
                  lab_invite(w.srv, w.net, "curled", "humans"))
    results = as_nobody(w, host, [raw_request("GET", "/v1/user/state", w.server_key)] * 2)
    assert [s for s, _ in results] == [200, 200], results
    assert "admin" in {p["name"] for p in results[0][1]["peers"]}
    db = sqlite3.connect(w.db)
    pid = db.execute("SELECT id FROM peers WHERE name = 'curled'").fetchone()[0]
    assert db.execute("SELECT count(*) FROM innernet_pins WHERE peer_id = ?",
                      (pid,)).fetchone()[0] == 0
    r = w.admin.innernet("rotate-key", w.ifname, "--yes")
    assert "'curled'" not in r.stderr, r.stderr
