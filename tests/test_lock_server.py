"""Network lock on the server (issue 32): under lock every admin change must be
signed by a trusted lock key, the audit log names that key, and the state
carries what clients verify. Driven through the server CLI on a real SQLite
database (its --lock-key is the admin path there) and the Coordinator."""
import glob
import json
import os
import types

import pytest

try:
    import nacl.signing  # noqa: F401
    HAVE_NACL = True
except ImportError:
    HAVE_NACL = False
# Collected without PyNaCl too (tests/test_suite.py), and skipped with the reason.
pytestmark = pytest.mark.skipif(not HAVE_NACL,
                                reason="network lock needs PyNaCl")

import time  # noqa: E402

import innernet  # noqa: E402
from innernet import (LockChain, Store, lock_genesis, lock_keypair, lock_projection,  # noqa: E402
                      lock_record, sign_batch, verify_state)

from helpers import call, cli_network, make_coordinator  # noqa: E402


def db_path(tmp_path):
    return glob.glob(str(tmp_path / "lib" / "**" / "evil.db"), recursive=True)[0]


def lock(tmp_path, net="evil", secret="sekrit"):
    """`lock init` as an admin's host does it, straight into the database:
    (key file, public key)."""
    store = Store(db_path(tmp_path))
    private, public = lock_keypair()
    keyfile = tmp_path / "lock.key"
    keyfile.write_text(private + "\n")
    chain = LockChain([lock_genesis(net, [(public, "first")], secret, private, 0)])
    keys = {p.ip: p.public_key for p in store.peers()}
    recs = [lock_record(net, 1, f, keys.get(f.get("ip")))
            for f in lock_projection(store.peers(), store.cidrs(), store.associations()).values()]
    store.lock_submit(chain.entries, {"batch": sign_batch(net, private, recs), "records": recs},
                      {}, "10.66.0.1")
    store.close()
    return str(keyfile), public


def run(base, *argv):
    return innernet.main(base + list(argv))


VERBS = [
    ("add-cidr", ["--name", "robots", "--cidr", "10.66.2.0/24", "--parent", "evil", "--yes"]),
    ("add-peer", ["--name", "bob", "--cidr", "h", "--ip", "10.66.1.9", "--admin", "false",
                  "--invite-expires", "1d", "--save-config", "{tmp}/bob.toml", "--yes"]),
    ("add-association", ["h", "robots", "--yes"]),
    ("rename-peer", ["--name", "bob", "--new-name", "robert", "--yes"]),
    ("disable-peer", ["--name", "robert", "--yes"]),
    ("enable-peer", ["--name", "robert", "--yes"]),
    ("rename-cidr", ["--name", "robots", "--new-name", "bots", "--yes"]),
    ("delete-association", ["h", "bots", "--yes"]),
    ("delete-peer", ["--name", "robert", "--yes"]),
    ("delete-cidr", ["--name", "bots", "--yes"]),
]


def test_every_admin_verb_needs_a_trusted_lock_key_and_the_audit_log_names_it(
        tmp_path, capsys):
    base = cli_network(tmp_path, capsys)
    keyfile, public = lock(tmp_path)
    other, _ = lock_keypair()
    (tmp_path / "other.key").write_text(other)
    for verb, argv in VERBS:
        argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
        assert run(base, verb, "evil", *argv) != 0, verb                 # unsigned
        err = capsys.readouterr().err
        assert "network is locked" in err and err.count("\n") <= 2, (verb, err)
        assert run(base, verb, "evil", *argv, "--lock-key", str(tmp_path / "other.key")) != 0
        assert "not trusted" in capsys.readouterr().err, verb
        assert run(base, verb, "evil", *argv, "--lock-key", keyfile) == 0, \
            (verb, capsys.readouterr().err)
        capsys.readouterr()
    store = Store(db_path(tmp_path))
    assert store.peer_by_name("robert") is None and store.cidr_by_name("bots") is None
    after = [e for e in store.audit() if e.action != "lock"][-len(VERBS):]
    assert [e.actor for e in after] == [f"server-cli with lock key {innernet.lock_short(public)}"
                                        ] * len(VERBS), [(e.action, e.actor) for e in after]


def test_the_state_carries_the_chain_and_records_a_client_verifies(tmp_path, capsys):
    base = cli_network(tmp_path, capsys)
    assert run(base, "add-peer", "evil", "--name", "alice", "--cidr", "h", "--ip", "10.66.1.2",
               "--admin", "false", "--invite-expires", "1d", "--save-config",
               str(tmp_path / "a.toml"), "--yes") == 0
    store = Store(db_path(tmp_path))
    store.conn.execute("UPDATE peers SET is_redeemed = 1")
    keyfile, _ = lock(tmp_path)
    co = innernet.Coordinator(store, innernet.load_server_config(
        innernet.Dirs(base[1], base[3]), "evil"), "evil")
    alice = store.peer_by_name("alice")
    body, _ = co.views.state_for(alice)
    state = json.loads(body)
    chain = LockChain(state["lock"]["chain"])
    peers, cidrs, _, _ = innernet.parse_state(state)
    acc, refused, known = verify_state(chain, state["lock"], peers, cidrs, "10.66.1.2", {},
                                         skip={"10.66.0.1"})
    assert not refused and {p.name for p in acc} >= {"alice"}
    # a row the server's database gained by hand (a hijacker's) is refused
    store.conn.execute("INSERT INTO peers (name, ip, cidr_id, public_key, is_redeemed) "
                       "VALUES ('mallory', '10.66.1.66', 3, ?, 1)",
                       (innernet.public_key(innernet.generate_private_key()),))
    store.revision += 1
    state = json.loads(co.views.state_for(alice)[0])
    peers, cidrs, _, _ = innernet.parse_state(state)
    acc, refused, _ = verify_state(chain, state["lock"], peers, cidrs, "10.66.1.2", known,
                                  skip={"10.66.0.1"})
    assert [p.name for p, _ in refused] == ["mallory"]


