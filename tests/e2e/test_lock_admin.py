"""Network lock from an admin peer's host (issue 32), end to end: `lock init`
on a running network of 100 peers signs them all in one command; every admin
verb works under lock over the API and in `apply`, and the audit log names
the key that signed; unsigned changes are refused; `lock add`, `remove`,
`log`, `status` and `disable`. The lab runs the .pyz under the test's own
interpreter, which has PyNaCl (lock needs it)."""
import json
import os
import re
import sqlite3
import sys
import time
import types

import pytest

from lab import ROOT, Lab, db_rows, db_write, device, invite, start_network, wait_for

try:
    import nacl.signing  # noqa: F401
    HAVE_NACL = True
except ImportError:
    HAVE_NACL = False
# Collected without PyNaCl too (tests/test_suite.py), and skipped with the reason.
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not HAVE_NACL,
                                                    reason="network lock needs PyNaCl")]

ADMIN_IP, ALICE_IP = "10.66.1.1", "10.66.1.2"
LOCK_TABLES = ("lock_chain", "lock_batches", "lock_records")
MANY = 100


def _innernet():
    sys.path.insert(0, ROOT)
    import innernet
    return innernet


@pytest.fixture(scope="module")
def w(pyz):
    I = _innernet()
    lab = Lab(innernet_cmd=[sys.executable, pyz])
    w = types.SimpleNamespace(lab=lab)
    try:
        w.srv, w.net, w.serve = start_network(lab, {"humans": "10.66.1.0/24",
                                                    "many": "10.66.8.0/22",
                                                    "far": "10.66.3.0/24"})
        w.db = w.srv.path("server", "lib", f"{w.net}.db")
        w.admin = lab.add_host("admin")
        w.iface = lab.ifname("admin")
        w.admin.innernet("install", "--name", w.iface, "--no-write-hosts",
                         invite(w.srv, w.net, "admin", "humans", admin="true", ip=ADMIN_IP))
        # A running network: 100 redeemed peers (their hosts do not matter here).
        conn = sqlite3.connect(w.db, timeout=15)
        with conn:
            many = conn.execute("SELECT id FROM cidrs WHERE name = 'many'").fetchone()[0]
            conn.executemany(
                "INSERT INTO peers (name, ip, cidr_id, public_key, is_redeemed) "
                "VALUES (?, ?, ?, ?, 1)",
                [(f"p{i}", f"10.66.{8 + i // 200}.{10 + i % 200}", many,
                  I.public_key(I.generate_private_key())) for i in range(MANY)])
            conn.execute("INSERT INTO associations (cidr_id_1, cidr_id_2) SELECT h.id, ? "
                         "FROM cidrs h WHERE h.name = 'humans'", (many,))
        conn.close()
        # early joined before the lock: it takes the lock from its admin's proof
        w.early = lab.add_host("early")
        w.early_if = lab.ifname("early")
        w.early.innernet("install", "--name", w.early_if, "--no-write-hosts",
                         invite(w.srv, w.net, "early", "humans", ip="10.66.1.30"))
        # far's CIDR sees no admin peer: it cannot take the lock (it pins none before it)
        w.far = lab.add_host("far")
        w.far_if = lab.ifname("far")
        w.far.innernet("install", "--name", w.far_if, "--no-write-hosts",
                       invite(w.srv, w.net, "far", "far", ip="10.66.3.30"))
        # an invitation not redeemed yet: lock init refuses to sign it (V22-4)
        invite(w.srv, w.net, "pending", "humans", ip="10.66.1.50")
        w.admin.innernet("fetch", w.iface, "--no-write-hosts")
        w.pending = w.admin.innernet("lock", "init", w.iface, "--yes", check=False)
        w.admin.innernet("delete-peer", w.iface, "--name", "pending", "--yes")
        w.init = w.admin.innernet("lock", "init", w.iface, "--yes")
        w.secret = w.init.stdout.split("keep it offline): ")[1].split()[0]
        yield w
    finally:
        lab.close()


def admin(w, *args, check=True):
    return w.admin.innernet(*args, check=check)


def records(w):
    return {r[0]: json.loads(r[1]) for r in db_rows(w.db, "SELECT subject, payload "
                                                          "FROM lock_records")}


def test_lock_init_signs_a_running_network_of_100_peers_in_one_command(w):
    recs = records(w)
    peers = db_rows(w.db, "SELECT ip FROM peers")
    assert len(peers) >= MANY + 2
    assert {f"peer:{ip}" for (ip,) in peers} <= set(recs)
    assert len(db_rows(w.db, "SELECT id FROM lock_batches")) == 1      # one signature
    assert f"{len(recs)} records signed" in w.init.stderr, w.init.stderr
    assert "keep it offline" in w.init.stdout and len(w.secret) == 32
    key = w.admin.path("client", "etc", f"{w.iface}.lock-key")
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert not any(open(os.path.join(d, f), "rb").read().find(
        open(key, "rb").read().strip()) >= 0 for d, _, fs in os.walk(w.srv.path("server"))
        for f in fs)                                    # the lock key is not on the server
    # the admin's own client takes all 100 as signed
    out = admin(w, "fetch", w.iface, "--no-write-hosts")
    assert "lock refused" not in out.stderr, out.stderr
    assert len(device(w.admin, w.iface)["peers"]) >= MANY + 1


def test_lock_init_refuses_while_an_invitation_is_not_redeemed(w):
    """Outside round 22, V22-4: the pending invitation's own key was signed,
    with no expiry, for whoever holds the file. lock init names it instead."""
    out = w.pending
    assert out.returncode == 1 and out.stderr.count("error:") == 1, out.stderr
    assert "1 invitation(s) not redeemed yet: pending: " in out.stderr, out.stderr
    assert "peer:10.66.1.50" not in records(w)


