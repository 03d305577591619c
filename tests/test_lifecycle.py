"""The peer lifecycle innernet never had (issue 12): delete with a quarantined
address, re-invite, and what clients make of a deletion -- the pure rules and the
store; tests/e2e/test_lifecycle.py runs them over real tunnels."""
import sqlite3

import pytest

import innernet
from innernet import Cidr, Deletion, InnernetError, Peer, Store
from helpers import IPS, call, make_coordinator, make_network, old_database


def key():
    return innernet.public_key(innernet.generate_private_key())


@pytest.fixture
def co(tmp_path):
    return make_coordinator(tmp_path)


# -- the store: quarantine -----------------------------------------------------------

def net_with_peer(tmp_path):
    s = make_network(tmp_path / "n.db")
    c = s.add_cidr(Cidr(None, "a", "10.80.1.0/24", 1))
    p = s.add_peer(Peer(None, "bob", "10.80.1.5", c.id, key(), is_redeemed=True))
    return s, c, p


def test_a_deleted_peers_address_is_quarantined_then_free(tmp_path):
    s, c, bob = net_with_peer(tmp_path)
    s.delete_peer(bob.id, 1000, now=100)
    assert s.peer_by_name("bob") is None and s.peer_by_ip("10.80.1.5") is None
    with pytest.raises(InnernetError, match="quarantined until .*'bob' had it and was deleted"):
        s.add_peer(Peer(None, "carol", "10.80.1.5", c.id, key()), now=500)
    # the name is free at once, and so is another address
    s.add_peer(Peer(None, "bob", "10.80.1.6", c.id, key()), now=500)
    # after the quarantine, the address too
    s.add_peer(Peer(None, "dave", "10.80.1.5", c.id, key()), now=1101)
    assert s.peer_by_ip("10.80.1.5").name == "dave"


def test_reuse_after_zero_frees_the_address_at_once(tmp_path):
    s, c, bob = net_with_peer(tmp_path)
    s.delete_peer(bob.id, 0, now=100)
    s.add_peer(Peer(None, "carol", "10.80.1.5", c.id, key()), now=100)
    (d,) = s.deletions()
    assert (d.ip, d.public_key, d.reuse_after, d.name) == ("10.80.1.5", bob.public_key, 100, "bob")


def test_an_unredeemed_invitation_is_deleted_without_quarantine(tmp_path):
    s, c, _ = net_with_peer(tmp_path)
    inv = s.add_peer(Peer(None, "inv", "10.80.1.9", c.id, key(), invite_expires=10 ** 10))
    s.delete_peer(inv.id, 1000, now=100)
    assert s.deletions() == [] and s.peer_by_name("inv") is None


def test_the_server_peer_cannot_be_deleted(tmp_path):
    s, _, _ = net_with_peer(tmp_path)
    with pytest.raises(InnernetError, match="cannot be deleted"):
        s.delete_peer(1, 0)


def test_reinvite_replaces_the_key_of_an_unredeemed_peer_only(tmp_path):
    s, c, bob = net_with_peer(tmp_path)
    inv = s.add_peer(Peer(None, "inv", "10.80.1.9", c.id, key(), invite_expires=50))
    new = key()
    s.reinvite(inv.id, new, 10 ** 10)
    p = s.peer(inv.id)
    assert p.public_key == new and p.invite_expires == 10 ** 10 and not p.is_redeemed
    with pytest.raises(InnernetError, match="already redeemed"):
        s.reinvite(bob.id, key(), 10 ** 10)


def test_an_expired_invitation_stays_re_issuable_but_frees_its_name_and_address(tmp_path):
    s, c, _ = net_with_peer(tmp_path)
    inv = s.add_peer(Peer(None, "late", "10.80.1.9", c.id, key(), invite_expires=50))
    assert s.sweep_expired(100) == [] and s.peer(inv.id).name == "late"
    s.add_peer(Peer(None, "late", "10.80.1.10", c.id, key(), invite_expires=10 ** 10), now=100)
    assert s.peer_by_name("late").ip == "10.80.1.10"


def test_innernet_databases_get_our_tables_and_keep_theirs(tmp_path):
    path = tmp_path / "old.db"
    old_database(path, 2)
    before = sqlite3.connect(str(path)).execute(
        "SELECT sql FROM sqlite_master WHERE name IN ('peers', 'cidrs', 'associations') "
        "ORDER BY name").fetchall()
    Store(str(path)).close()
    conn = sqlite3.connect(str(path))
    assert conn.execute("SELECT sql FROM sqlite_master WHERE name IN ('peers', 'cidrs', "
                        "'associations') ORDER BY name").fetchall() == before
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"deleted_peers", "key_rotations"} <= names
    assert conn.execute("PRAGMA user_version").fetchone() == (2,)     # innernet's own


