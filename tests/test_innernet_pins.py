"""innernet 1.5.5 clients on our server pin keys for good (issue 27, part B).

An innernet client's data store refuses, for ever, any state where a known
address has another key. So the server remembers what it told each innernet
client and leaves out a peer whose key changed since (a rotation, a reused
address); innernet admins see quarantined addresses as taken. These tests
drive the Coordinator as innernet's client and ours do: innernet's sends no
Accept-Encoding and no If-None-Match, ours always asks for gzip and sends
If-None-Match once it has an ETag.
"""
import innernet
from innernet import Deletion, Peer
from helpers import IPS, call, key, peer_contents

OURS = {"If-None-Match": "\"ours\""}   # (ours ask for gzip as well)


def state(co, who, headers=None):
    status, body = call(co, "GET", "/v1/user/state", who, headers=headers)
    assert status == 200
    return {p["ip"]: p["public_key"] for p in body["peers"]}


def rotate(co, who):
    """What a rotation leaves in the store (the proof checks are test_lifecycle's)."""
    peer = co.store.peer_by_name(who)
    new = key()
    co.store.rotate_key(peer.id, new, {})
    return new


def test_is_innernet_request_tells_innernet_from_ours():
    assert innernet.is_innernet_request({})
    assert innernet.is_innernet_request(None)
    assert innernet.is_innernet_request({"Accept-Encoding": "identity"})
    assert not innernet.is_innernet_request({"Accept-Encoding": "gzip"})
    assert not innernet.is_innernet_request({"If-None-Match": '"x"'})
    assert not innernet.is_innernet_request(innernet.HttpHeaders({"accept-encoding": "gzip"}))


def test_pin_conflicts_are_the_known_addresses_with_another_key():
    a, b, c = (Peer(i, f"p{i}", f"10.0.0.{i}", 1, key()) for i in (1, 2, 3))
    told = {a.ip: a.public_key, b.ip: key()}
    assert innernet.pin_conflicts(told, [a, b, c]) == {b.ip}
    assert innernet.pin_conflicts({}, [a, b, c]) == frozenset()


def test_quarantine_placeholders_are_disabled_peers_innernet_can_read():
    now = 1000
    gone = [Deletion("10.0.0.9", key(), now + 10, "old", 3),
            Deletion("10.0.0.4", key(), now - 1, "free", 3),
            Deletion("fd00::5", key(), now + 10, "six", 3)]
    held = innernet.quarantine_placeholders(gone, now)
    assert [(p.ip, p.is_disabled, p.is_redeemed) for p in held] == \
        [("10.0.0.9", True, True), ("fd00::5", True, True)]
    for p in held:
        assert p.id < 0                      # never a real peer's id
        innernet.parse_hostname(p.name, "peer name")   # innernet parses names strictly
        assert p.name not in ("old", "six")  # the deleted peer's name is free at once


def test_an_innernet_client_no_longer_sees_a_rotated_peer_and_keeps_the_rest(co):
    before = state(co, "developer2")
    assert IPS["developer1"] in before
    new = rotate(co, "developer1")
    after = state(co, "developer2")
    assert IPS["developer1"] not in after            # left out, not refused
    assert {ip: k for ip, k in before.items() if ip != IPS["developer1"]} == after
    assert state(co, "developer2", OURS)[IPS["developer1"]] == new   # ours follow proofs
    assert state(co, "developer1")[IPS["developer1"]] == new   # never told the old key


def test_an_innernet_client_does_not_see_a_reused_address_under_a_new_key(co):
    assert IPS["user2"] in state(co, "user1")
    old = co.store.peer_by_name("user2")
    co.store.delete_peer(old.id, 0)
    assert IPS["user2"] not in state(co, "user1")
    made = co.store.add_peer(Peer(None, "user3", IPS["user2"], old.cidr_id, key(),
                                  is_redeemed=True))
    assert IPS["user2"] not in state(co, "user1")
    assert state(co, "user1", OURS)[IPS["user2"]] == made.public_key
    pinners = co.store.pinners(IPS["user2"])
    assert [(p.name, k) for p, k in pinners] == [("user1", old.public_key)]