def test_a_peer_record_goes_without_the_key_beside_it_and_a_changed_key_fails_its_hash(
        tmp_path, capsys):
    """lock_wire_section: a state's record of a peer it shows omits the key
    (the client takes the peer's), and its hash in the batch is null (the
    client puts back its own); a server that changes that key in the state
    gets the record's hash wrong, so the peer is refused (alone, by a client
    that verified the batch before; with the rest of its batch on a first
    fetch)."""
    base = cli_network(tmp_path, capsys)
    for name, ip in (("alice", "10.66.1.2"), ("bob", "10.66.1.3")):
        assert run(base, "add-peer", "evil", "--name", name, "--cidr", "h", "--ip", ip,
                   "--admin", "false", "--invite-expires", "1d", "--save-config",
                   str(tmp_path / f"{name}.toml"), "--yes") == 0
    store = Store(db_path(tmp_path))
    store.conn.execute("UPDATE peers SET is_redeemed = 1")
    lock(tmp_path)
    co = innernet.Coordinator(store, innernet.load_server_config(
        innernet.Dirs(base[1], base[3]), "evil"), "evil")
    state = json.loads(co.views.state_for(store.peer_by_name("alice"))[0])
    records = {r["ip"]: r for r in state["lock"]["records"] if r["t"] == "peer"}
    assert "key" not in records["10.66.1.3"]
    # every record's hash in the batch goes as null: the client hashes the record
    assert [h for b in state["lock"]["batches"] for h in b["h"]].count(None) \
        == len(state["lock"]["records"])
    chain = LockChain(state["lock"]["chain"])
    peers, cidrs, _, _ = innernet.parse_state(state)
    acc, refused, known = verify_state(chain, state["lock"], peers, cidrs, "10.66.1.2", {},
                                       skip={"10.66.0.1"})
    assert not refused and "bob" in {p.name for p in acc}
    # records out of their batch's order fill its nulls wrongly: its signature fails
    moved = dict(state["lock"], records=state["lock"]["records"][::-1])
    acc, refused, _ = verify_state(chain, moved, peers, cidrs, "10.66.1.2", {},
                                   skip={"10.66.0.1"})
    assert {p.name for p, _ in refused} >= {"bob"} and "bob" not in {p.name for p in acc}
    lie = innernet.public_key(innernet.generate_private_key())
    for p in state["peers"]:
        if p["name"] == "bob":
            p["public_key"] = lie
    peers, cidrs, _, _ = innernet.parse_state(state)
    acc, refused, _ = verify_state(chain, state["lock"], peers, cidrs, "10.66.1.2", known,
                                   skip={"10.66.0.1"})
    assert [p.name for p, _ in refused] == ["bob"]
    assert refused[0][1] == innernet.LOCK_KEY_NOT_SIGNED
    acc, refused, _ = verify_state(chain, state["lock"], peers, cidrs, "10.66.1.2", {},
                                   skip={"10.66.0.1"})
    # the server's entry stays, cut to what is signed: its record was in the broken batch
    assert [p.name for p, _ in refused if p.ip != "10.66.0.1"] == ["bob"]
    assert "bob" not in {p.name for p in acc} and "10.66.0.1" in {p.ip for p in acc}
    assert dict((p.name, r) for p, r in refused)["bob"] == innernet.LOCK_BATCH_BROKEN


def test_an_unsigned_admin_call_is_refused_with_a_json_reason(tmp_path):
    """Over the API: an admin call under lock without the X-Innernet-Lock
    header, or signed by a key the chain does not trust, is a 403 with its
    reason, and changes nothing."""

    co = make_coordinator(tmp_path)
    store = co.store
    private, public = lock_keypair()
    chain = LockChain([lock_genesis("test", [(public, "first")], "s", private, 0)])
    keys = {p.ip: p.public_key for p in store.peers()}
    recs = [lock_record("test", 1, f, keys.get(f.get("ip")))
            for f in lock_projection(store.peers(), store.cidrs(), store.associations()).values()]
    store.lock_submit(chain.entries, {"batch": sign_batch("test", private, recs), "records": recs},
                      {}, "10.80.0.1")
    body = {"name": "robots", "cidr": "10.80.2.0/24", "parent": 1}
    status, answer = call(co, "POST", "/v1/admin/cidrs", body=body)
    assert status == 403 and "network is locked" in answer["error"], answer
    evil, _ = lock_keypair()
    fields = {"t": "cidr", "cidr": "10.80.2.0/24", "name": "robots", "parent": "10.80.0.0/15",
              "deleted": False}
    for signer, code in ((evil, 403), (private, 201)):
        rec = lock_record("test", 2, fields)
        signed = {"batch": sign_batch("test", signer, [rec]), "records": [rec]}
        header = innernet.base64.b64encode(json.dumps(signed).encode()).decode()
        status, answer = call(co, "POST", "/v1/admin/cidrs", body=body,
                              headers={innernet.LOCK_HEADER: header})
        assert status == code, answer
    assert store.cidr_by_name("robots") is not None
    assert store.audit()[-1].actor.endswith(f"with lock key {innernet.lock_short(public)}")