def test_every_admin_verb_works_under_lock_and_the_audit_log_names_the_key(w):
    I = _innernet()
    invites = w.admin.path("inv")
    os.makedirs(invites, exist_ok=True)
    steps = [
        ("add-cidr", w.iface, "--name", "robots", "--cidr", "10.66.2.0/24", "--parent", w.net,
         "--yes"),
        ("add-association", w.iface, "humans", "robots", "--yes"),
        ("add-peer", w.iface, "--name", "bob", "--cidr", "robots", "--ip", "10.66.2.5",
         "--admin", "false", "--save-config", os.path.join(invites, "bob.toml"),
         "--invite-expires", "1h", "--yes"),
        ("reinvite", w.iface, "--name", "bob", "--save-config",
         os.path.join(invites, "bob2.toml"), "--invite-expires", "1h", "--yes"),
        ("rename-peer", w.iface, "--name", "bob", "--new-name", "robert", "--yes"),
        ("disable-peer", w.iface, "--name", "robert", "--yes"),
        ("enable-peer", w.iface, "--name", "robert", "--yes"),
        ("rename-cidr", w.iface, "--name", "robots", "--new-name", "bots", "--yes"),
        ("delete-association", w.iface, "humans", "bots", "--yes"),
        ("delete-peer", w.iface, "--name", "robert", "--yes"),
        ("delete-cidr", w.iface, "--name", "bots", "--yes"),
    ]
    for argv in steps:
        out = admin(w, *argv, check=False)
        assert out.returncode == 0, (argv[0], out.stderr)
    inv = I.InterfaceConfig.from_toml(open(os.path.join(invites, "bob2.toml")).read(), "bob")
    assert inv.lock and I.invitation_lock_chain(inv).net == w.net
    # apply: the network as code, with a change of its own and a new peer
    doc = admin(w, "export", w.iface).stdout
    doc = doc.replace('name = "p0"\n', 'name = "p0-renamed"\n') + \
        '\n[[peers]]\nname = "carl"\nip = "10.66.1.40"\ncidr = "humans"\nadmin = false\n' \
        'disabled = false\n'
    path = w.admin.path("doc.toml")
    open(path, "w").write(doc)
    out = admin(w, "apply", w.iface, path, "--save-invites", invites, "--yes", check=False)
    assert out.returncode == 0, out.stderr
    carl = I.InterfaceConfig.from_toml(open(os.path.join(invites, "carl.toml")).read(), "c")
    assert carl.lock is not None
    recs = records(w)
    assert recs["peer:10.66.8.10"]["name"] == "p0-renamed"
    assert recs["peer:10.66.1.40"]["key"].startswith("auth:")
    assert recs["peer:10.66.2.5"]["deleted"] and recs["cidr:10.66.2.0/24"]["deleted"]
    # the audit log names the signing key on every change
    key = I.lock_public(open(w.admin.path("client", "etc", f"{w.iface}.lock-key")).read()
                        .strip())
    audit = admin(w, "audit", w.iface, "--json").stdout
    audit = json.loads(audit)
    locked_at = next(r["id"] for r in audit if r["action"] == "lock")
    rows = [r for r in audit if r["id"] > locked_at and r["action"] != "lock"]
    assert len(rows) >= len(steps) + 2, rows
    assert all(r["actor"].endswith(f"with lock key {I.lock_short(key)}") for r in rows), rows


def test_a_change_without_a_trusted_key_is_refused(w):
    key = w.admin.path("client", "etc", f"{w.iface}.lock-key")
    os.rename(key, key + ".away")
    try:
        out = admin(w, "add-cidr", w.iface, "--name", "nokey", "--cidr", "10.66.3.0/24",
                    "--parent", w.net, "--yes", check=False)
    finally:
        os.rename(key + ".away", key)
    assert out.returncode != 0 and "no trusted lock key" in out.stderr
    # the server's own CLI without --lock-key
    out = w.srv.server("add-cidr", w.net, "--name", "nokey", "--cidr", "10.66.3.0/24",
                       "--parent", w.net, "--yes", check=False)
    assert out.returncode != 0 and "network is locked" in out.stderr
    assert not db_rows(w.db, "SELECT id FROM cidrs WHERE name = 'nokey'")


def test_a_client_that_joined_before_the_lock_takes_it_from_its_admins_proof(w):
    """early pinned the admin before the lock; `lock init` sent it the admin's
    proof of the genesis, so its next sync takes the lock, and from then on
    a peer no trusted key signed (a row added to the database) is refused."""
    I = _innernet()
    out = w.early.innernet("fetch", w.early_if, "--no-write-hosts")
    assert "network lock taken, proved by admin 'admin'" in out.stderr, out.stderr
    assert os.path.exists(w.early.path("client", "lib", f"{w.early_if}.lock.json"))
    conn = sqlite3.connect(w.db, timeout=15)
    with conn:
        conn.execute("INSERT INTO peers (name, ip, cidr_id, public_key, is_redeemed) SELECT "
                     "'sneaky', '10.66.1.60', id, ?, 1 FROM cidrs WHERE name = 'humans'",
                     (I.public_key(I.generate_private_key()),))
    conn.close()
    out = w.early.innernet("fetch", w.early_if, "--no-write-hosts")
    if "sneaky" not in out.stderr:                 # serve had not noticed the row yet
        wait_for(lambda: "lock refused peer 'sneaky'" in w.early.innernet(
            "fetch", w.early_if, "--no-write-hosts").stderr or None, 30, "the refusal")
    assert "10.66.1.60/32" not in {a for p in device(w.early, w.early_if)["peers"]
                                   for a in p["allowed_ips"]}
    conn = sqlite3.connect(w.db, timeout=15)
    with conn:
        conn.execute("DELETE FROM peers WHERE name = 'sneaky'")
    conn.close()


def test_lock_init_names_the_network_and_what_it_signed_and_a_peer_that_sees_no_admin(w):
    """Outside probe, finding 6: `lock init` says the network's name (not the
    interface's), how many records of each kind it signed, names its key
    after the admin peer, and names the peers that cannot take the lock (no
    admin is visible to them). Issue 32, F1: once an association makes an
    admin visible, such a peer pins it but still does not take the lock from
    it: an admin first seen with or after the lock could be the server's."""
    assert f"network {w.net} (interface " in w.init.stderr and ") locked: " in w.init.stderr, \
        w.init.stderr
    assert f"network {w.iface} locked" not in w.init.stderr
    assert re.search(r"records signed by lk:\S+ \(\d+ peers, \d+ CIDRs, \d+ associations\)",
                     w.init.stderr), w.init.stderr
    line = [ln for ln in w.init.stderr.splitlines() if "see no admin peer" in ln]
    assert len(line) == 1 and "new invitations" in line[0] \
        and ": far;" in line[0] and "1 peer(s)" in line[0], w.init.stderr
    assert "trusted: admin lk:" in admin(w, "lock", "status", w.iface).stdout
    out = w.far.innernet("fetch", w.far_if, "--no-write-hosts")
    assert "no admin this host knows proved it: not taken" in out.stderr, out.stderr
    admin(w, "add-association", w.iface, "humans", "far", "--yes")
    out = w.far.innernet("fetch", w.far_if, "--no-write-hosts")
    assert "was not pinned here before the lock was first seen: not taken" \
        in out.stderr, out.stderr
    out = w.far.innernet("fetch", w.far_if, "--no-write-hosts")     # now pinned: still not
    assert "network lock taken" not in out.stderr, out.stderr
    # ... and says so at every sync, in `status` too, not once then "not
    # modified" (outside rounds 27, R27-3, and 28)
    for _ in range(2):
        out = w.far.innernet("fetch", w.far_if, "--no-write-hosts")
        assert ": not taken" in out.stderr, out.stderr
        r = w.far.innernet("status", w.far_if, check=False)
        assert r.returncode == 1 and "not taken" in r.stdout, r.stdout
    assert not os.path.exists(w.far.path("client", "lib", f"{w.far_if}.lock.json"))