def test_forget_pins_shows_the_peer_again_with_its_new_key(co):
    state(co, "developer2")
    new = rotate(co, "developer1")
    assert IPS["developer1"] not in state(co, "developer2")
    dev2 = co.store.peer_by_name("developer2")
    status, body = call(co, "DELETE", f"/v1/admin/innernet-pins/{dev2.id}")
    assert status == 200 and body["forgotten"] >= 2
    assert state(co, "developer2")[IPS["developer1"]] == new


def test_pins_are_recorded_once_and_leave_the_state_and_its_revision_alone(co):
    rev = co.store.revision
    first = call(co, "GET", "/v1/user/state", "developer2")
    assert co.store.revision == rev            # no new revision: no long poll wakes
    n = len(co.store.told_pins(co.store.peer_by_name("developer2").id))
    assert n == 3                              # server, developer1, itself
    writes = []
    co.store.conn.set_trace_callback(lambda sql: writes.append(sql) if "INSERT" in sql else 0)
    for _ in range(5):
        assert call(co, "GET", "/v1/user/state", "developer2") == first
    co.store.conn.set_trace_callback(None)
    assert writes == []


def test_ours_are_never_recorded(co):
    state(co, "developer2", OURS)
    call(co, "GET", "/v1/user/state", "developer2", headers={"If-None-Match": '"x"'})
    assert co.store.told_pins(co.store.peer_by_name("developer2").id) == {}


def test_the_rotation_answer_names_the_innernet_clients_that_pinned_the_old_key(co):
    caller = co.store.peer_by_name("developer1")
    a, b = innernet.generate_private_key(), innernet.generate_private_key()
    co.store.conn.execute("UPDATE peers SET public_key = ? WHERE id = ?",
                          (innernet.public_key(a), caller.id))
    co.store.revision += 1
    state(co, "developer2")                 # innernet's client: it pins developer1's key
    state(co, "user1")                      # one that never saw developer1
    proofs = {co.public_key: innernet.rotation_proof(a, co.public_key, caller.ip,
                                                     innernet.public_key(b))}
    status, body = call(co, "POST", "/v1/user/rotation", "developer1",
                        {"public_key": innernet.public_key(b), "proofs": proofs})
    assert status == 200
    assert [(r["name"], r["ip"]) for r in body["innernet_peers"]] == \
        [("developer2", IPS["developer2"])]


def test_innernet_admins_see_quarantined_addresses_as_taken_and_ours_do_not(co):
    dev2 = co.store.peer_by_name("developer2")
    co.store.delete_peer(dev2.id, 3600)
    status, listed = call(co, "GET", "/v1/admin/peers")
    held = [p for p in listed if p["ip"] == IPS["developer2"]]
    assert status == 200 and len(held) == 1 and held[0]["is_disabled"]
    status, listed = call(co, "GET", "/v1/admin/peers", headers=OURS)
    assert IPS["developer2"] not in {p["ip"] for p in listed}
    # a placeholder is nothing an admin can change
    status, _ = call(co, "PUT", f"/v1/admin/peers/{held[0]['id']}", body=held[0])
    assert status == 404
    # the address itself: a 400 that says why and what to do
    status, body = call(co, "POST", "/v1/admin/peers",
                        body=peer_contents("dev3", IPS["developer2"], dev2.cidr_id))
    assert status == 400 and "quarantined until" in body["error"]
    assert "'developer2' had it" in body["error"] and "choose another address" in body["error"]


# -- what a hostile peer cannot do with this (README "Security") ----------------

def test_a_peer_posing_as_innernet_hides_nothing_from_anyone_else(co):
    """developer1 asks as innernet's client would, and rotates: that changes
    its own view and hides it, nothing else."""
    everyone = ("admin", "developer1", "developer2", "user1", "user2")
    full = {who: state(co, who, OURS) for who in everyone}
    for _ in range(3):
        state(co, "developer1")
    for who in everyone:
        assert state(co, who, OURS) == full[who]
        if who != "developer1":
            assert state(co, who) == full[who]     # innernet's view, first told now
    new = rotate(co, "developer1")
    for who in everyone:      # each was told developer1's old key, if it saw it at all
        assert state(co, who) == {ip: k for ip, k in full[who].items()
                                  if ip != IPS["developer1"]}
        assert state(co, who, OURS) == {ip: (new if ip == IPS["developer1"] else k)
                                        for ip, k in full[who].items()}