def test_under_lock_either_exit_route_approves_or_revokes_the_exit_node(tmp_path, capsys):
    """Outside round 22, V22-2: `approve-routes --routes 0.0.0.0/0 --revoke`
    (the help: 0.0.0.0/0 is the exit node) was a 403 under lock: the admin's
    host signed ::/0 left approved, where the server takes the pair as one."""
    base = cli_network(tmp_path, capsys)
    assert run(base, "add-peer", "evil", "--name", "gw", "--cidr", "h", "--ip", "10.66.1.7",
               "--admin", "false", "--invite-expires", "1d", "--save-config",
               str(tmp_path / "gw.toml"), "--yes") == 0
    store = Store(db_path(tmp_path))
    store.conn.execute("UPDATE peers SET is_redeemed = 1")
    gw = store.peer_by_name("gw")
    store.advertise_routes(gw.id, [], True)                   # it offers itself as exit node
    keyfile, _ = lock(tmp_path)
    for flags, exit_node in (([], True), (["--revoke"], False)):
        assert run(base, "approve-routes", "evil", "--name", "gw", "--routes", "0.0.0.0/0",
                   *flags, "--yes", "--lock-key", keyfile) == 0, capsys.readouterr().err
        assert store.peer_by_name("gw").exit_node is exit_node
        assert store.lock_records()[0]["peer:10.66.1.7"][0]["exit"] is exit_node


def test_under_lock_no_auto_approve_rule_applies_and_none_is_made(tmp_path, capsys):
    """An auto-approve rule approves routes on the server alone, which no
    locked client would install (no admin signed them): under lock a rule
    made before approves nothing, list-routes says so, and a new rule is
    refused in one line. An admin's approve-routes (signed) still approves."""
    base = cli_network(tmp_path, capsys)
    assert run(base, "add-peer", "evil", "--name", "gw", "--cidr", "h", "--ip", "10.66.1.7",
               "--admin", "false", "--invite-expires", "1d", "--save-config",
               str(tmp_path / "gw.toml"), "--yes") == 0
    assert run(base, "approve-routes", "evil", "--auto-approve", "192.168.0.0/16", "--cidr", "h",
               "--yes") == 0
    store = Store(db_path(tmp_path))
    store.conn.execute("UPDATE peers SET is_redeemed = 1")
    gw = store.peer_by_name("gw")
    assert store.advertise_routes(gw.id, ["192.168.1.0/24"], False).routes == ["192.168.1.0/24"]
    keyfile, _ = lock(tmp_path)             # signs gw's route approved before the lock
    capsys.readouterr()
    peer = store.advertise_routes(gw.id, ["192.168.1.0/24", "192.168.2.0/24"], False)
    assert peer.routes == ["192.168.1.0/24"] and peer.pending_routes == ["192.168.2.0/24"]
    assert run(base, "list-routes", "evil") == 0
    out = capsys.readouterr().out
    assert "192.168.2.0/24 waiting for approval" in out
    assert "from peers in 'h' (not applied: the network is locked)" in out
    assert run(base, "approve-routes", "evil", "--auto-approve", "10.0.0.0/8", "--cidr", "h",
               "--yes", "--lock-key", keyfile) != 0
    err = capsys.readouterr().err
    assert "auto-approve rule would approve routes no admin signed" in err
    assert err.count("error:") == 1
    assert len(store.route_approvers()) == 1
    # the database approving a route by itself (as a rule would): an admin's
    # next change to that peer is not signed over it
    store.conn.execute("UPDATE peer_routes SET approved = 1 WHERE route = '192.168.2.0/24'")
    store.advertise_routes(gw.id, ["192.168.1.0/24", "192.168.2.0/24", "192.168.3.0/24"], False)
    assert run(base, "approve-routes", "evil", "--name", "gw", "--routes", "192.168.3.0/24",
               "--yes", "--lock-key", keyfile) != 0
    err = capsys.readouterr().err
    assert "peer 10.66.1.7 differs from its signed record (routes not as signed)" in err, err
    recs, _ = store.lock_records()
    assert recs["peer:10.66.1.7"][0]["routes"] == ["192.168.1.0/24"]
    store.conn.execute("UPDATE peer_routes SET approved = 0 WHERE route = '192.168.2.0/24'")
    assert run(base, "approve-routes", "evil", "--name", "gw", "--routes",
               "192.168.2.0/24,192.168.3.0/24", "--yes", "--lock-key", keyfile) == 0
    recs, _ = store.lock_records()
    assert recs["peer:10.66.1.7"][0]["routes"] == ["192.168.1.0/24", "192.168.2.0/24",
                                                   "192.168.3.0/24"]