# -- the API --------------------------------------------------------------------------

def test_admin_deletes_over_the_api_and_the_state_says_so(co):
    dev2 = co.store.peer_by_name("developer2")
    status, _ = call(co, "POST", "/v1/admin/deleted-peers", body={"id": dev2.id,
                                                                  "reuse_after": 3600})
    assert status == 204
    status, state = call(co, "GET", "/v1/user/state", "developer1")
    assert "developer2" not in {p["name"] for p in state["peers"]}
    (d,) = state["deleted"]
    assert d["ip"] == IPS["developer2"] and d["public_key"] == dev2.public_key
    # a peer that cannot see developer2 is not told of it either
    status, state = call(co, "GET", "/v1/user/state", "user1")
    assert "deleted" not in state
    # the deleted peer is no caller any more
    assert call(co, "GET", "/v1/user/state", "developer2")[0] == 401
    for who in ("developer1", "user1"):
        status, _ = call(co, "POST", "/v1/admin/deleted-peers", who,
                         body={"id": 3, "reuse_after": 0})
        assert status == 401


def test_reinvite_over_the_api(co):
    future = {"secs_since_epoch": 2 ** 33, "nanos_since_epoch": 0}
    body = {"name": "inv", "ip": "10.80.64.40", "cidr_id": 4, "endpoint": None,
            "public_key": key(), "persistent_keepalive_interval": None, "is_admin": False,
            "is_disabled": False, "is_redeemed": False, "invite_expires": future,
            "candidates": []}
    status, created = call(co, "POST", "/v1/admin/peers", body=body)
    new = key()
    assert call(co, "POST", "/v1/admin/reinvitations",
                body={"id": created["id"], "public_key": new, "invite_expires": future})[0] == 204
    assert co.store.peer(created["id"]).public_key == new
    past = {"secs_since_epoch": 1, "nanos_since_epoch": 0}
    assert call(co, "POST", "/v1/admin/reinvitations",
                body={"id": created["id"], "public_key": key(), "invite_expires": past})[0] == 400


# -- the client: pins and deletions ---------------------------------------------------------

def test_a_deletion_unpins_only_after_its_quarantine():
    a, b = key(), key()
    stored = [Peer(5, "bob", "10.66.1.5", 3, a, is_redeemed=True)]
    gone = [Deletion("10.66.1.5", a, 1000)]
    merged = innernet.merge_pinned(stored, [], gone, now=500)
    (pin,) = merged
    assert pin.is_disabled and pin.deleted_until == 1000
    newcomer = Peer(6, "carol", "10.66.1.5", 3, b, is_redeemed=True)
    with pytest.raises(InnernetError, match="quarantined until"):
        innernet.merge_pinned(merged, [newcomer], [], now=900)
    assert [p.name for p in innernet.merge_pinned(merged, [newcomer], [], now=1001)] == ["carol"]
    assert innernet.merge_pinned(merged, [], [], now=1001) == []      # the pin is gone


def test_a_later_announcement_cannot_shorten_a_quarantine():
    a, b = key(), key()
    stored = innernet.merge_pinned([Peer(5, "bob", "10.66.1.5", 3, a, is_redeemed=True)], [],
                                   [Deletion("10.66.1.5", a, 1000)], now=500)
    again = innernet.merge_pinned(stored, [], [Deletion("10.66.1.5", a, 501)], now=600)
    assert again[0].deleted_until == 1000
    with pytest.raises(InnernetError, match="PINNING"):
        innernet.merge_pinned(again, [Peer(6, "c", "10.66.1.5", 3, b, is_redeemed=True)], [],
                              now=700)


