"""Admin calls a local user of an admin's host cannot make (issue 28, item 6).

The proof is pure logic over the Keys section; the server's rule (a peer that
has shown a proof must prove every admin call; others keep innernet's rule)
is driven through Coordinator.handle, as tests/test_api.py does. The end to
end proofs, with `nobody` on a real admin host, are in
tests/e2e/test_admin_proof.py.
"""
import json
import time

import pytest

import innernet
from innernet import Coordinator, Store
from helpers import (HEAVY, IPS, ROOT, call, cli_network, make_coordinator, peer_contents,
                     serve_on_loopback)

H = innernet.ADMIN_PROOF_HEADER


def pair():
    k = innernet.generate_private_key()
    return k, innernet.public_key(k)


@pytest.fixture
def co(tmp_path):
    """The fixture network, its admin on a key this test holds (co.admin_key)."""
    c = make_coordinator(tmp_path)
    c.admin_key, pub = pair()
    c.store.conn.execute("UPDATE peers SET public_key = ? WHERE name = 'admin'", (pub,))
    c.admin_id = c.store.peer_by_ip(IPS["admin"]).id
    return c


def proof(co, method, target, body=None, private=None, **kw):
    mac = innernet.admin_proof_key(innernet.shared_secret(private or co.admin_key,
                                                          co.public_key))
    return innernet.admin_proof(mac, method, target, body, **kw)


def admin_call(co, method, target, body=None, private=None, header=None, **kw):
    data = None if body is None else json.dumps(body).encode()
    if header is None:
        header = proof(co, method, target, data, private, **kw)
    return call(co, method, target, body=body, headers={H: header})


# -- the proof itself ---------------------------------------------------------------

@pytest.mark.parametrize("backend", ["pynacl", "python"])
def test_both_sides_derive_the_same_key_and_the_mac_binds_every_part(monkeypatch, backend):
    if backend == "python":
        monkeypatch.setattr(innernet, "_nacl_bindings", False)
    elif innernet.key_backend() != "pynacl":
        pytest.skip("PyNaCl is not installed")
    a, A = pair()
    s, S = pair()
    client = innernet.admin_proof_key(innernet.shared_secret(a, S))
    server = innernet.admin_proof_key(innernet.shared_secret(s, A))
    assert client == server and len(client) == 32
    header = innernet.admin_proof(client, "POST", "/v1/admin/peers", b'{"x":1}')
    p = innernet.parse_admin_proof(header)
    assert p and innernet.admin_proof_valid(server, "POST", "/v1/admin/peers", b'{"x":1}', p)
    stamp, nonce, mac = p
    assert abs(stamp - time.time() * 1000) < 5000 and len(nonce) == 32 and len(mac) == 64
    other = innernet.admin_proof_key(innernet.shared_secret(pair()[0], S))
    for args in [(other, "POST", "/v1/admin/peers", b'{"x":1}', p),            # another key
                 (server, "PUT", "/v1/admin/peers", b'{"x":1}', p),            # method
                 (server, "POST", "/v1/admin/cidrs", b'{"x":1}', p),           # target
                 (server, "POST", "/v1/admin/peers", b'{"x":2}', p),           # body
                 (server, "POST", "/v1/admin/peers", b'{"x":1}', (stamp + 1, nonce, mac)),
                 (server, "POST", "/v1/admin/peers", b'{"x":1}', (stamp, "0" * 32, mac))]:
        assert not innernet.admin_proof_valid(*args)
    # two proofs of the same request differ (a fresh nonce each)
    assert innernet.admin_proof(client, "GET", "/v1/admin/peers", b"") != \
        innernet.admin_proof(client, "GET", "/v1/admin/peers", b"")