def test_an_admin_signs_nothing_the_server_resolved_from_a_name_it_moved(tmp_path, capsys):
    """A hijacked database swaps two CIDRs' names and two peers' names, and
    hides a signed peer: an admin's verb that names a CIDR or a peer resolves
    it through the server's view, so under lock it checks every record the
    change names against its signed one and refuses, naming it, rather than
    sign an association with, a peer in, a child of or the deletion of the
    wrong one."""
    base = cli_network(tmp_path, capsys)
    for name, rng in (("ops", "10.66.2.0/24"), ("secret", "10.66.3.0/24")):
        assert run(base, "add-cidr", "evil", "--name", name, "--cidr", rng, "--parent", "evil",
                   "--yes") == 0
    for name, cidr, ip in (("carol", "ops", "10.66.2.1"), ("dave", "secret", "10.66.3.1")):
        assert run(base, "add-peer", "evil", "--name", name, "--cidr", cidr, "--ip", ip,
                   "--admin", "false", "--invite-expires", "1d", "--save-config",
                   str(tmp_path / f"{name}.toml"), "--yes") == 0
    keyfile, _ = lock(tmp_path)
    store = Store(db_path(tmp_path))

    def swap(table, a, b):
        for old, new in ((a, "-"), (b, a), ("-", b)):
            store.conn.execute(f"UPDATE {table} SET name = ? WHERE name = ?", (new, old))
    swap("cidrs", "ops", "secret")
    before = store.lock_records()[0]
    capsys.readouterr()
    lies = [("add-association", ["h", "ops"], "CIDR 10.66.3.0/24"),
            ("add-peer", ["--name", "eve", "--cidr", "ops", "--admin", "false",
                          "--invite-expires", "1d", "--save-config", str(tmp_path / "eve.toml")],
             "CIDR 10.66.3.0/24"),
            ("add-cidr", ["--name", "kid", "--cidr", "10.66.3.128/25", "--parent", "ops"],
             "CIDR 10.66.3.0/24"),
            ("delete-peer", ["--name", "carol"], "peer 10.66.3.1")]
    for verb, argv, subject in lies:
        if verb == "delete-peer":
            swap("cidrs", "ops", "secret")
            swap("peers", "carol", "dave")
        assert run(base, verb, "evil", *argv, "--yes", "--lock-key", keyfile) != 0, verb
        err = capsys.readouterr().err
        assert f"the server's {subject} differs from its signed record (name not as " \
               "signed): not signing over it" in err, (verb, err)
        assert err.count("error:") == 1
    assert store.lock_records()[0] == before                    # nothing signed
    assert {p.name for p in store.peers()} >= {"carol", "dave"}
    # a signed peer hidden: the address the next peer would take is its
    swap("peers", "carol", "dave")
    store.conn.execute("DELETE FROM peers WHERE name = 'carol'")
    assert run(base, "add-peer", "evil", "--name", "eve", "--cidr", "ops", "--ip", "10.66.2.1",
               "--admin", "false", "--invite-expires", "1d", "--save-config",
               str(tmp_path / "eve.toml"), "--yes", "--lock-key", keyfile) != 0
    assert "a new invitation would take peer 10.66.2.1, but its signed record is a joined " \
           "peer's: not signing it" in capsys.readouterr().err
    # a signed CIDR hidden: a new one at its range, or overlapping it, is not signed
    store.conn.execute("DELETE FROM peers WHERE name = 'dave'")
    store.conn.execute("DELETE FROM cidrs WHERE name = 'secret'")
    for rng, why in (("10.66.3.0/24", "the server leaves it out"),
                     ("10.66.3.0/25", "it overlaps CIDR 10.66.3.0/24, signed, which the server "
                                      "leaves out")):
        assert run(base, "add-cidr", "evil", "--name", "x", "--cidr", rng, "--parent", "evil",
                   "--yes", "--lock-key", keyfile) != 0
        assert f"differs from its signed record ({why})" in capsys.readouterr().err
    assert store.lock_records()[0] == before


def test_a_change_the_server_shows_made_already_is_refused_not_sent_unsigned(tmp_path, capsys):
    """Eighteenth outside round, S1: the server swapped two CIDRs' names so
    that the pair an admin named in add-association was one associated
    already; the change was empty, so the verb sent its request unsigned and
    said it was done, and no locked client ever saw it. Under lock a change
    with nothing to sign is refused, after the CIDRs it names are checked
    against their signed records."""
    base = cli_network(tmp_path, capsys)
    for name, rng in (("ops", "10.66.2.0/24"), ("secret", "10.66.3.0/24")):
        assert run(base, "add-cidr", "evil", "--name", name, "--cidr", rng, "--parent", "evil",
                   "--yes") == 0
    assert run(base, "add-association", "evil", "h", "ops", "--yes") == 0
    keyfile, _ = lock(tmp_path)
    store = Store(db_path(tmp_path))
    before, assocs = store.lock_records()[0], store.associations()
    capsys.readouterr()
    assert run(base, "add-association", "evil", "h", "ops", "--yes", "--lock-key", keyfile) != 0
    err = capsys.readouterr().err
    assert "'h' and 'ops' are already associated: nothing to sign" in err, err
    assert err.count("error:") == 1
    for old, new in (("ops", "-"), ("secret", "ops"), ("-", "secret")):
        store.conn.execute("UPDATE cidrs SET name = ? WHERE name = ?", (new, old))
    assert run(base, "add-association", "evil", "h", "secret", "--yes",
               "--lock-key", keyfile) != 0
    err = capsys.readouterr().err
    assert "the server's CIDR 10.66.2.0/24 differs from its signed record (name not as " \
           "signed)" in err, err
    assert err.count("error:") == 1
    assert store.lock_records()[0] == before and store.associations() == assocs


def test_a_peer_the_server_shows_already_disabled_is_checked_against_its_signed_record(
        tmp_path, capsys):
    """Sixth outside attack, finding 3: the server says a peer is disabled
    already, so disable-peer signed nothing, and the server could bring the
    peer back whenever it liked. Under lock the admin's host checks the
    peer against its signed record first and says the server lies."""
    base = cli_network(tmp_path, capsys)
    assert run(base, "add-peer", "evil", "--name", "carol", "--cidr", "h", "--ip", "10.66.1.5",
               "--admin", "false", "--invite-expires", "1d", "--save-config",
               str(tmp_path / "carol.toml"), "--yes") == 0
    keyfile, _ = lock(tmp_path)
    store = Store(db_path(tmp_path))
    store.conn.execute("UPDATE peers SET is_disabled = 1 WHERE name = 'carol'")
    capsys.readouterr()
    assert run(base, "disable-peer", "evil", "--name", "carol", "--yes",
               "--lock-key", keyfile) != 0
    err = capsys.readouterr().err
    assert "the server's peer 10.66.1.5 differs from its signed record (disabled flag not as " \
           "signed)" in err and err.count("error:") == 1, err
    store.conn.execute("UPDATE peers SET is_disabled = 0 WHERE name = 'carol'")
    assert run(base, "enable-peer", "evil", "--name", "carol", "--yes",
               "--lock-key", keyfile) != 0
    assert "is already enabled" in capsys.readouterr().err        # true, and as signed