def test_a_client_keeps_a_deleted_address_for_the_floor_whatever_the_server_says(monkeypatch):
    """B1: a quarantine announced already over still keeps the address from
    another key for the floor after the client first heard of the deletion;
    such a record is refused alone (one line), the rest applies."""
    a, b, c = key(), key(), key()
    stored = [Peer(5, "bob", "10.66.1.5", 3, a, is_redeemed=True)]
    gone = [Deletion("10.66.1.5", a, 100)]
    merged = innernet.merge_pinned(stored, [], gone, now=500, floor=1000)
    assert merged[0].deleted_until == 1500 and merged[0].is_disabled
    thief = Peer(6, "bob", "10.66.1.5", 3, b, is_redeemed=True)
    other = Peer(7, "dan", "10.66.1.7", 3, c, is_redeemed=True)
    for pins, now in ((stored, 500), (merged, 600), (merged, 1499)):
        kept, refused = innernet.refuse_quarantined([thief, other], pins, gone, now, 1000)
        assert kept == [other] and len(refused) == 1 and "'bob'" in refused[0], (pins, now)
    kept, refused = innernet.refuse_quarantined([thief, other], merged, gone, 1501, 1000)
    assert kept == [thief, other] and refused == []
    assert [p.public_key for p in innernet.merge_pinned(merged, kept, gone, now=1501)] == [b, c]
    # a live pin (no deletion) is pinning's to refuse, as a whole
    assert innernet.refuse_quarantined([thief], stored, [], 500, 1000) == ([thief], [])
    monkeypatch.delenv("INNERNET_MIN_QUARANTINE", raising=False)
    assert innernet.min_quarantine() == innernet.MIN_QUARANTINE == 7 * 86400
    monkeypatch.setenv("INNERNET_MIN_QUARANTINE", "3")
    assert innernet.min_quarantine() == 3
    monkeypatch.setenv("INNERNET_MIN_QUARANTINE", "-1")
    assert innernet.min_quarantine() == innernet.MIN_QUARANTINE


def test_a_deletion_of_another_key_unpins_nothing():
    a = key()
    stored = [Peer(5, "bob", "10.66.1.5", 3, a, is_redeemed=True)]
    merged = innernet.merge_pinned(stored, [], [Deletion("10.66.1.5", key(), 0)], now=500)
    assert merged[0].deleted_until is None and merged[0].is_disabled


def test_the_data_store_keeps_quarantined_pins(tmp_path):
    pin = Peer(5, "bob", "10.66.1.5", 3, key(), is_redeemed=True, is_disabled=True,
               deleted_until=1234)
    path = tmp_path / "n.json"
    innernet.save_data_store(str(path), [pin], [])
    (back,), _, _ = innernet.load_data_store(str(path))
    assert back.deleted_until == 1234 and back.is_disabled


# -- key rotation proofs --------------------------------------------------------------------

def pair():
    k = innernet.generate_private_key()
    return k, innernet.public_key(k)


@pytest.mark.parametrize("backend", ["pynacl", "python"])
def test_a_rotation_proof_verifies_for_its_verifier_only(monkeypatch, backend):
    if backend == "python":
        monkeypatch.setattr(innernet, "_nacl_bindings", False)
    elif innernet.key_backend() != "pynacl":
        pytest.skip("PyNaCl is not installed")
    a, A = pair()
    b, B = pair()
    p, P = pair()
    q, Q = pair()
    proof = innernet.rotation_proof(a, P, "10.66.1.5", B)
    assert innernet.rotation_proof_valid(p, A, "10.66.1.5", B, proof)
    assert not innernet.rotation_proof_valid(q, A, "10.66.1.5", B, proof)     # another peer
    assert not innernet.rotation_proof_valid(p, A, "10.66.1.6", B, proof)     # another address
    assert not innernet.rotation_proof_valid(p, A, "10.66.1.5", Q, proof)     # another new key
    assert not innernet.rotation_proof_valid(p, B, "10.66.1.5", A, proof)     # reversed
    assert not innernet.rotation_proof_valid(p, A, "10.66.1.5", B, proof[:-4] + "AAA=")
    assert not innernet.rotation_proof_valid(p, A, "10.66.1.5", B, proof[:20])   # truncated
    assert not innernet.rotation_proof_valid(p, A, "10.66.1.5", B, None)
    # the server cannot make one: it knows neither a nor p
    s, S = pair()
    assert not innernet.rotation_proof_valid(p, A, "10.66.1.5", B,
                                             innernet.rotation_proof(s, P, "10.66.1.5", B))


def test_a_replayed_old_proof_does_not_move_a_later_key():
    a, A = pair()
    b, B = pair()
    c, C = pair()
    p, P = pair()
    first = {"old_key": A, "new_key": B, "proof": innernet.rotation_proof(a, P, "10.66.1.5", B)}
    second = {"old_key": B, "new_key": C, "proof": innernet.rotation_proof(b, P, "10.66.1.5", C)}
    # a client that pinned A follows the chain to C; one that pinned B only the last step
    assert innernet.follow_rotations(p, "10.66.1.5", A, [first, second]) == C
    assert innernet.follow_rotations(p, "10.66.1.5", B, [first, second]) == C
    # replaying A -> B to a client pinned at C leads nowhere, nor back to B
    assert innernet.follow_rotations(p, "10.66.1.5", C, [first]) == C
    forged = dict(second, proof=first["proof"])
    assert innernet.follow_rotations(p, "10.66.1.5", B, [forged]) == B