def test_an_admin_host_without_its_own_lock_copy_signs_nothing(w):
    """Issue 32, F2: without this host's own copy of the lock, the chain is
    the server's word (a hijacked one can serve a fake chain trusting its
    key and this admin's): every signing verb refuses, in one line."""
    lock = w.admin.path("client", "lib", f"{w.iface}.lock.json")
    os.rename(lock, lock + ".away")
    try:
        for argv in (("add-cidr", w.iface, "--name", "nocopy", "--cidr", "10.66.4.0/24",
                      "--parent", w.net, "--yes"),
                     ("lock", "add", w.iface, "--key", _innernet().lock_keypair()[1])):
            out = admin(w, *argv, check=False)
            assert out.returncode != 0 and "has no copy of its lock" in out.stderr, out.stderr
            assert len(out.stderr.strip().splitlines()) <= 2, out.stderr
    finally:
        os.rename(lock + ".away", lock)
    assert not db_rows(w.db, "SELECT id FROM cidrs WHERE name = 'nocopy'")


def held(host, iface):
    """{allowed IP: public key} of an interface's device."""
    return {a: p["public_key"] for p in device(host, iface)["peers"] for a in p["allowed_ips"]}


def fetch_until(w, host, iface, done, what):
    """Fetch until ``done(stderr)`` (serve notices a database written beside
    it at its next poll): the last fetch's stderr."""
    out = []

    def step():
        out[:] = [host.innernet("fetch", iface, "--no-write-hosts").stderr]
        return done(out[0]) or None
    wait_for(step, 30, what)
    return out[0]


def test_a_static_peer_a_revoked_route_and_auto_approve_rules_under_lock(w):
    """add-peer --static by an admin under lock is signed, and a client
    routes the static peer through the server; one the database alone gained
    is refused. approve-routes --revoke signs the route away; the database
    approving it again is refused. An auto-approve rule cannot be made under
    lock, one made before approves nothing, and a route approved by the
    server alone (as a rule would) is not installed."""
    I = _innernet()
    admin(w, "add-peer", w.iface, "--name", "phone", "--cidr", "humans", "--ip", "10.66.1.70",
          "--static", "--save-wg-quick", w.admin.path("phone.conf"), "--yes")
    assert records(w)["peer:10.66.1.70"]["static"] is True
    server_key = I.InterfaceConfig.from_toml(open(w.early.path(
        "client", "etc", f"{w.early_if}.conf")).read(), "early").server_public_key
    err = fetch_until(w, w.early, w.early_if, lambda e: "10.66.1.70/32" in held(
        w.early, w.early_if), "the signed static peer")
    assert "lock refused" not in err, err
    assert held(w.early, w.early_if)["10.66.1.70/32"] == server_key       # through the server
    db_write(w.db, "INSERT INTO peers (name, ip, cidr_id, public_key, is_redeemed) SELECT "
             "'sneakyphone', '10.66.1.71', id, ?, 1 FROM cidrs WHERE name = 'humans'",
             (I.public_key(I.generate_private_key()),))
    db_write(w.db, "INSERT INTO static_peers (peer_id) SELECT id FROM peers "
             "WHERE name = 'sneakyphone'")
    err = fetch_until(w, w.early, w.early_if, lambda e: "'sneakyphone'" in e, "the refusal")
    assert "lock refused peer 'sneakyphone' (10.66.1.71) from the server: no record signed" \
        in err, err
    assert "10.66.1.71/32" not in held(w.early, w.early_if)
    db_write(w.db, "DELETE FROM static_peers WHERE peer_id IN "
             "(SELECT id FROM peers WHERE name = 'sneakyphone')")
    db_write(w.db, "DELETE FROM peers WHERE name = 'sneakyphone'")
    # a route approved, then revoked: signed away; the database approving it
    # again is not installed (the record signed says otherwise)
    w.early.innernet("advertise-routes", w.early_if, "192.168.81.0/24", "--yes")
    admin(w, "approve-routes", w.iface, "--name", "early", "--routes", "192.168.81.0/24",
          "--yes")
    fetch_until(w, w.admin, w.iface, lambda e: "192.168.81.0/24" in held(w.admin, w.iface),
                "the approved route")
    admin(w, "approve-routes", w.iface, "--name", "early", "--routes", "192.168.81.0/24",
          "--revoke", "--yes")
    assert records(w)["peer:10.66.1.30"]["routes"] == []
    fetch_until(w, w.admin, w.iface, lambda e: "192.168.81.0/24" not in held(w.admin, w.iface),
                "the revoked route gone")
    db_write(w.db, "UPDATE peer_routes SET approved = 1 WHERE route = '192.168.81.0/24'")
    err = fetch_until(w, w.admin, w.iface, lambda e: "'early'" in e, "the refusal")
    line = [ln for ln in err.splitlines() if "lock refused peer 'early'" in ln]
    assert len(line) == 1 and "192.168.81.0/24 not signed" in line[0], err
    assert "192.168.81.0/24" not in held(w.admin, w.iface)
    assert held(w.admin, w.iface).get("10.66.1.30/32")          # early itself stays
    # auto-approve: no rule under lock; one made before (here: written in)
    # approves nothing; the server approving anyway is refused as above
    out = admin(w, "approve-routes", w.iface, "--auto-approve", "192.168.0.0/16", "--cidr",
                "humans", "--yes", check=False)
    assert out.returncode != 0 and out.stderr.count("error:") == 1
    assert "auto-approve rule would approve routes no admin signed" in out.stderr, out.stderr
    assert not db_rows(w.db, "SELECT id FROM route_approvers")
    db_write(w.db, "INSERT INTO route_approvers (route, cidr_id) SELECT '192.168.0.0/16', id "
             "FROM cidrs WHERE name = 'humans'")
    w.early.innernet("advertise-routes", w.early_if, "192.168.81.0/24", "192.168.82.0/24",
                     "192.168.83.0/24", "--yes")
    listed = admin(w, "list-routes", w.iface).stdout
    assert "192.168.82.0/24 waiting for approval" in listed, listed
    assert "(not applied: the network is locked)" in listed, listed
    db_write(w.db, "UPDATE peer_routes SET approved = 1 WHERE route = '192.168.82.0/24'")
    err = fetch_until(w, w.admin, w.iface, lambda e: "192.168.82.0/24 not signed" in e,
                      "the refusal")
    assert not {"192.168.81.0/24", "192.168.82.0/24"} & set(held(w.admin, w.iface))
    # nor does an admin's next change to early sign what the server approved
    out = admin(w, "approve-routes", w.iface, "--name", "early", "--routes", "192.168.83.0/24",
                "--yes", check=False)
    assert out.returncode != 0 and "differs from its signed record (routes not as signed)" \
        in out.stderr, out.stderr
    assert records(w)["peer:10.66.1.30"]["routes"] == []
    db_write(w.db, "DELETE FROM route_approvers")
    db_write(w.db, "DELETE FROM peer_routes")