EXPORTED = '''network = "evil"
cidr = "10.66.0.0/16"

[[cidrs]]
name = "h"
cidr = "10.66.1.0/24"
parent = "evil"

[[cidrs]]
name = "{robots}"
cidr = "10.66.2.0/24"
parent = "evil"

[[associations]]
cidrs = ["h", "{robots}"]
'''


def test_apply_under_lock_shows_every_record_it_signs_whatever_the_plan_says(
        tmp_path, capsys, monkeypatch):
    """Tenth outside round, L1: an admin peer's plan is the server's answer,
    while its host signs its own reading of the file. A hijacked server put
    an association into the exported file and left it out of the plan; the
    admin saw only its own edit (a rename) and signed both. Under lock the
    plan now lists what this host signs, from its signed records; and an
    apply whose view of the network moved since that plan signs nothing."""
    base = cli_network(tmp_path, capsys)
    assert run(base, "add-cidr", "evil", "--name", "robots", "--cidr", "10.66.2.0/24",
               "--parent", "evil", "--yes") == 0
    keyfile, _ = lock(tmp_path)
    doc = tmp_path / "net.toml"
    doc.write_text(EXPORTED.format(robots="bots"))     # the lie: the association
    real_plan = innernet.LocalNetwork.plan

    def lying_plan(self, text, source):
        lines, problems, new = real_plan(self, text, source)
        return [x for x in lines if "association" not in x], problems, new
    monkeypatch.setattr(innernet.LocalNetwork, "plan", lying_plan)
    capsys.readouterr()
    assert run(base, "apply", "evil", str(doc), "--dry-run", "--lock-key", keyfile) == 0
    out = capsys.readouterr().out
    assert "association" not in out.split("Network lock")[0]          # the plan lies
    assert "Network lock: this host signs 2 record(s):\n" \
           "  + the association of 10.66.1.0/24 and 10.66.2.0/24\n" \
           "  ~ CIDR 10.66.2.0/24 (bots): name robots -> bots\n" in out, out
    # the view moves between the plan and the apply: nothing is signed
    store = Store(db_path(tmp_path))
    before = store.lock_records()[0]
    real_confirm = innernet.confirm

    def moved(*a):
        store.conn.execute("INSERT INTO associations (cidr_id_1, cidr_id_2) SELECT a.id, "
                           "b.id FROM cidrs a, cidrs b WHERE a.name = 'h' AND b.name = 'robots'")
        return real_confirm(*a)
    monkeypatch.setattr(innernet, "confirm", moved)
    assert run(base, "apply", "evil", str(doc), "--yes", "--lock-key", keyfile) != 0
    err = capsys.readouterr().err
    # (an association the database has unsigned is refused as such first, since
    # the twenty-first round: apply's change is worked out on the signed records)
    assert "the server's view of the network changed between the plan and the apply" in err \
        or "association of 10.66.1.0/24 and 10.66.2.0/24 differs from its signed record (it " \
           "has no signed record)" in err, err
    assert err.count("error:") == 1 and store.lock_records()[0] == before


def test_apply_signs_what_the_server_shows_made_already_or_refuses_its_problems_unsaid(
        tmp_path, capsys, monkeypatch):
    """Twenty-first outside round, V2 and V3: the server showed the
    association the file adds as there already (unsigned), so `apply`
    signed nothing and said it applied; and a lie elsewhere that made this
    host's own plan of the file fail (where the server's named no problem)
    turned its signing off altogether. Both are refused, nothing signed."""
    base = cli_network(tmp_path, capsys)
    assert run(base, "add-cidr", "evil", "--name", "robots", "--cidr", "10.66.2.0/24",
               "--parent", "evil", "--yes") == 0
    keyfile, _ = lock(tmp_path)
    store = Store(db_path(tmp_path))
    before = store.lock_records()[0]
    doc = tmp_path / "net.toml"
    doc.write_text(EXPORTED.format(robots="robots"))        # adds h <=> robots
    store.conn.execute("INSERT INTO associations (cidr_id_1, cidr_id_2) SELECT a.id, b.id "
                       "FROM cidrs a, cidrs b WHERE a.name = 'h' AND b.name = 'robots'")
    capsys.readouterr()
    assert run(base, "apply", "evil", str(doc), "--yes", "--lock-key", keyfile) != 0
    err = capsys.readouterr().err
    assert "the association of 10.66.1.0/24 and 10.66.2.0/24 differs from its signed record " \
           "(it has no signed record)" in err and err.count("error:") == 1, err
    store.conn.execute("DELETE FROM associations")
    doc.write_text(EXPORTED.format(robots="robots").replace('parent = "evil"\n\n[[assoc',
                                                            'parent = "nowhere"\n\n[[assoc'))
    real_plan = innernet.LocalNetwork.plan
    monkeypatch.setattr(innernet.LocalNetwork, "plan", lambda self, text, source: (
        real_plan(self, EXPORTED.format(robots="robots"), source)))   # "no problem"
    assert run(base, "apply", "evil", str(doc), "--yes", "--lock-key", keyfile) != 0
    err = capsys.readouterr().err
    assert "does not fit the server's view, whose plan found no problem: not signing" in err, err
    assert store.lock_records()[0] == before and not store.associations()