@pytest.mark.parametrize("text", [None, "", "v1", "v2 1 " + "0" * 32 + " " + "0" * 64,
                                  "v1 x " + "0" * 32 + " " + "0" * 64,
                                  "v1 1 " + "0" * 31 + " " + "0" * 64,
                                  "v1 1 " + "0" * 32 + " " + "0" * 63,
                                  "v1 1 " + "0" * 32 + " " + "0" * 64 + " extra",
                                  "v1 1 " + "0" * 32 + " " + "0" * 64 + "\n",
                                  "v1 1 " + "G" * 32 + " " + "0" * 64, "v1 " + "1" * 300])
def test_malformed_proofs_parse_to_none(text):
    assert innernet.parse_admin_proof(text) is None


# -- the server's rule -------------------------------------------------------------

def test_a_peer_never_seen_with_a_proof_keeps_innernets_rule(co):
    assert call(co, "GET", "/v1/admin/peers")[0] == 200
    assert call(co, "POST", "/v1/admin/peers",
                body=peer_contents("fresh", "10.80.64.9", 4))[0] == 201
    assert not co.store.proves_admin(co.admin_id)


def test_once_a_peer_has_proved_a_call_every_admin_call_needs_a_proof(co):
    assert admin_call(co, "GET", "/v1/admin/peers")[0] == 200
    assert co.store.proves_admin(co.admin_id)
    status, body = call(co, "GET", "/v1/admin/peers")           # a downgrade
    assert status == 403 and H in body["error"] and "root" in body["error"]
    status, body = call(co, "POST", "/v1/admin/peers",
                        body=peer_contents("sneaky", "10.80.64.9", 4))
    assert status == 403 and co.store.peer_by_ip("10.80.64.9") is None
    assert admin_call(co, "POST", "/v1/admin/peers",
                      body=peer_contents("fresh", "10.80.64.9", 4))[0] == 201
    # user routes are as before, with or without a proof
    assert call(co, "GET", "/v1/user/state")[0] == 200
    (row,) = [e for e in co.store.audit() if e.action == "admin-proof"]
    assert row.actor == f"admin ({IPS['admin']})"


def test_a_wrong_proof_is_refused_and_marks_nothing(co):
    status, body = admin_call(co, "GET", "/v1/admin/peers", private=pair()[0])
    assert status == 403 and "private key" in body["error"]
    status, body = admin_call(co, "GET", "/v1/admin/peers", header="v1 garbage")
    assert status == 403 and "malformed" in body["error"]
    # a proof made for another request
    data = json.dumps(peer_contents("a", "10.80.64.9", 4)).encode()
    header = proof(co, "POST", "/v1/admin/peers", data)
    assert call(co, "POST", "/v1/admin/peers", body=peer_contents("b", "10.80.64.10", 4),
                headers={H: header})[0] == 403
    assert call(co, "POST", "/v1/admin/cidrs", raw=data, headers={H: header})[0] == 403
    assert not co.store.proves_admin(co.admin_id)


def test_a_replayed_proof_is_refused(co):
    header = proof(co, "GET", "/v1/admin/peers")
    assert admin_call(co, "GET", "/v1/admin/peers", header=header)[0] == 200
    status, body = admin_call(co, "GET", "/v1/admin/peers", header=header)
    assert status == 403 and "replayed" in body["error"]


def test_stale_and_future_stamps_are_refused_within_the_skew_window_accepted(co):
    now = int(time.time() * 1000)
    w = innernet.ADMIN_PROOF_WINDOW * 1000
    co.proofs.started = now - 10 * w          # a server that has run for a while
    for stamp in (now - w - 2000, now + w + 2000):
        status, body = admin_call(co, "GET", "/v1/admin/peers", stamp=stamp)
        assert status == 403 and "clock" in body["error"]
    for stamp in (now - w + 5000, now + w - 5000):          # skew either way
        assert admin_call(co, "GET", "/v1/admin/peers", stamp=stamp)[0] == 200