def test_an_admin_host_signs_nothing_for_a_name_the_server_moved(w):
    """The hijacker swaps two CIDRs' names and two peers' names in its
    database: an admin's add-association (or add-peer) by name would sign
    the wrong range, a delete-peer by name the wrong peer. The admin's host
    checks every record a change names against its signed record and
    refuses, naming the one the server moved; nothing is signed or deleted."""
    before = records(w)

    def swap(conn, table, a, b):
        for old, new in ((a, "-"), (b, a), ("-", b)):
            conn.execute(f"UPDATE {table} SET name = ? WHERE name = ?", (new, old))
    conn = sqlite3.connect(w.db, timeout=15)
    try:
        with conn:
            swap(conn, "cidrs", "humans", "far")
            swap(conn, "peers", "early", "far")
        out = []

        def refused():
            out[:] = [admin(w, "add-association", w.iface, "humans", "many", "--yes",
                            check=False)]
            return "differs from its signed record" in out[0].stderr or None
        wait_for(refused, 30, "the admin's host refusing the moved name")
        assert out[0].returncode != 0 and out[0].stderr.count("error:") == 1
        assert "the server's CIDR 10.66.3.0/24 differs from its signed record (name not as " \
               "signed): not signing over it" in out[0].stderr, out[0].stderr
        gone = admin(w, "delete-peer", w.iface, "--name", "early", "--yes", check=False)
        assert gone.returncode != 0 and "(name not as signed): not signing over it" \
            in gone.stderr, gone.stderr
        assert records(w) == before
        assert {"early", "far"} <= {n for (n,) in db_rows(w.db, "SELECT name FROM peers")}
    finally:
        with conn:
            swap(conn, "cidrs", "humans", "far")
            swap(conn, "peers", "early", "far")
        conn.close()
        wait_for(lambda: "already associated" in admin(w, "add-association", w.iface, "humans",
                                                       "many", "--yes", check=False).stderr
                 or None, 30, "the names back in the server's view")


def _signed_row(w, subject):
    """A subject's signed record as the server holds it, with its batch."""
    return db_rows(w.db, "SELECT r.payload, b.signer, b.sig, b.hashes FROM lock_records r "
                   "JOIN lock_batches b ON b.id = r.batch_id WHERE r.subject = ?",
                   (subject,))[0]


def _plant(w, subject, payload, signer, sig, hashes):
    """A signed record written into the server's database as the subject's
    current one, with its batch (payload and hashes as stored: JSON text)."""
    db_write(w.db, "INSERT OR IGNORE INTO lock_batches (signer, sig, hashes) VALUES (?, ?, ?)",
             (signer, sig, hashes))
    db_write(w.db, "INSERT OR REPLACE INTO lock_records (subject, payload, batch_id) SELECT ?, ?, "
             "id FROM lock_batches WHERE sig = ?", (subject, payload, sig))


def _plant_signed(w, subject, payload, batch):
    """``payload`` signed in ``batch`` (sign_batch's), planted (_plant)."""
    _plant(w, subject, json.dumps(payload), batch["k"], batch["s"], json.dumps(batch["h"]))


def _replay(w, subject, row):
    """The hijacker puts a signed record from before back, with its batch."""
    _plant(w, subject, *row)


def _stale(out, subject):
    assert out.returncode != 0 and out.stderr.count("error:") == 1, out.stderr
    assert f"signed record of {subject} is older (serial" in out.stderr, out.stderr
    assert "than the newest this host knows" in out.stderr and "not signing over it" \
        in out.stderr, out.stderr


def test_an_admin_host_signs_over_no_older_record_the_server_replays(w):
    """Outside probe, finding 3: a route approved then revoked, a name changed,
    a peer deleted -- each signed -- and the server puts the record (and the
    database) from before back: the admin's next change to that subject,
    or `lock remove` (which signs every record again), would sign it anew,
    newer than the record that undid it, and every client would take it.
    The admin's host knows the newer serial (it signed it) and refuses."""
    I = _innernet()
    S = "peer:10.66.1.30"
    w.early.innernet("advertise-routes", w.early_if, "192.168.91.0/24", "--yes")
    admin(w, "approve-routes", w.iface, "--name", "early", "--routes", "192.168.91.0/24",
          "--yes")
    approved = _signed_row(w, S)
    admin(w, "approve-routes", w.iface, "--name", "early", "--routes", "192.168.91.0/24",
          "--revoke", "--yes")
    revoked = _signed_row(w, S)
    _replay(w, S, approved)
    db_write(w.db, "UPDATE peer_routes SET approved = 1 WHERE route = '192.168.91.0/24'")
    _stale(admin(w, "rename-peer", w.iface, "--name", "early", "--new-name", "early2", "--yes",
                 check=False), "peer 10.66.1.30")
    assert records(w)[S]["routes"] == ["192.168.91.0/24"] and records(w)[S]["name"] == "early"
    _replay(w, S, revoked)
    db_write(w.db, "DELETE FROM peer_routes")
    # a name changed, the older one put back
    admin(w, "rename-peer", w.iface, "--name", "early", "--new-name", "early2", "--yes")
    renamed = _signed_row(w, S)
    _replay(w, S, revoked)
    db_write(w.db, "UPDATE peers SET name = 'early' WHERE ip = '10.66.1.30'")
    _stale(admin(w, "disable-peer", w.iface, "--name", "early", "--yes", check=False),
           "peer 10.66.1.30")
    _replay(w, S, renamed)
    db_write(w.db, "UPDATE peers SET name = 'early2' WHERE ip = '10.66.1.30'")
    admin(w, "rename-peer", w.iface, "--name", "early2", "--new-name", "early", "--yes")
    # a deleted peer brought back, through `lock remove` signing records again
    G = "peer:10.66.1.81"
    admin(w, "add-peer", w.iface, "--name", "ghost", "--cidr", "humans", "--ip", "10.66.1.81",
          "--admin", "false", "--save-config", w.admin.path("ghost.toml"),
          "--invite-expires", "1h", "--yes")
    alive, ghost = _signed_row(w, G), db_rows(w.db, "SELECT * FROM peers WHERE name = 'ghost'")
    admin(w, "delete-peer", w.iface, "--name", "ghost", "--yes")
    tomb = _signed_row(w, G)
    assert json.loads(tomb[0])["deleted"]
    _replay(w, G, alive)
    db_write(w.db, f"INSERT INTO peers VALUES ({', '.join('?' * len(ghost[0]))})", ghost[0])
    second = I.lock_keypair()[1]
    admin(w, "lock", "add", w.iface, "--key", second, "--key-name", "second")
    out = admin(w, "lock", "remove", w.iface, "--key", second)
    assert "0 records signed again" in out.stderr, out.stderr   # second signed none
    assert records(w)[G] == json.loads(alive[0])        # nothing signed over it
    _replay(w, G, tomb)
    db_write(w.db, "DELETE FROM peers WHERE name = 'ghost'")