def test_under_lock_an_expired_invitation_waits_for_a_signed_deletion(tmp_path, capsys):
    """Outside round 22, V22-5: the sweeper deleted an expired invitation's row
    under lock; its signed record stayed live, unlisted, and every later
    `apply` was refused (the server leaves it out) with no verb to clear it.
    Under lock the row stays (an admin's delete-peer signs it away), and a
    deletion takes the address's enrollment along, so a new invitation there
    is not taken for a joined peer's."""
    base = cli_network(tmp_path, capsys)
    assert run(base, "add-peer", "evil", "--name", "uma", "--cidr", "h", "--ip", "10.66.1.9",
               "--admin", "false", "--invite-expires", "1d", "--save-config",
               str(tmp_path / "uma.toml"), "--yes") == 0
    keyfile, _ = lock(tmp_path)
    store = Store(db_path(tmp_path))
    later = int(time.time()) + 10 * innernet.INVITE_GRACE
    assert store.sweep_expired(later) == [] and store.peer_by_ip("10.66.1.9").name == "uma"
    store.lock_enroll("10.66.1.9", {"stale": "enrollment"})
    assert run(base, "delete-peer", "evil", "--name", "uma", "--yes",
               "--lock-key", keyfile) == 0
    assert "10.66.1.9" not in store.lock_enrollments()
    assert store.lock_records()[0]["peer:10.66.1.9"][0]["deleted"]
    # (without lock it is swept: test_store.py::test_redeem_once_and_sweep)


def test_a_cidr_is_not_deleted_under_lock_while_a_signed_record_names_it(tmp_path, capsys):
    """Tenth outside round, L4: the server hid an association and a peer of a
    CIDR, the admin's host signed the CIDR's deletion, and both came back
    live (still signed) under the next CIDR made at that range. A CIDR's
    deletion is signed only with, or after, every signed record naming it."""
    base = cli_network(tmp_path, capsys)
    assert run(base, "add-cidr", "evil", "--name", "ops", "--cidr", "10.66.2.0/24",
               "--parent", "evil", "--yes") == 0
    assert run(base, "add-association", "evil", "h", "ops", "--yes") == 0
    assert run(base, "add-peer", "evil", "--name", "carol", "--cidr", "ops", "--ip",
               "10.66.2.1", "--admin", "false", "--invite-expires", "1d", "--save-config",
               str(tmp_path / "carol.toml"), "--yes") == 0
    keyfile, _ = lock(tmp_path)
    store = Store(db_path(tmp_path))
    before = store.lock_records()[0]
    store.conn.execute("DELETE FROM associations")
    store.conn.execute("DELETE FROM peers WHERE name = 'carol'")
    capsys.readouterr()
    assert run(base, "delete-cidr", "evil", "--name", "ops", "--yes",
               "--lock-key", keyfile) != 0
    err = capsys.readouterr().err
    assert "the association of 10.66.1.0/24 and 10.66.2.0/24, signed, still names it" in err
    store.conn.execute("INSERT INTO associations (cidr_id_1, cidr_id_2) SELECT a.id, b.id "
                       "FROM cidrs a, cidrs b WHERE a.name = 'h' AND b.name = 'ops'")
    assert run(base, "delete-association", "evil", "h", "ops", "--yes",
               "--lock-key", keyfile) == 0
    capsys.readouterr()
    assert run(base, "delete-cidr", "evil", "--name", "ops", "--yes",
               "--lock-key", keyfile) != 0
    assert "peer 10.66.2.1, signed, still names it" in capsys.readouterr().err
    recs = store.lock_records()[0]
    assert recs["cidr:10.66.2.0/24"] == before["cidr:10.66.2.0/24"]


def test_no_second_signed_peer_takes_a_signed_name_the_server_hid(tmp_path, capsys):
    """Tenth outside round, L6: with dave hidden, renaming bob to dave was
    signed, and every client had two 'dave's in its hosts file."""
    base = cli_network(tmp_path, capsys)
    for name, ip in (("bob", "10.66.1.3"), ("dave", "10.66.1.4")):
        assert run(base, "add-peer", "evil", "--name", name, "--cidr", "h", "--ip", ip,
                   "--admin", "false", "--invite-expires", "1d", "--save-config",
                   str(tmp_path / f"{name}.toml"), "--yes") == 0
    keyfile, _ = lock(tmp_path)
    store = Store(db_path(tmp_path))
    store.conn.execute("DELETE FROM peers WHERE name = 'dave'")
    capsys.readouterr()
    assert run(base, "rename-peer", "evil", "--name", "bob", "--new-name", "dave", "--yes",
               "--lock-key", keyfile) != 0
    assert "its name 'dave' is peer 10.66.1.4's, signed" in capsys.readouterr().err
    assert store.peer_by_name("bob") is not None


@pytest.mark.parametrize("name", ["/tmp/abs-by-server", "../up", "a/b", "", 7])
def test_an_invitation_file_name_from_the_server_is_a_peer_name_never_a_path(name):
    """Tenth outside round, L5: `apply --save-invites DIR` on an admin peer
    named each invitation file after the server's plan answer, so a server
    could write one outside DIR."""
    net = object.__new__(innernet.RemoteNetwork)
    net.api = types.SimpleNamespace(call=lambda *a: {
        "plan": ["+ peer 10.66.1.9 (x)"], "invite": [{"name": name, "ip": "10.66.1.9"}]})
    with pytest.raises(innernet.InnernetError) as e:
        net.plan("", "f.toml")
    assert "from the server" in e.value.message or "field 'name'" in e.value.message