def test_a_proof_made_before_the_server_started_is_refused(co):
    """The nonces of the previous process are gone: what it may have seen is refused."""
    header = proof(co, "GET", "/v1/admin/peers", stamp=co.proofs.started - 1)
    status, body = admin_call(co, "GET", "/v1/admin/peers", header=header)
    assert status == 403 and "before the server started" in body["error"]


def test_a_future_dated_proof_captured_before_a_restart_is_refused_after_it(co, tmp_path):
    """Review item 2: the admin's clock is 100 s ahead, so its proofs are dated
    after the restarted server's start; the newest stamp accepted from that
    peer is kept in the database, and a proof not newer than it is refused."""
    ahead = int(time.time() * 1000) + 100_000
    target = f"/v1/admin/peers/{co.admin_id}"
    body = peer_contents("admin", IPS["admin"], 3, is_admin=True)
    body["public_key"] = innernet.public_key(co.admin_key)
    captured = proof(co, "PUT", target, json.dumps(body).encode(), stamp=ahead)
    assert admin_call(co, "PUT", target, body, header=captured)[0] == 204
    co.store.close()
    store = Store(str(tmp_path / "test.db"))
    again = Coordinator(store, co.config, "test")
    again.admin_key = co.admin_key
    assert again.proofs.started < ahead                    # the old rule lets it through
    status, answer = admin_call(again, "PUT", target, body, header=captured)
    assert status == 403 and "not newer" in answer["error"]
    # the admin's next calls, dated later on its own clock, are taken
    assert admin_call(again, "PUT", target, body, stamp=ahead + 1000)[0] == 204
    assert store.admin_proof_stamps() == {co.admin_id: ahead + 1000}
    store.delete_peer(co.admin_id, 0)
    assert store.admin_proof_stamps() == {}


def test_old_nonces_are_forgotten_and_the_nonce_store_is_bounded(co, monkeypatch):
    now = time.time()
    w = innernet.ADMIN_PROOF_WINDOW
    co.proofs.started = 0
    pub = innernet.public_key(co.admin_key)
    mac = co.proofs.mac_key(pub)
    for i in range(5):
        h = innernet.admin_proof(mac, "GET", "/v1/admin/peers", b"", stamp=int(now * 1000) + i)
        co.proofs.verify(pub, "GET", "/v1/admin/peers", b"", h, now=now)
    assert len(co.proofs._nonces) == 5
    later = now + w + 10
    h = innernet.admin_proof(mac, "GET", "/v1/admin/peers", b"", stamp=int(later * 1000))
    co.proofs.verify(pub, "GET", "/v1/admin/peers", b"", h, now=later)
    assert len(co.proofs._nonces) == 1
    monkeypatch.setattr(innernet, "ADMIN_PROOF_NONCES", 1)
    h = innernet.admin_proof(mac, "GET", "/v1/admin/peers", b"", stamp=int(later * 1000))
    with pytest.raises(innernet.InnernetError) as e:
        co.proofs.verify(pub, "GET", "/v1/admin/peers", b"", h, now=later)
    assert e.value.status == 429


def test_the_shared_secret_is_computed_once_per_peer_key(co, monkeypatch):
    calls = []
    real = innernet.shared_secret
    monkeypatch.setattr(innernet, "shared_secret", lambda a, b: calls.append(b) or real(a, b))
    for _ in range(5):
        assert admin_call(co, "GET", "/v1/admin/peers")[0] == 200
    server_side = [k for k in calls if k == innernet.public_key(co.admin_key)]
    assert len(server_side) == 1


def test_the_proof_follows_a_rotated_key(co):
    assert admin_call(co, "GET", "/v1/admin/peers")[0] == 200
    new, new_pub = pair()
    co.store.rotate_key(co.admin_id, new_pub, {})
    assert admin_call(co, "GET", "/v1/admin/peers")[0] == 403          # the old key
    assert admin_call(co, "GET", "/v1/admin/peers", private=new)[0] == 200
    assert call(co, "GET", "/v1/admin/peers")[0] == 403                # still marked