def test_lock_remove_signs_again_no_record_of_the_removed_key_it_cannot_vouch_for(w):
    """Third outside attack, finding 1 (variant B): a second admin (key K2)
    added a peer and deleted it since; the hijacked server replays the peer's
    older record, signed by K2. `lock remove --key K2` on this admin's host
    signed every record the server showed again -- that one too, alive with
    a fresh serial, newer than its deletion. Now it signs again only the
    removed key's records this host knows as the newest, and names the rest."""
    I = _innernet()
    G = "peer:10.66.1.82"
    k2_private, k2 = I.lock_keypair()
    admin(w, "lock", "add", w.iface, "--key", k2, "--key-name", "adm2")
    wg = I.public_key(I.generate_private_key())
    alive = I.peer_payload(w.net, 10 ** 12, ip="10.66.1.82", key=wg, name="pf",
                           cidr="10.66.1.0/24")
    _plant_signed(w, G, alive, I.sign_batch(w.net, k2_private, [alive]))
    db_write(w.db, "INSERT INTO peers (name, ip, cidr_id, public_key, is_redeemed) SELECT "
             "'pf', '10.66.1.82', id, ?, 1 FROM cidrs WHERE name = 'humans'", (wg,))
    try:
        out = admin(w, "lock", "remove", w.iface, "--key", k2)
        assert "0 records signed again" in out.stderr, out.stderr
        assert "1 record(s) the removed key signed last are not signed again" in out.stderr \
            and "peer 10.66.1.82" in out.stderr, out.stderr
        assert records(w)[G] == alive                   # not made newest again
        assert I.lock_short(k2) not in admin(w, "lock", "status", w.iface).stdout
    finally:
        db_write(w.db, "DELETE FROM peers WHERE ip = '10.66.1.82'")
        db_write(w.db, "DELETE FROM lock_records WHERE subject = ?", (G,))


def test_lock_remove_signs_the_removed_keys_records_again_as_they_are(w):
    """Fifth outside attack, finding 4: a server that hid another admin's
    deletion from this host had `lock remove` sign the deleted peer's older
    record again with a fresh serial, newer than the deletion, so it came
    back on every client. It now signs the same records again, serials
    included (a new batch over them): a client that saw the newer record
    still refuses the older one."""
    I = _innernet()
    E = "peer:10.66.1.30"
    k3_private, k3 = I.lock_keypair()
    admin(w, "lock", "add", w.iface, "--key", k3, "--key-name", "adm3")
    rec = dict(records(w)[E], n=records(w)[E]["n"] + 1, r=I.lock_salt())
    _plant_signed(w, E, rec, I.sign_batch(w.net, k3_private, [rec]))
    fetch_until(w, w.admin, w.iface, lambda e: I.load_client_lock(w.admin.path(
        "client", "lib", f"{w.iface}.lock.json"))["known"].get(E, [0])[0] == rec["n"],
        "adm3's record verified here")
    backup = {t: db_rows(w.db, f"SELECT * FROM {t}") for t in LOCK_TABLES}
    out = admin(w, "lock", "remove", w.iface, "--key", k3)
    assert "1 records signed again" in out.stderr, out.stderr

    def signer():
        return db_rows(w.db, "SELECT b.signer FROM lock_records r JOIN lock_batches b "
                       "ON b.id = r.batch_id WHERE r.subject = ?", (E,))[0][0]
    assert records(w)[E] == rec and signer() != k3    # the same record, serial and all
    out = admin(w, "fetch", w.iface, "--no-write-hosts")
    assert "'early'" not in out.stderr, out.stderr
    # The server's lock restored from a backup made just before the removal
    # (outside round 33, Y33-1): the chain entry alone, sent again, left the
    # record signed by the removed key only, refused everywhere. The records
    # the removal signed again go with it -- also when another admin's host
    # sent the chain first, so that this one found it whole (round 35, R35-2).
    def restore(tables):
        for t in tables:
            db_write(w.db, f"DELETE FROM {t}")
            for row in backup[t]:
                db_write(w.db, f"INSERT INTO {t} VALUES ({', '.join('?' * len(row))})", row)
    for tables, said in ((set(LOCK_TABLES) - {"lock_chain"}, "had lost the signature of 1 "
                          "record(s)"), (LOCK_TABLES, "sending them again")):
        restore(tables)
        assert signer() == k3
        out = admin(w, "lock", "log", w.iface)
        assert said in out.stderr and "not taken again" not in out.stderr, out.stderr
        assert records(w)[E] == rec and signer() != k3
    out = admin(w, "fetch", w.iface, "--no-write-hosts")
    assert "'early'" not in out.stderr, out.stderr


def test_a_host_that_sees_no_one_under_lock_stays_unhealthy_until_it_does(w):
    """Outside rounds 35 and 36, R35-4 and S36-6: a host whose own record the
    server holds signed by no trusted key (left out here; a restore from
    before it was signed does the same) refuses every peer but the server;
    `status` said healthy, then, after R35-4's fix, unhealthy for one sync
    only: the next asked "unchanged?", was told so, and cleared the problem.
    It stays until the record is back."""
    S = "peer:10.66.1.30"
    row = db_rows(w.db, "SELECT subject, payload, batch_id FROM lock_records WHERE subject = ?",
                  (S,))[0]
    db_write(w.db, "DELETE FROM lock_records WHERE subject = ?", (S,))
    try:
        for _ in range(2):
            wait_for(lambda: "own record is not signed" in w.early.innernet(
                "fetch", w.early_if, "--no-write-hosts").stderr or None, 30, "the refusal")
            st = w.early.innernet("status", w.early_if, check=False)
            assert st.returncode == 1 and "own record is not signed" in st.stdout, st.stdout
    finally:
        db_write(w.db, "INSERT INTO lock_records (subject, payload, batch_id) VALUES (?, ?, ?)",
                 row)
    wait_for(lambda: w.early.innernet("fetch", w.early_if, "--no-write-hosts").returncode == 0
             and w.early.innernet("status", w.early_if, check=False).returncode == 0 or None,
             30, "early healthy again")