def test_apply_under_lock_signs_a_new_peer_only_with_an_invitation_made_here(
        tmp_path, capsys, monkeypatch):
    """Twelfth outside round, N1: `apply` made invitations only for the new
    peers the server's plan named, while it signed a record for each new
    peer in the file; one the server left out took its key from the signed
    record at that address -- the deleted peer's (a stolen key, back). The
    plan's invitations must be the file's new peers, and a new peer's record
    names only the key of an invitation made here."""
    base = cli_network(tmp_path, capsys)
    assert run(base, "add-peer", "evil", "--name", "dave", "--cidr", "h", "--ip", "10.66.1.4",
               "--admin", "false", "--invite-expires", "1d", "--save-config",
               str(tmp_path / "dave.toml"), "--yes") == 0
    keyfile, _ = lock(tmp_path)
    assert run(base, "delete-peer", "evil", "--name", "dave", "--reuse-after", "0s", "--yes",
               "--lock-key", keyfile) == 0
    store = Store(db_path(tmp_path))
    before = store.lock_records()[0]
    doc = tmp_path / "net.toml"
    doc.write_text('network = "evil"\ncidr = "10.66.0.0/16"\n\n[[cidrs]]\nname = "h"\n'
                   'cidr = "10.66.1.0/24"\nparent = "evil"\n\n[[peers]]\nname = "erin"\n'
                   'ip = "10.66.1.4"\ncidr = "h"\nadmin = false\ndisabled = false\n')
    real_plan = innernet.LocalNetwork.plan

    def no_invitation(self, text, source):
        lines, problems, new = real_plan(self, text, source)
        return lines, problems, []
    monkeypatch.setattr(innernet.LocalNetwork, "plan", no_invitation)
    capsys.readouterr()
    assert run(base, "apply", "evil", str(doc), "--yes", "--lock-key", keyfile,
               "--save-invites", str(tmp_path / "inv")) != 0
    err = capsys.readouterr().err
    assert "the server's plan makes 0 invitation(s), not one for each of the 1 new peer(s)" \
        in err, err
    assert err.count("error:") == 1 and store.lock_records()[0] == before
    # thirteenth round, P1: the invitations' names swapped (a guest's file holding an
    # admin's seat), or one address twice, are refused the same way
    doc.write_text(doc.read_text() + '\n[[peers]]\nname = "fred"\nip = "10.66.1.9"\n'
                   'cidr = "h"\nadmin = true\ndisabled = false\n')
    for lie in (lambda new: [(new[1][0], new[0][1]), (new[0][0], new[1][1])],
                lambda new: [(new[0][0], new[0][1]), (new[1][0], new[0][1])]):
        def lying(self, text, source, lie=lie):
            lines, problems, new = real_plan(self, text, source)
            return lines, problems, lie(sorted(new))
        monkeypatch.setattr(innernet.LocalNetwork, "plan", lying)
        assert run(base, "apply", "evil", str(doc), "--yes", "--lock-key", keyfile,
                   "--save-invites", str(tmp_path / "inv")) != 0
        assert "the server's plan makes 2 invitation(s), not one for each of the 2 new " \
               "peer(s)" in capsys.readouterr().err
        assert store.lock_records()[0] == before and not os.listdir(tmp_path / "inv")
    # and the signer itself takes no key for a new peer but an invitation's
    records = {s: p for s, (p, _) in before.items()}
    signer = innernet.LockSigner(store.lock_chain(), records, None)
    assert records["peer:10.66.1.4"]["deleted"]
    fields = dict(innernet.lock_fields(records["peer:10.66.1.4"]), name="erin", deleted=False)
    with pytest.raises(innernet.InnernetError, match="no invitation of this host's names"):
        signer.planned({"peer:10.66.1.4": fields})


@pytest.mark.parametrize("extra", ["0.0.0.0/0", "0.0.0.0/1", "10.67.0.0/16", "fd00::/64"])
def test_an_admin_peer_takes_no_cidr_outside_the_range_it_joined(extra):
    """Fourteenth outside round, Q1: an admin peer made invitations' prefixes
    and static peers' AllowedIPs from the server's CIDR list; a CIDR
    0.0.0.0/0 there had a phone's wg-quick file route all its traffic to the
    server, 0.0.0.0/1 a joiner's half of IPv4 into the tunnel."""
    root = {"id": 1, "name": "evil", "cidr": "10.66.0.0/16", "parent": None}
    lie = {"id": 9, "name": "world", "cidr": extra, "parent": None}
    net = object.__new__(innernet.RemoteNetwork)
    net.config = types.SimpleNamespace(address=innernet.ipaddress.ip_interface("10.66.1.1/16"))
    net.api = types.SimpleNamespace(writes=0, call=lambda *a: [root, lie])
    with pytest.raises(innernet.InnernetError) as e:
        net.cidrs()
    assert f"the server lists CIDR {extra} outside the network's range 10.66.0.0/16" \
        in e.value.message
    net = object.__new__(innernet.RemoteNetwork)
    net.config = types.SimpleNamespace(address=innernet.ipaddress.ip_interface("10.66.1.1/16"))
    net.api = types.SimpleNamespace(writes=0, call=lambda *a: [root])
    assert [c.cidr for c in net.cidrs()] == ["10.66.0.0/16"]