def test_a_rotating_peer_hides_only_itself(co):
    state(co, "developer2")
    for _ in range(3):
        rotate(co, "developer1")
    seen = state(co, "developer2")
    assert seen == {p.ip: p.public_key for p in co.store.peers()
                    if p.name in (innernet.SERVER_PEER_NAME, "developer2")}


def test_only_admins_read_or_forget_pins(co):
    dev2 = co.store.peer_by_name("developer2")
    for method, path in (("GET", f"/v1/admin/innernet-pins?ip={IPS['developer1']}"),
                         ("DELETE", f"/v1/admin/innernet-pins/{dev2.id}")):
        status, _ = call(co, method, path, "developer1")
        assert status == 401


def test_a_deleted_innernet_client_takes_its_pins_along(co):
    state(co, "developer2")
    dev2 = co.store.peer_by_name("developer2")
    co.store.delete_peer(dev2.id, 0)
    assert co.store.told_pins(dev2.id) == {}
    assert co.store.pinners(IPS["developer1"]) == []


def test_a_database_of_an_earlier_innernet_py_gets_the_table(co):
    path = co.store.path
    co.store.conn.execute("DROP TABLE innernet_pins")
    co.store.close()
    store = innernet.Store(path)
    try:
        store.record_pins(1, {"10.80.0.1": key()})
        assert list(store.told_pins(1)) == ["10.80.0.1"]
        assert store.pinners("10.80.0.1")[0][0].id == 1
    finally:
        store.close()


def test_rollback_check_names_the_innernet_clients_a_rollback_would_break(co):
    """innernet-server would serve the new key the server keeps from an innernet
    client, which would then fail every sync (outside review of issue 27)."""
    state(co, "developer2")                                  # innernet's: pins recorded
    assert not [f for f, _ in innernet.rollback_report(co.store, 0)
                if f == "peers kept from innernet clients"]
    rotate(co, "developer1")
    report = dict(innernet.rollback_report(co.store, 0))
    assert f"developer2 ({IPS['developer1']})" in report["peers kept from innernet clients"]
    assert "PINNING ERROR" in report["peers kept from innernet clients"]


def test_forget_pins_on_an_innernet_server_is_one_line():
    assert innernet.extension_of("DELETE", "/admin/innernet-pins/4")[0] == \
        "pin tracking for innernet clients"


# -- a local user's curl on a host of ours (review) -----------------------------

def test_a_local_users_curl_on_a_host_of_ours_is_no_innernet_client(co):
    """A local user of developer2's host asks for the state as curl does (no
    gzip, no If-None-Match: innernet's client's way) through its tunnel. But
    developer2 proved it runs innernet.py (its redemption or an admin call,
    with a proof its private key makes): nothing is recorded, it is told our
    state, and a rotation names no innernet client."""
    dev2 = co.store.peer_by_name("developer2")
    co.store.require_admin_proof(dev2.id)              # as a proved redemption marks it
    ours = state(co, "developer2", OURS)
    assert state(co, "developer2") == ours
    assert co.store.told_pins(dev2.id) == {}
    new = rotate(co, "developer1")
    assert state(co, "developer2")[IPS["developer1"]] == new      # not left out
    assert co.store.pinners(IPS["developer1"]) == []


def test_pins_recorded_before_a_peer_proved_it_runs_ours_name_it_no_more(co):
    """Pins a local user's curl made before the mark (or before this fix) are
    ignored once the peer is known to run innernet.py."""
    dev2 = co.store.peer_by_name("developer2")
    state(co, "developer2")                             # taken for innernet's: recorded
    assert co.store.told_pins(dev2.id)
    rotate(co, "developer1")
    assert [p.name for p, _ in co.store.pinners(IPS["developer1"])] == ["developer2"]
    assert co.store.kept_from_innernet()
    co.store.require_admin_proof(dev2.id)
    assert co.store.pinners(IPS["developer1"]) == []
    assert co.store.kept_from_innernet() == []
    assert not [f for f, _ in innernet.rollback_report(co.store, 0)
                if f == "peers kept from innernet clients"]