def test_a_joined_peer_the_server_shows_as_an_unused_invitation_keeps_its_address(w):
    """Fifth outside attack, findings 1 and 2: the server marks a joined
    peer as an invitation never redeemed (expired, or not): an admin's
    add-peer at its address, or its reinvite, would sign a new invitation
    over it and cut it off everywhere. Its signed record names its key, not
    an invitation's: the admin's host refuses both, and nothing is signed."""
    before = records(w)
    db_write(w.db, "UPDATE peers SET is_redeemed = 0, invite_expires = 1 WHERE name = 'early'")
    try:
        out = []

        def refused():
            out[:] = [admin(w, "add-peer", w.iface, "--name", "jack", "--cidr", "humans",
                            "--ip", "10.66.1.30", "--admin", "false", "--invite-expires", "1h",
                            "--save-config", w.admin.path("jack.toml"), "--yes", check=False)]
            return "a new invitation would take" in out[0].stderr or None
        wait_for(refused, 30, "add-peer refused at early's address")
        assert "a new invitation would take peer 10.66.1.30, but its signed record is a " \
               "joined peer's: not signing it" in out[0].stderr, out[0].stderr
        assert out[0].stderr.count("error:") == 1
        db_write(w.db, "UPDATE peers SET invite_expires = 4102444800 WHERE name = 'early'")
        wait_for(lambda: "a new invitation would take peer 10.66.1.30" in admin(
            w, "reinvite", w.iface, "--name", "early", "--invite-expires", "1h",
            "--save-config", w.admin.path("early2.toml"), "--yes", check=False).stderr
            or None, 30, "reinvite refused for early")
        assert records(w) == before
        assert not os.path.exists(w.admin.path("jack.toml"))
    finally:
        db_write(w.db, "UPDATE peers SET is_redeemed = 1, invite_expires = NULL "
                 "WHERE name = 'early'")


def test_an_unrelated_change_signs_no_peer_another_admin_deleted_out_of_view_again(w):
    """Third outside attack, finding 1: a second admin (key K2) invited pf in a
    CIDR this admin cannot see (far) and deleted it since; the hijacked
    server puts pf's older signed record, its enrollment and its row back.
    This admin's next unrelated change (add-cidr) signed every invited
    peer's record whose enrollment it holds again, with a fresh serial --
    pf alive, newer than its deletion, taken by every client. Now its host
    signs again only what it verified or signed itself at that serial."""
    I = _innernet()
    P, ip = "peer:10.66.3.40", "10.66.3.40"
    k2_private, k2 = I.lock_keypair()
    admin(w, "lock", "add", w.iface, "--key", k2, "--key-name", "adm2")
    auth_private, auth = I.lock_keypair()
    wg = I.public_key(I.generate_private_key())
    expires = int(time.time()) + 3600
    alive = I.peer_payload(w.net, 10 ** 12, ip=ip, key=I.lock_auth(auth, expires), name="pf",
                           cidr="10.66.3.0/24")
    _plant_signed(w, P, alive, I.sign_batch(w.net, k2_private, [alive]))
    db_write(w.db, "INSERT INTO lock_enrollments (ip, enrollment) VALUES (?, ?)",
             (ip, json.dumps(I.sign_enrollment(w.net, ip, wg, auth_private))))
    db_write(w.db, "INSERT INTO peers (name, ip, cidr_id, public_key, is_redeemed) SELECT "
             "'pf', ?, id, ?, 1 FROM cidrs WHERE name = 'far'", (ip, wg))
    try:
        admin(w, "add-cidr", w.iface, "--name", "scratch", "--cidr", "10.66.5.0/24",
              "--parent", w.net, "--yes")
        assert records(w)[P] == alive                   # not signed again, not made newest
        admin(w, "delete-cidr", w.iface, "--name", "scratch", "--yes")
    finally:
        db_write(w.db, "DELETE FROM peers WHERE ip = ?", (ip,))
        db_write(w.db, "DELETE FROM lock_enrollments WHERE ip = ?", (ip,))
        db_write(w.db, "DELETE FROM lock_records WHERE subject = ?", (P,))
        admin(w, "lock", "remove", w.iface, "--key", k2)


def test_approve_routes_signs_a_route_the_server_had_approved_alone(w):
    """Outside probe, finding 5: the database approved a route no admin
    signed; approve-routes of that very route said "approved" and signed
    nothing, so no locked client installed it. It signs it now."""
    S = "peer:10.66.1.30"
    w.early.innernet("advertise-routes", w.early_if, "192.168.92.0/24", "--yes")
    db_write(w.db, "UPDATE peer_routes SET approved = 1 WHERE route = '192.168.92.0/24'")
    assert records(w)[S]["routes"] == []
    # --yes without --routes would sign whatever the server says early advertises
    out = admin(w, "approve-routes", w.iface, "--name", "early", "--yes", check=False)
    assert out.returncode != 0 and out.stderr.count("error:") == 1, out.stderr
    assert "approve-routes --yes needs --routes" in out.stderr, out.stderr
    out = admin(w, "approve-routes", w.iface, "--name", "early", "--routes", "192.168.92.0/24",
                "--yes")
    assert "192.168.92.0/24 approved" in out.stderr, out.stderr
    assert records(w)[S]["routes"] == ["192.168.92.0/24"]
    err = fetch_until(w, w.admin, w.iface, lambda e: "192.168.92.0/24" in held(w.admin, w.iface),
                      "the route signed")
    assert "lock refused peer 'early'" not in err, err
    admin(w, "approve-routes", w.iface, "--name", "early", "--routes", "192.168.92.0/24",
          "--revoke", "--yes")
    db_write(w.db, "DELETE FROM peer_routes")