def test_a_peers_adoption_proof_is_found_under_the_keys_it_rotated_away_from(tmp_path):
    """Outside round 27, R27-3 (the server's half): `lock init` keeps each
    adoption proof under the peer's key of the time. A peer that rotated
    since asks with its new key and gets the proof kept under an earlier
    one; a peer given a deleted peer's address gets nothing of it (and no
    proof made for someone else), and a peer without one a 404."""
    co = make_coordinator(tmp_path)
    store = co.store
    admin, user1 = store.peer_by_name("admin"), store.peer_by_name("user1")
    private, public = lock_keypair()
    chain = LockChain([lock_genesis("test", [(public, "first")], "s", private, 0)])
    keys = {p.ip: p.public_key for p in store.peers()}
    recs = [lock_record("test", 1, f, keys.get(f.get("ip")))
            for f in lock_projection(store.peers(), store.cidrs(), store.associations()).values()]
    mac = innernet.base64.b64encode(b"user1's proof".ljust(32, b".")).decode()
    store.lock_submit(chain.entries, {"batch": sign_batch("test", private, recs), "records": recs},
                      {user1.public_key: mac}, admin.ip)

    def ask(who="user1"):
        return call(co, "GET", "/v1/user/lock-adoption", who)
    assert ask() == (200, {"admin_ip": admin.ip, "admin_key": admin.public_key,
                           "mac": mac})
    for _ in range(2):                                     # two rotations later
        store.rotate_key(user1.id, innernet.public_key(innernet.generate_private_key()), {})
    assert ask()[1]["mac"] == mac
    assert ask("user2")[0] == 404                          # never given one
    # deleted, and its address given to a new peer: that one's own, none
    store.delete_peer(user1.id, 0)
    store.add_peer(innernet.Peer(None, "newcomer", user1.ip, user1.cidr_id,
                                 innernet.public_key(innernet.generate_private_key()),
                                 is_redeemed=True))
    status, answer = ask()
    assert status == 404 and "no lock adoption proof" in answer["error"], answer



def test_a_record_signed_again_as_it_is_is_kept_after_its_peer_withdrew_a_route(
        tmp_path, capsys):
    """Outside round 35, R35-6: a peer that withdrew a route an admin had
    approved (a user route: any local user of its host can) left its signed
    record naming the route, and the server refused the record signed again
    as it is -- by a `lock remove` of the key that signed it, by the resend
    after a restore -- "does not match the network after the change", so the
    key stayed trusted. The very record it holds, signed again, is kept now:
    the server holds fewer routes than signed, which clients install. A new
    record naming the route (a new serial: R35-7's signing of a rotated key
    drops it, LockSigner.planned), one the server holds otherwise (a name),
    or a change signing the peer itself must still match."""
    base = cli_network(tmp_path, capsys)
    assert run(base, "add-peer", "evil", "--name", "bob", "--cidr", "h", "--ip", "10.66.1.2",
               "--admin", "false", "--invite-expires", "1d", "--save-config",
               str(tmp_path / "b.toml"), "--yes") == 0
    store = Store(db_path(tmp_path))
    with store.conn:
        store.conn.execute("UPDATE peers SET is_redeemed = 1, public_key = ? WHERE name = 'bob'",
                           (innernet.public_key(innernet.generate_private_key()),))
        store.conn.execute("INSERT INTO peer_routes (peer_id, route, approved) SELECT id, "
                           "'192.168.60.0/24', 1 FROM peers WHERE name = 'bob'")
    (a_priv, a_pub), (b_priv, b_pub) = lock_keypair(), lock_keypair()
    chain = LockChain([lock_genesis("evil", [(a_pub, "a"), (b_pub, "b")], "s", a_priv, 0)])
    keys = {p.ip: p.public_key for p in store.peers()}
    recs = [lock_record("evil", 1, f, keys.get(f.get("ip")))
            for f in lock_projection(store.peers(), store.cidrs(), store.associations()).values()]
    assert any(r.get("routes") == ["192.168.60.0/24"] for r in recs)
    store.lock_submit(chain.entries, {"batch": sign_batch("evil", b_priv, recs), "records": recs},
                      {}, "10.66.0.1")
    with store.conn:                      # bob withdraws it (POST /v1/user/routes)
        store.conn.execute("DELETE FROM peer_routes")
    removal = chain.entries + [innernet.lock_update(chain, "remove", b_pub, "b", a_priv, 0)]
    again = {"batch": sign_batch("evil", a_priv, recs), "records": recs}
    renamed = [dict(r, name="robert") if r.get("name") == "bob" else r for r in recs]
    with pytest.raises(innernet.InnernetError, match="does not match the network after"):
        store.lock_submit(removal, {"batch": sign_batch("evil", a_priv, renamed),
                                    "records": renamed}, {}, "10.66.0.1")
    assert len(store.lock_chain().entries) == 1          # nothing half-written
    newer = [dict(r, n=2) if r.get("name") == "bob" else r for r in recs]
    with pytest.raises(innernet.InnernetError, match="does not match the network after"):
        store.lock_submit(removal, {"batch": sign_batch("evil", a_priv, newer),
                                    "records": newer}, {}, "10.66.0.1")
    store.lock_submit(removal, again, {}, "10.66.0.1")
    still = innernet.verified_lock_records(store.lock_chain(), *store.lock_listing())
    assert still["peer:10.66.1.2"]["routes"] == ["192.168.60.0/24"]
    bob = store.peer_by_name("bob")       # a change of the peer itself: as it leaves it, exactly
    moved = dict(lock_projection([bob], store.cidrs(), [])["peer:10.66.1.2"], name="robert")
    rec = lock_record("evil", 2, dict(moved, routes=["192.168.60.0/24"]), bob.public_key)
    with pytest.raises(innernet.InnernetError, match="would change without a record signed"):
        store._lock_keep(store.conn, store.lock_chain(), {
            "batch": sign_batch("evil", a_priv, [rec]), "records": [rec]},
            {"peer:10.66.1.2": moved}, {"peer:10.66.1.2": moved})