def test_merge_accepts_a_key_change_only_with_a_verified_rotation():
    a, A = pair()
    _, B = pair()
    stored = [Peer(5, "bob", "10.66.1.5", 3, A, is_redeemed=True)]
    moved = [Peer(5, "bob", "10.66.1.5", 3, B, is_redeemed=True)]
    with pytest.raises(InnernetError, match="PINNING"):
        innernet.merge_pinned(stored, moved)
    (p,) = innernet.merge_pinned(stored, moved, rotated=[("10.66.1.5", A, B)])
    assert p.public_key == B                      # the old key is no longer pinned
    assert [(p.ip, pin.public_key, p.public_key) for p, pin in
            innernet.pinned_key_changes(stored, moved, 0)] == [("10.66.1.5", A, B)]
    # our own address is not pinned against us
    assert innernet.merge_pinned(stored, moved, own_ip="10.66.1.5")[0].public_key == B


def test_the_server_takes_a_rotation_only_with_its_own_valid_proof(co):
    caller = co.store.peer_by_name("developer1")
    # the fixture's peers have random keys: give developer1 a private key we know
    a, A = pair()
    co.store.conn.execute("UPDATE peers SET public_key = ? WHERE id = ?", (A, caller.id))
    b, B = pair()
    dev2 = co.store.peer_by_name("developer2")
    forged = {"public_key": B, "proofs": {co.public_key: "A" * 43 + "="}}
    status, body = call(co, "POST", "/v1/user/rotation", "developer1", forged)
    assert status == 403 and "proof" in body["error"]
    good = {"public_key": B, "proofs": {
        co.public_key: innernet.rotation_proof(a, co.public_key, caller.ip, B),
        dev2.public_key: "B" * 43 + "="}}
    status, _ = call(co, "POST", "/v1/user/rotation", "developer1", good)
    assert status == 204 and co.store.peer(caller.id).public_key == B
    assert co.swaps.pending[caller.id] == A              # the device swaps once the answer is acked
    status, chain = call(co, "GET", f"/v1/user/rotations?ip={caller.ip}", "developer2")
    assert status == 200 and chain == [{"ip": caller.ip, "old_key": A, "new_key": B,
                                        "proof": "B" * 43 + "="}]
    # user1 cannot see developer1: no records for it
    assert call(co, "GET", f"/v1/user/rotations?ip={caller.ip}", "user1")[0] == 404


def test_a_deletion_and_a_new_peer_at_its_address_in_one_state_is_no_key_change():
    """An honest server with --reuse-after 0s (and a client floor of 0): a client
    that hears of the deletion and of the new peer in the same state takes the
    new peer; it is not a PINNING ERROR (seen in the lab under load)."""
    from innernet import Deletion, Peer
    old = Peer(3, "gus", "10.66.1.6", 1, "a" * 43 + "=")
    new = Peer(4, "hank", "10.66.1.6", 1, "b" * 43 + "=")
    gone = Deletion("10.66.1.6", old.public_key, 1000, "gus", 1)
    merged = innernet.merge_pinned([old], [new], [gone], now=1000.5, floor=0)
    assert [(p.name, p.public_key) for p in merged] == [("hank", new.public_key)]
    # with the floor (or a quarantine not over), the pin holds
    import pytest
    with pytest.raises(innernet.InnernetError, match="PINNING ERROR"):
        innernet.merge_pinned([old], [new], [gone], now=1000.5, floor=3600)


def test_an_admin_peer_reads_the_servers_deletions_into_frozen_records():
    """RemoteNetwork.deletions builds each Deletion whole (records are frozen):
    an admin's add-peer after any deletion crashed with FrozenInstanceError."""
    class Api:
        def call(self, method, path, body=None):
            assert (method, path) == ("GET", "/admin/deleted-peers")
            return [{"ip": "10.66.1.2", "public_key": "A" * 43 + "=", "reuse_after": 99,
                     "name": "bob", "cidr_id": 3}]
    net = innernet.RemoteNetwork.__new__(innernet.RemoteNetwork)
    net.api, net.lacks = Api(), None
    (d,) = net.deletions()
    assert (d.ip, d.name, d.cidr_id, d.reuse_after) == ("10.66.1.2", "bob", 3, 99)