def test_a_change_the_server_shows_made_already_is_checked_against_the_newest_record(w):
    """Nineteenth outside round, T1-T3: the server showed a change made
    already, so there was nothing to sign, and the verb either went on
    unsigned and said it was done (approve-routes --revoke; apply, the
    association the file removes hidden) or said "already disabled" -- each
    on an older signed record served back, or the record left out, that no
    check looked at when nothing was signed. Every locked client kept the
    route, the peer, the association."""
    S, route = "peer:10.66.1.30", "192.168.92.0/24"
    w.early.innernet("advertise-routes", w.early_if, route, "--yes")
    unapproved = _signed_row(w, S)
    admin(w, "approve-routes", w.iface, "--name", "early", "--routes", route, "--yes")
    approved = _signed_row(w, S)
    revoke = ("approve-routes", w.iface, "--name", "early", "--routes", route, "--revoke",
              "--yes")
    try:
        _replay(w, S, unapproved)                         # T1: shown revoked already
        db_write(w.db, "UPDATE peer_routes SET approved = 0 WHERE route = ?", (route,))
        _stale(admin(w, *revoke, check=False), "peer 10.66.1.30")
        db_write(w.db, "DELETE FROM lock_records WHERE subject = ?", (S,))
        out = admin(w, *revoke, check=False)
        assert out.returncode != 0 and "the server's peer 10.66.1.30 differs from its signed " \
            "record (the server leaves its signed record out)" in out.stderr, out.stderr
    finally:
        _replay(w, S, approved)
        db_write(w.db, "UPDATE peer_routes SET approved = 1 WHERE route = ?", (route,))
    admin(w, *revoke)                                   # signed: the route revoked
    assert route not in records(w)[S]["routes"]
    admin(w, "disable-peer", w.iface, "--name", "early", "--yes")          # T2
    disabled = _signed_row(w, S)
    admin(w, "enable-peer", w.iface, "--name", "early", "--yes")
    enabled = _signed_row(w, S)
    try:
        _replay(w, S, disabled)
        db_write(w.db, "UPDATE peers SET is_disabled = 1 WHERE ip = '10.66.1.30'")
        _stale(admin(w, "disable-peer", w.iface, "--name", "early", "--yes", check=False),
               "peer 10.66.1.30")
    finally:
        _replay(w, S, enabled)
        db_write(w.db, "UPDATE peers SET is_disabled = 0 WHERE ip = '10.66.1.30'")
    assert not records(w)[S]["disabled"]
    # T3: the association of humans and many hidden; the export leaves it out
    row = db_rows(w.db, "SELECT a.* FROM associations a JOIN cidrs x ON x.id = a.cidr_id_2 "
                        "WHERE x.name = 'many' OR a.cidr_id_1 = x.id")[0]
    db_write(w.db, "DELETE FROM associations WHERE id = ?", (row[0],))
    try:
        path = w.admin.path("hidden.toml")
        open(path, "w").write(admin(w, "export", w.iface).stdout)
        out = admin(w, "apply", w.iface, path, "--yes", check=False)
        assert out.returncode != 0 and "the server's the association of 10.66.1.0/24 and " \
            "10.66.8.0/22 differs from its signed record (the server leaves it out)" \
            in out.stderr, out.stderr
        assert "applied" not in out.stderr
    finally:
        db_write(w.db, f"INSERT INTO associations VALUES ({', '.join('?' * len(row))})", row)
    assert not records(w)["assoc:10.66.1.0/24|10.66.8.0/22"]["deleted"]
    # Twentieth round, U1: apply's change is worked out on the signed records,
    # not on the server's view showing the file's change made already.
    path = w.admin.path("made.toml")

    def apply_export():
        open(path, "w").write(admin(w, "export", w.iface).stdout)
        return admin(w, "apply", w.iface, path, "--yes", check=False)
    db_write(w.db, "UPDATE peers SET is_disabled = 1 WHERE ip = '10.66.1.30'")
    try:
        out = apply_export()                              # "disabled" by the server alone
        assert out.returncode != 0 and "the server's peer 10.66.1.30 differs from its signed " \
            "record (disabled flag not as signed)" in out.stderr, out.stderr
    finally:
        db_write(w.db, "UPDATE peers SET is_disabled = 0 WHERE ip = '10.66.1.30'")
    admin(w, "approve-routes", w.iface, "--name", "early", "--routes", route, "--yes")
    approved = _signed_row(w, S)
    db_write(w.db, "UPDATE peer_routes SET approved = 0 WHERE route = ?", (route,))
    out = apply_export()                          # shown revoked already: the revocation signed
    assert out.returncode == 0, out.stderr
    assert route not in records(w)[S]["routes"]
    revoked = _signed_row(w, S)
    _replay(w, S, approved)                       # an older record served back
    try:
        _stale(apply_export(), "peer 10.66.1.30")
    finally:
        _replay(w, S, revoked)


def test_a_deleted_peers_key_kept_by_its_pin_is_cut_off_not_given_the_new_peers_place(w):
    """Outside round 22, V22-1: pete is deleted (its key stolen, say) and nina
    invited at its address; the hijacked server hides pete's deletion from
    early, which pinned pete. early refuses nina's key (the pin) -- and kept
    pete's key live under nina's signed name and routes, so its traffic for
    nina went to whoever holds pete's key. Under lock a pinned key the
    signed record does not name is kept cut off, and `status` says so."""
    ip = "10.66.1.41"
    path = w.admin.path("pete.toml")
    admin(w, "add-peer", w.iface, "--name", "pete", "--cidr", "humans", "--ip", ip,
          "--admin", "false", "--invite-expires", "1h", "--save-config", path, "--yes")
    pete = w.lab.add_host("pete")
    pete.innernet("install", "--name", w.lab.ifname("pete"), "--no-write-hosts", path)
    pete_key = db_rows(w.db, "SELECT public_key FROM peers WHERE name = 'pete'")[0][0]
    wait_for(lambda: held(w.early, w.early_if).get(f"{ip}/32") == pete_key or w.early.innernet(
        "fetch", w.early_if, "--no-write-hosts") and None, 30, "early to pin pete")
    admin(w, "delete-peer", w.iface, "--name", "pete", "--reuse-after", "0s", "--yes")
    path = w.admin.path("nina.toml")
    admin(w, "add-peer", w.iface, "--name", "nina", "--cidr", "humans", "--ip", ip,
          "--admin", "false", "--invite-expires", "1h", "--save-config", path, "--yes")
    nina = w.lab.add_host("nina")
    nina.innernet("install", "--name", w.lab.ifname("nina"), "--no-write-hosts", path)
    row = db_rows(w.db, "SELECT name, ip, public_key, cidr_id, deleted_at, reuse_after "
                  "FROM deleted_peers WHERE ip = ?", (ip,))[0]
    db_write(w.db, "DELETE FROM deleted_peers WHERE ip = ?", (ip,))        # the hijacker
    err = fetch_until(w, w.early, w.early_if, lambda e: "refused peer 'nina'" in e,
                      "early to refuse nina's key")
    assert f"PINNING ERROR: refused peer 'nina' ({ip})" in err, err
    assert f"{ip}/32" not in held(w.early, w.early_if)        # neither key: cut off
    st = w.early.innernet("status", w.early_if, check=False)
    assert st.returncode == 1 and "NOT HEALTHY" in st.stdout, st.stdout
    assert f"the server sent peer nina ({ip}) with a key this host refused" in st.stdout
    # the deletion shown again (an honest server): the pin goes once its
    # quarantine is over (here at once: INNERNET_MIN_QUARANTINE), nina comes
    db_write(w.db, "INSERT INTO deleted_peers (name, ip, public_key, cidr_id, deleted_at, "
             "reuse_after) VALUES (?, ?, ?, ?, ?, ?)", row)
    nina_key = db_rows(w.db, "SELECT public_key FROM peers WHERE name = 'nina'")[0][0]
    out = []

    def nina_there():
        out[:] = [w.early.exec(["env", "INNERNET_MIN_QUARANTINE=0"] + w.early.innernet_argv(
            "fetch", w.early_if, "--no-write-hosts"), check=False)]
        return held(w.early, w.early_if).get(f"{ip}/32") == nina_key or None
    wait_for(nina_there, 30, f"nina at early: {out and out[0].stderr}")
    assert w.early.innernet("status", w.early_if, check=False).returncode == 0