def test_the_mark_survives_a_restart_and_goes_with_the_peer(co, tmp_path):
    assert admin_call(co, "GET", "/v1/admin/peers")[0] == 200
    co.store.close()
    store = Store(str(tmp_path / "test.db"))
    again = Coordinator(store, co.config, "test")
    status, body = call(again, "GET", "/v1/admin/peers")
    assert status == 403 and H in body["error"]
    tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
    assert "admin_provers" in tables and store.proves_admin(co.admin_id)
    store.delete_peer(co.admin_id, 0)
    assert not store.proves_admin(co.admin_id)


def test_a_database_without_the_table_gets_it(tmp_path):
    c = make_coordinator(tmp_path)
    c.store.conn.execute("DROP TABLE admin_provers")
    version = c.store.conn.execute("PRAGMA user_version").fetchone()[0]
    c.store.close()
    store = Store(str(tmp_path / "test.db"))
    assert store.proves_admin(1) is False
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == version


def test_the_server_cli_can_lift_the_mark(co):
    assert admin_call(co, "GET", "/v1/admin/peers")[0] == 200
    co.store.require_admin_proof(co.admin_id, False)
    assert call(co, "GET", "/v1/admin/peers")[0] == 200


def test_a_redemption_with_a_proof_marks_the_peer_one_without_does_not(co):
    for name, ip, prove in (("ours", "10.80.64.9", True), ("theirs", "10.80.64.10", False)):
        invite, invite_pub = pair()
        body = peer_contents(name, ip, 4, public_key=invite_pub)
        assert call(co, "POST", "/v1/admin/peers", body=body)[0] == 201
        new, new_pub = pair()
        data = {"public_key": new_pub}
        headers = {H: proof(co, "POST", "/v1/user/redeem", json.dumps(data).encode(),
                            private=new)} if prove else {}
        assert call(co, "POST", "/v1/user/redeem", ip=ip, body=data, headers=headers)[0] == 204
        assert co.store.proves_admin(co.store.peer_by_ip(ip).id) is prove


def test_a_redemption_with_a_wrong_proof_is_refused(co):
    invite, invite_pub = pair()
    assert call(co, "POST", "/v1/admin/peers",
                body=peer_contents("ours", "10.80.64.9", 4, public_key=invite_pub))[0] == 201
    data = {"public_key": pair()[1]}
    header = proof(co, "POST", "/v1/user/redeem", json.dumps(data).encode(), private=invite)
    status, body = call(co, "POST", "/v1/user/redeem", ip="10.80.64.9", body=data,
                        headers={H: header})
    assert status == 403 and not co.store.peer_by_ip("10.80.64.9").is_redeemed


def test_our_api_client_proves_admin_calls_over_http(co):
    with serve_on_loopback(co) as port:
        ip = co.store.peer(co.admin_id).ip
        api = innernet.ApiClient(f"127.0.0.1:{port}", co.public_key, source_address=(ip, 0),
                                 proof_key=co.admin_key)
        api.call("GET", "/admin/peers")
        api.call("POST", "/admin/cidrs", {"name": "more", "cidr": "10.80.2.0/24", "parent": 1})
        assert co.store.proves_admin(co.admin_id)
        plain = innernet.ApiClient(f"127.0.0.1:{port}", co.public_key, source_address=(ip, 0))
        with pytest.raises(innernet.InnernetError) as e:
            plain.call("GET", "/admin/peers")
        assert e.value.status == 403 and H in e.value.message
        assert plain.call("GET", "/user/state")          # user calls need no proof
        api.close()
        plain.close()