def test_a_peer_joins_under_lock_and_lock_add_remove_log_status_disable(w):
    I = _innernet()
    path = w.admin.path("alice.toml")
    admin(w, "add-peer", w.iface, "--name", "alice", "--cidr", "humans", "--ip", ALICE_IP,
          "--admin", "false", "--save-config", path, "--invite-expires", "1h", "--yes")
    alice = w.lab.add_host("alice")
    aif = w.lab.ifname("alice")
    out = alice.innernet("install", "--name", aif, "--no-write-hosts", path)
    assert "lock refused" not in out.stderr, out.stderr
    assert len(device(alice, aif)["peers"]) >= MANY + 1             # all signed, all seen
    status = alice.innernet("lock", "status", aif).stdout
    assert "locked" in status and "0 record(s) refused" in status
    # approve-routes under lock: alice advertises, an admin approves (signs),
    # and the admin's own client installs the route
    alice.innernet("advertise-routes", aif, "192.168.80.0/24", "--yes")
    admin(w, "approve-routes", w.iface, "--name", "alice", "--routes", "192.168.80.0/24",
          "--yes")
    out = admin(w, "fetch", w.iface, "--no-write-hosts")
    assert "lock refused" not in out.stderr, out.stderr
    assert "192.168.80.0/24" in {a for p in device(w.admin, w.iface)["peers"]
                                 for a in p["allowed_ips"]}
    # a key rotation under lock: taken along alice's own proof, not signed anew
    alice.innernet("rotate-key", aif, "--yes")
    new_key = db_rows(w.db, "SELECT public_key FROM peers WHERE name = 'alice'")[0][0]
    out = admin(w, "fetch", w.iface, "--no-write-hosts")
    assert "lock refused" not in out.stderr, out.stderr
    assert {a: p["public_key"] for p in device(w.admin, w.iface)["peers"]
            for a in p["allowed_ips"]}[f"{ALICE_IP}/32"] == new_key
    # alice then withdraws the route: the admin host's next changes sign her
    # record again with her new key, without the route (outside round 35,
    # R35-7: every signing change of that host was refused, "does not match")
    alice.innernet("advertise-routes", aif, "--clear", "--yes")
    admin(w, "fetch", w.iface, "--no-write-hosts")
    admin(w, "add-cidr", w.iface, "--name", "r35", "--cidr", "10.66.35.0/24", "--parent", w.net,
          "--yes")
    admin(w, "delete-cidr", w.iface, "--name", "r35", "--yes")
    assert records(w)[f"peer:{ALICE_IP}"]["routes"] == [] and \
        records(w)[f"peer:{ALICE_IP}"]["key"] == new_key
    out = alice.innernet("fetch", aif, "--no-write-hosts")
    assert "lock refused" not in out.stderr, out.stderr
    second_private, second = I.lock_keypair()
    admin(w, "lock", "add", w.iface, "--key", second, "--key-name", "second")
    # the admin's host keeps its own update: its status says so at once; a
    # server serving the chain from before it (its database restored from a
    # backup) is sent the entry again by the next admin verb (outside round
    # 32, X32-1); one serving another chain is refused (its fetch too,
    # adopt_chain: test_lock.py::test_a_client_takes_only_a_chain_that_extends_its_own)
    n = len(db_rows(w.db, "SELECT seq FROM lock_chain"))
    assert f"({n} entries)" in admin(w, "lock", "status", w.iface).stdout
    seq, entry = db_rows(w.db, "SELECT seq, entry FROM lock_chain ORDER BY seq DESC")[0]

    def healed():
        return [e for (e,) in db_rows(w.db, "SELECT entry FROM lock_chain ORDER BY seq")][-1] \
            == entry and len(db_rows(w.db, "SELECT seq FROM lock_chain")) == n
    db_write(w.db, "DELETE FROM lock_chain WHERE seq = ?", (seq,))
    out = admin(w, "fetch", w.iface, "--no-write-hosts", check=False)
    assert out.returncode == 1 and "ends before ours (its database restored from a backup?): " \
        "kept ours; 'innernet lock log' on an admin's host sends it" in out.stderr, out.stderr
    assert not healed()                    # a sync sends nothing (outside round 34, Q34-2)
    out = admin(w, "lock", "log", w.iface)
    assert "lacks the last 1 entries of this host's copy" in out.stderr, out.stderr
    assert healed()
    log = admin(w, "lock", "log", w.iface).stdout
    assert "add" in log and I.lock_short(second) in log
    admin(w, "lock", "remove", w.iface, "--key", second)
    out = alice.innernet("fetch", aif, "--no-write-hosts")
    assert "lock refused" not in out.stderr, out.stderr
    assert "remove" in admin(w, "lock", "log", w.iface).stdout
    # disabled with the secret: a peer no key signed is then taken again
    out = admin(w, "lock", "disable", w.iface, "not-the-secret", check=False)
    assert out.returncode != 0 and "secret is wrong" in out.stderr
    assert "visible to local users (ps)" in out.stderr      # the argument still works, warned
    secret_file = w.admin.path("secret")
    with open(secret_file, "w") as f:
        f.write(w.secret + "\n")
    out = admin(w, "lock", "disable", w.iface, "--secret-file", secret_file)
    assert "visible to local users" not in out.stderr
    out = admin(w, "lock", "init", w.iface, check=False)
    assert out.returncode != 0 and "was disabled with its secret" in out.stderr \
        and "locked already" not in out.stderr, out.stderr
    conn = sqlite3.connect(w.db, timeout=15)
    with conn:
        conn.execute("INSERT INTO peers (name, ip, cidr_id, public_key, is_redeemed) SELECT "
                     "'late', '10.66.1.50', id, ?, 1 FROM cidrs WHERE name = 'humans'",
                     (I.public_key(I.generate_private_key()),))
    conn.close()
    wait_for(lambda: "10.66.1.50/32" in {
        a for p in device(alice, aif)["peers"] for a in p["allowed_ips"]} or
        alice.innernet("fetch", aif, "--no-write-hosts") and False, 30, "the unsigned peer")
    assert "lock disabled" in alice.innernet("lock", "status", aif).stdout