def test_the_server_cli_requires_and_lifts_the_mark(tmp_path, capsys):
    base = cli_network(tmp_path, capsys)
    assert innernet.main(base + ["add-peer", "evil", "--name", "boss", "--cidr", "h",
                                 "--admin", "true", "--auto-ip", "--save-config",
                                 str(tmp_path / "boss.toml"), "--invite-expires", "1h",
                                 "--yes"]) == 0
    store = Store(str(tmp_path / "lib" / "evil.db"))
    boss = store.peer_by_name("boss")
    assert innernet.main(base + ["admin-proof", "evil", "--name", "boss", "--yes"]) == 0
    assert store.proves_admin(boss.id)
    assert "need a proof" in capsys.readouterr().err
    assert innernet.main(base + ["admin-proof", "evil", "--name", "boss", "--off"]) == 1
    assert "missing --yes" in capsys.readouterr().err and store.proves_admin(boss.id)
    assert innernet.main(base + ["admin-proof", "evil", "--name", "boss", "--off",
                                 "--yes"]) == 0
    assert not store.proves_admin(boss.id)
    assert [e.action for e in store.audit()].count("admin-proof") == 2


def test_admin_proof_refuses_a_non_admin_warns_of_an_invitation_and_status_shows_it(
        tmp_path, capsys):
    """Review item 4: no silent mark on a peer it cannot apply to."""
    base = cli_network(tmp_path, capsys)
    for name, admin in (("boss", "true"), ("worker", "false")):
        assert innernet.main(base + ["add-peer", "evil", "--name", name, "--cidr", "h",
                                     "--admin", admin, "--auto-ip", "--save-config",
                                     str(tmp_path / f"{name}.toml"), "--invite-expires", "1h",
                                     "--yes"]) == 0
    capsys.readouterr()
    store = Store(str(tmp_path / "lib" / "evil.db"))
    assert innernet.main(base + ["admin-proof", "evil", "--name", "worker", "--yes"]) == 1
    err = capsys.readouterr().err
    assert "innernet: error: peer 'worker' is not an admin" in err and "hint:" in err
    assert not store.proves_admin(store.peer_by_name("worker").id)
    assert innernet.main(base + ["status", "evil"]) == 0
    assert "admins: 1, 0 proving their calls; not (any local user of their hosts is them): " \
        "boss" in capsys.readouterr().out
    assert innernet.main(base + ["admin-proof", "evil", "--name", "boss", "--yes"]) == 0
    assert "has not redeemed its invitation yet" in capsys.readouterr().err
    assert innernet.main(base + ["status", "evil"]) == 0
    assert "admins: 1, 1 proving their calls\n" in capsys.readouterr().out
    assert innernet.main(base + ["status", "evil", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["admins"] == ["boss"] and st["admins_proving"] == ["boss"]


PROVED = r"""
import json, sys, threading
sys.path.insert(0, sys.argv[1])
import innernet
key = innernet.generate_private_key()
admin = innernet.generate_private_key()
store = innernet.Store(sys.argv[2], create=True)
store.create_network("lo", innernet.parse_network("127.0.0.0/8"), innernet.parse_ip("127.0.0.1"),
                     innernet.public_key(key), "127.0.0.1:1")
store.add_cidr(innernet.Cidr(None, "humans", "127.1.0.0/16", 1))
store.add_peer(innernet.Peer(None, "me", "127.1.0.1", 3, innernet.public_key(admin),
                             is_admin=True, is_redeemed=True))
co = innernet.Coordinator(store, innernet.ServerConfig(key, 0, "127.0.0.1", 8), "lo",
                          local_callers=True)
httpd = innernet.make_api_server(co, "127.0.0.1", 0)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
before = set(sys.modules)
mac = innernet.admin_proof_key(innernet.shared_secret(admin, co.public_key))  # the client's
client = set(sys.modules) - before
api = innernet.ApiClient(f"127.0.0.1:{httpd.server_address[1]}", co.public_key,
                         source_address=("127.1.0.1", 0), proof_key=admin)
for path in ("/admin/peers", "/admin/cidrs", "/admin/audit?since=0"):
    api.call("GET", path)
assert store.proves_admin(2)
httpd.shutdown()
print(json.dumps(sorted(m for m in json.loads(sys.argv[3]) if m in sys.modules)))
"""


def test_proved_admin_calls_load_no_openssl_or_http_modules(tmp_path):
    """The proof is BLAKE2b from CPython's _blake2: serving proved admin calls
    loads none of the heavy modules but PyNaCl, which computes the shared
    secret once per admin key when installed (as for rotation proofs)."""
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-S", "-c", PROVED, ROOT, str(tmp_path / "t.db"),
                        json.dumps(HEAVY)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout.strip().splitlines()[-1])) <= {"nacl"}


# -- a redemption raced by a local user of the joining host (review item 1) ----------

def invitation(co, ip="10.80.64.9"):
    invite, invite_pub = pair()
    assert call(co, "POST", "/v1/admin/peers",
                body=peer_contents("joiner" + ip.rsplit(".", 1)[1], ip, 4,
                                   public_key=invite_pub))[0] == 201
    return invite


def redeem(co, new_pub, invite=None, ip="10.80.64.9", header=None):
    data = {"public_key": new_pub}
    headers = {}
    if invite is not None:
        headers[innernet.INVITATION_PROOF_HEADER] = header or proof(
            co, "POST", "/v1/user/redeem", json.dumps(data).encode(), private=invite)
    return call(co, "POST", "/v1/user/redeem", ip=ip, body=data, headers=headers)


def test_a_redemption_proved_with_the_invitation_key_beats_an_unproved_one(co):
    """nobody on the joining host redeems first, through root's tunnel; root's
    client, proving it holds the invitation's key, still gets the peer."""
    import threading
    co.redeems.hold_time = 5.0
    invite = invitation(co)
    thief = []
    t = threading.Thread(target=lambda: thief.append(redeem(co, pair()[1])))
    t.start()
    deadline = time.monotonic() + 5
    while not co.redeems._held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert redeem(co, pair()[1])[0] == 409                  # a second unproved one: refused
    root_key = pair()[1]
    started = time.monotonic()
    assert redeem(co, root_key, invite)[0] == 204
    t.join(10)
    assert time.monotonic() - started < 2
    status, body = thief[0]
    assert status == 409 and "proved" in body["error"]
    assert co.store.peer_by_ip("10.80.64.9").public_key == root_key


def test_an_unproved_redemption_is_taken_after_the_hold(co):
    """innernet's client cannot prove: it gets the invitation, REDEEM_HOLD s later."""
    assert 0 < innernet.REDEEM_HOLD <= 3.5     # innernet 1.5.5's redeem times out at 5 s
    co.redeems.hold_time = 0.3
    invitation(co)
    key = pair()[1]
    started = time.monotonic()
    assert redeem(co, key)[0] == 204
    assert time.monotonic() - started >= 0.3
    assert co.store.peer_by_ip("10.80.64.9").public_key == key
    status, body = redeem(co, pair()[1], invitation(co, "10.80.64.10"), ip="10.80.64.10",
                          header="v1 1 " + "0" * 32 + " " + "0" * 64)
    assert status == 403 and not co.store.peer_by_ip("10.80.64.10").is_redeemed


def test_our_client_proves_the_redemption_with_the_invitation_key(co, monkeypatch):
    seen = []
    real = innernet.ApiClient._head
    monkeypatch.setattr(innernet.ApiClient, "_head",
                        lambda self, m, p, h, d: seen.append(r := real(self, m, p, h, d)) or r)
    invite = innernet.generate_private_key()
    api = innernet.ApiClient("127.0.0.1:1", co.public_key, invite_key=invite)
    api._head("POST", "/user/redeem", {}, b"{}")
    assert innernet.INVITATION_PROOF_HEADER.encode() in seen[0]
    api._head("GET", "/user/state", {}, None)
    assert innernet.INVITATION_PROOF_HEADER.encode() not in seen[1]
