"""Network lock (issue 32): the pure core -- canonical records, signatures,
the lock chain, batches, enrollments and the client's verifier."""
import copy
import types
import json
import os

import pytest

try:
    import nacl.signing  # noqa: F401
    HAVE_NACL = True
except ImportError:
    HAVE_NACL = False
# Collected without PyNaCl too (tests/test_suite.py), and skipped with the reason.
pytestmark = pytest.mark.skipif(not HAVE_NACL,
                                reason="network lock needs PyNaCl")

import innernet  # noqa: E402
from innernet import (Cidr, InnernetError, LockChain, Peer, adopt_chain,  # noqa: E402
                      assoc_payload, batch_valid, cidr_payload, enrollment_key,
                      lock_canonical, lock_disablement, lock_genesis, lock_hash, lock_keypair,
                      lock_sign, lock_update, lock_verify, peer_payload, sign_batch,
                      sign_enrollment, verify_state)

NET = "evilcorp"
T = 1_700_000_000


def test_the_canonical_form_is_deterministic_and_refuses_floats():
    assert lock_canonical({"b": [1, True, None], "a": "x"}) == b'{"a":"x","b":[1,true,null]}'
    assert lock_hash({"a": 1, "b": 2}) == lock_hash({"b": 2, "a": 1})
    with pytest.raises(InnernetError):
        lock_canonical({"a": 1.5})


def test_a_signature_verifies_for_its_payload_and_key_only():
    priv, pub = lock_keypair()
    other_priv, other_pub = lock_keypair()
    sig = lock_sign(priv, {"x": 1})
    assert lock_verify(pub, {"x": 1}, sig)
    assert not lock_verify(pub, {"x": 2}, sig)
    assert not lock_verify(other_pub, {"x": 1}, sig)
    assert not lock_verify(pub, {"x": 1}, "garbage")
    assert not lock_verify("garbage", {"x": 1}, sig)


def chain_of(*keys, secret="s3cret"):
    g = lock_genesis(NET, [(k[1], f"k{i}") for i, k in enumerate(keys)], secret, keys[0][0], T)
    return [g]


def test_a_chain_grows_by_signed_updates_and_is_disabled_by_its_secret_only():
    a, b, c = lock_keypair(), lock_keypair(), lock_keypair()
    entries = chain_of(a)
    ch = LockChain(entries)
    assert set(ch.keys) == {a[1]}
    entries.append(lock_update(ch, "add", b[1], "b", a[0], T))
    ch = LockChain(entries)
    assert set(ch.keys) == {a[1], b[1]}
    entries.append(lock_update(ch, "remove", a[1], "a", b[0], T))
    ch = LockChain(entries)
    assert set(ch.keys) == {b[1]}
    # a removed key, or one never trusted, cannot sign an update
    for signer in (a, c):
        with pytest.raises(InnernetError, match="not signed by a key trusted"):
            LockChain(entries + [lock_update(ch, "add", c[1], "c", signer[0], T)])
    with pytest.raises(InnernetError, match="secret is wrong"):
        LockChain(entries + [lock_disablement(ch, "guess", T)])
    assert LockChain(entries + [lock_disablement(ch, "s3cret", T)]).disabled


def test_a_chain_must_be_linked_and_its_genesis_signed():
    a, b = lock_keypair(), lock_keypair()
    entries = chain_of(a)
    forged = copy.deepcopy(entries)
    forged[0]["payload"]["keys"].append({"key": b[1], "name": "evil"})
    with pytest.raises(InnernetError, match="genesis is not signed"):
        LockChain(forged)
    ch = LockChain(entries)
    up = lock_update(ch, "add", b[1], "b", a[0], T)
    up2 = copy.deepcopy(up)
    up2["payload"]["prev"] = "x" * 24
    with pytest.raises(InnernetError, match="does not follow"):
        LockChain(entries + [up2])


def test_a_client_takes_only_a_chain_that_extends_its_own():
    a, b = lock_keypair(), lock_keypair()
    entries = chain_of(a)
    mine = LockChain(entries)
    longer = entries + [lock_update(mine, "add", b[1], "b", a[0], T)]
    kept, note = adopt_chain(mine, longer)
    assert kept.head == LockChain(longer).head and note is None
    kept, note = adopt_chain(LockChain(longer), entries)          # withheld: ours stays
    assert kept.head == LockChain(longer).head and "does not extend" in note
    other = chain_of(b)                                            # another genesis
    kept, note = adopt_chain(mine, other)
    assert kept.head == mine.head and "does not extend" in note
    kept, note = adopt_chain(mine, None)                           # the server drops lock
    assert kept is mine and "no lock chain" in note


# -- a network for the verifier ---------------------------------------------------

class Net:
    """A signed network: root 10.66.0.0/16, humans .1.0/24, others .2.0/24,
    servers .0.0/24 (infra); alice in humans."""

    def __init__(self):
        self.admin = lock_keypair()
        self.chain = LockChain(chain_of(self.admin))
        self.serial = 1
        self.cidrs = [Cidr(1, "evilcorp", "10.66.0.0/16", None),
                      Cidr(2, "innernet-server", "10.66.0.0/24", 1),
                      Cidr(3, "humans", "10.66.1.0/24", 1), Cidr(4, "others", "10.66.2.0/24", 1)]
        self.records = [cidr_payload(NET, 1, cidr=c.cidr, name=c.name,
                                     parent={None: None, 1: "10.66.0.0/16"}[c.parent])
                        for c in self.cidrs]
        self.peers = []
        self.batches = []
        self.enroll = {}
        for name, ip, cidr in (("alice", "10.66.1.2", 3), ("bob", "10.66.1.3", 3),
                               ("carol", "10.66.2.4", 4)):
            self.add_peer(name, ip, cidr, key=f"{name}-key")
        self.sign()

    def range(self, cidr_id):
        return next(c.cidr for c in self.cidrs if c.id == cidr_id)

    def add_peer(self, name, ip, cidr_id, key, sign=True, **kw):
        peer = Peer(len(self.peers) + 10, name, ip, cidr_id, key, is_redeemed=True, **kw)
        self.peers.append(peer)
        if sign:
            self.records.append(self.payload(peer))
        return peer

    def set(self, who, **kw):
        i = next(i for i, p in enumerate(self.peers) if p.name == who)
        self.peers[i] = innernet.replaced(self.peers[i], **kw)
        return self.peers[i]

    def payload(self, peer, key=None, deleted=False):
        self.serial += 1
        return peer_payload(NET, self.serial, ip=peer.ip, key=key or peer.public_key,
                            name=peer.name, cidr=self.range(peer.cidr_id), admin=peer.is_admin,
                            routes=peer.routes, exit=peer.exit_node, static=peer.is_static,
                            disabled=peer.is_disabled, deleted=deleted)

    def sign(self, private=None, payloads=None):
        self.batches.append(sign_batch(NET, private or self.admin[0],
                                       self.records if payloads is None else payloads))

    def lock(self):
        return {"batches": self.batches, "records": self.records, "enroll": self.enroll}

    def verify(self, known=None, rotated=None, peers=None, lock=None, cidrs=None, skip=(),
               own_name=None):
        acc, ref, known = verify_state(self.chain, lock or self.lock(), peers or self.peers,
                                       cidrs or self.cidrs, "10.66.1.2", known or {},
                                       rotated=rotated, skip=skip, own_name=own_name)
        return {p.name: p for p in acc}, {p.name: r for p, r in ref}, known


def test_an_honest_state_is_accepted_and_unassociated_cidrs_are_not_seen():
    n = Net()
    acc, ref, _ = n.verify()
    assert set(acc) == {"alice", "bob"}
    assert "not one this host may see" in ref["carol"]
    n.records.append(assoc_payload(NET, 50, a="10.66.1.0/24", b="10.66.2.0/24"))
    n.sign(payloads=n.records[-1:])
    acc, ref, _ = n.verify()
    assert set(acc) == {"alice", "bob", "carol"} and not ref


def test_a_range_signed_for_two_peers_goes_to_the_one_signed_last():
    """Outside round 36, S36-1: bob withdrew a LAN an admin had approved for
    him (the withdrawal is not signed, so his record still names it), and an
    admin approved the same range for dave since; a hijacked server approving
    it for bob again in its database took it from dave on every client.
    The range goes to the peer whose record naming it is the newest."""
    n = Net()
    lan = "192.168.41.0/24"
    bob = n.set("bob", routes=[lan])
    n.records.append(n.payload(bob))                 # approved for bob, signed
    dave = n.add_peer("dave", "10.66.1.5", 3, "dave-key", routes=[lan])   # later, for dave
    n.sign(payloads=n.records[-2:])
    n.set("dave", routes=[])                         # the server gives it back to bob
    acc, ref, _ = n.verify()
    assert acc["bob"].routes == [] and lan in ref["bob"] and "signed later for another" \
        in ref["bob"] and acc["dave"].routes == []
    n.set("dave", routes=[lan])                      # both: dave's, signed last
    acc, ref, _ = n.verify()
    assert acc["dave"].routes == [lan] and acc["bob"].routes == []
    n.set("bob", routes=[])                          # the honest view
    acc, ref, _ = n.verify()
    assert acc["dave"].routes == [lan] and "bob" not in ref and "dave" not in ref
    # outside round 37, T37-2: the server hides dave's record (and dave):
    # this host remembers what it verified, and bob still gets none of it
    _, _, known = n.verify()
    hidden = dict(n.lock(), records=[r for r in n.records if r.get("ip") != "10.66.1.5"])
    n.set("bob", routes=[lan])
    acc, ref, _ = n.verify(known=known, lock=hidden,
                           peers=[p for p in n.peers if p.name != "dave"])
    assert acc["bob"].routes == [] and "signed later for another" in ref["bob"]
    n.set("bob", routes=[])
    # T37-1: a part of dave's newer range, signed for bob before, is cut too;
    # a newer, narrower approval inside an older one is not
    eve = n.add_peer("eve", "10.66.1.6", 3, "eve-key", routes=["192.168.41.0/25"], sign=False)
    n.records.insert(0, n.payload(eve))
    n.records[0]["n"] = 1
    n.sign(payloads=n.records[:1])
    acc, ref, _ = n.verify()
    assert acc["eve"].routes == [] and "192.168.41.0/25 signed later" in ref["eve"]
    frank = n.add_peer("frank", "10.66.1.7", 3, "frank-key", routes=["192.168.41.128/25"])
    n.sign(payloads=n.records[-1:])
    acc, ref, _ = n.verify()
    assert acc["frank"].routes == ["192.168.41.128/25"] and acc["dave"].routes == [lan]
    # the same LAN behind a site this host may not see (carol's, in others)
    # takes nothing from the one it sees
    carol = n.set("carol", routes=[lan])
    n.records.append(n.payload(carol))
    n.sign(payloads=n.records[-1:])
    acc, ref, _ = n.verify()
    assert acc["dave"].routes == [lan] and "dave" not in ref and "carol" not in acc


def test_an_admins_host_signs_no_range_back_to_a_peer_it_was_signed_away_from():
    """Outside round 37, T37-3 and T37-4: a hijacked server shows bob's
    withdrawn range approved again after an admin approved it for dave; an
    admin's rename of bob, or any change after bob's rotation, signed bob's
    record anew with it, newer than dave's, and every client moved it to bob.
    The admin's host refuses the rename (naming the way out) and leaves the
    rotation's re-signing for later; an approve-routes that asks for it, does."""
    n = Net()
    lan = "192.168.41.0/24"
    bob = n.set("bob", routes=[lan])
    n.records.append(n.payload(bob))
    n.add_peer("dave", "10.66.1.5", 3, "dave-key", routes=[lan])
    recs = {innernet.record_subject(p): p for p in n.records}
    B = "peer:10.66.1.3"
    renamed = dict(innernet.lock_fields(recs[B]), name="robert")
    assert innernet.lock_route_conflict(B, renamed, recs) == [lan]
    assert innernet.lock_route_conflict(B, renamed, recs, {lan}) == []
    with pytest.raises(InnernetError, match=r"names 192.168.41.0/24, signed later for another "
                                            r"peer") as e:
        innernet.refuse_route_taken(B, renamed, recs)
    assert "--routes 192.168.41.0/24 --revoke" in e.value.hint
    signer = innernet.LockSigner(n.chain, recs, n.admin[0], {B: "bob-key-2"}, {B: recs[B]["n"]})
    carol = recs["peer:10.66.2.4"]
    out = signer.signed({"peer:10.66.2.4": dict(innernet.lock_fields(carol), name="caroline")})
    assert [r["ip"] for r in out["records"]] == ["10.66.2.4"]
    # outside round 38, U38-1: the server leaves dave's record out of what
    # the admin's host gets; the host remembers it (its lock file's "known")
    D = "peer:10.66.1.5"
    known = {D: [recs[D]["n"], "h", None, None, [lan]]}
    hidden = {k: v for k, v in recs.items() if k != D}
    assert innernet.lock_route_conflict(B, renamed, hidden) == []
    with pytest.raises(InnernetError, match="signed later for another peer"):
        innernet.refuse_route_taken(B, renamed, hidden, (), known)
    # U38-2: an approval for dave in the very batch keeps bob's waiting
    # re-signing (the same serial) out of it
    old = {k: v for k, v in recs.items() if k != D}
    old[B] = dict(old[B], n=1)
    signer = innernet.LockSigner(n.chain, old, n.admin[0], {B: "bob-key-2"}, {B: 1})
    dave = dict(innernet.lock_fields(recs[D]))
    out = signer.signed({D: dave}, {D: "dave-key"})
    assert [r["ip"] for r in out["records"]] == ["10.66.1.5"]


def test_a_record_no_trusted_key_signed_is_refused():
    n = Net()
    n.add_peer("mallory", "10.66.1.66", 3, "mallory-key")       # the server's own
    evil = lock_keypair()
    n.sign(evil[0], n.records[-1:])
    acc, ref, _ = n.verify()
    assert "mallory" not in acc and "signed by a trusted" in ref["mallory"]


@pytest.mark.parametrize("field,value,what", [
    ("is_admin", True, "admin flag"), ("is_static", True, "static flag"),
    ("is_disabled", True, "disabled flag"),
    ("cidr_id", 4, "CIDR"), ("name", "bobby", "name"), ("public_key", "evil-key", "key")])
def test_a_field_the_admin_did_not_sign_is_refused(field, value, what):
    n = Net()
    bob = n.set("bob", **{field: value})
    acc, ref, _ = n.verify()
    assert bob.name not in acc and what in ref[bob.name], ref


def test_routes_and_an_exit_node_the_admin_did_not_sign_are_not_installed():
    n = Net()
    n.set("bob", routes=["192.168.5.0/24"], exit_node=True)
    acc, ref, _ = n.verify()
    assert acc["bob"].routes == [] and not acc["bob"].exit_node
    assert "192.168.5.0/24, the exit node not signed" in ref["bob"]


def test_the_servers_own_record_gives_no_more_than_it_signed():
    """Issue 32, outside probe: the server's entry is kept (the client needs
    it), but a route, exit node, name or admin flag its signed record lacks
    is not (a /25 inside another peer's signed /24 would steal its traffic;
    the name 'alice' would map to the server in the hosts file)."""
    n = Net()
    server = n.add_peer("innernet-server", "10.66.0.1", 2, "server-key")
    n.sign(payloads=n.records[-1:])
    n.set("innernet-server", routes=["192.168.5.0/25"], exit_node=True, name="alice",
          is_admin=True)
    acc, ref, _ = n.verify(skip={server.ip})
    kept = next(p for p in acc.values() if p.ip == server.ip)
    assert kept.routes == [] and not kept.exit_node and not kept.is_admin
    assert kept.name == "innernet-server"
    assert "192.168.5.0/25, the exit node not signed" in ref["innernet-server"]
    assert "name 'alice' is not the signed one" in ref["innernet-server"]
    # a route its record signed stays; with no record at all, none does
    n.peers[-1] = innernet.replaced(n.peers[-1], name="innernet-server", is_admin=False,
                                      exit_node=False)
    n.records.append(n.payload(innernet.replaced(server, routes=["192.168.5.0/25"])))
    n.sign(payloads=n.records[-1:])
    acc, ref, _ = n.verify(skip={server.ip})
    assert acc["innernet-server"].routes == ["192.168.5.0/25"] and "innernet-server" not in ref
    n.records = [r for r in n.records if r.get("ip") != server.ip]
    acc, ref, _ = n.verify(skip={server.ip})
    assert acc["innernet-server"].routes == [] and "not signed" in ref["innernet-server"]


def test_this_hosts_own_record_gives_no_route_it_did_not_sign():
    """An unsigned route on a client's own record would turn forwarding on
    (route_peers) for the hijacked server to reach its LAN: it is cut."""
    n = Net()
    n.set("alice", routes=["192.168.77.0/24"], exit_node=True)
    acc, ref, _ = n.verify()
    assert acc["alice"].routes == [] and not acc["alice"].exit_node
    assert "192.168.77.0/24, the exit node not signed" in ref["alice"]
    alice = n.peers[0]
    n.records.append(n.payload(innernet.replaced(alice, exit_node=False)))
    n.sign(payloads=n.records[-1:])
    acc, ref, _ = n.verify()
    assert acc["alice"].routes == ["192.168.77.0/24"] and not acc["alice"].exit_node
    assert ref["alice"].startswith("the exit node not signed")


def test_this_hosts_own_name_is_not_the_servers_when_it_sends_no_signed_record():
    """A server that leaves out this host's own record (or replays an older
    one) does not name this host: it keeps the name it kept last time."""
    n = Net()
    n.set("alice", name="bob")                      # alice's hosts entry would say bob
    lock = dict(n.lock(), records=[r for r in n.records if r.get("ip") != "10.66.1.2"])
    acc, ref, _ = n.verify(lock=lock, own_name="alice")
    assert acc["alice"].ip == "10.66.1.2"
    assert "its name 'bob' is not the signed one: kept as signed (as 'alice')" in ref["alice"]


def test_an_address_move_is_refused():
    n = Net()
    n.set("bob", ip="10.66.1.77")
    acc, ref, _ = n.verify()
    assert "bob" not in acc and "no record signed" in ref["bob"]


def test_a_key_change_needs_the_rotating_peers_own_proof_chain():
    n = Net()
    n.set("bob", public_key="bob-key-2")
    chain = {("10.66.1.3", "bob-key", "bob-key-2")}
    acc, ref, known = n.verify(rotated=lambda ip, a, b: (ip, a, b) in chain)
    assert "bob" in acc and known["peer:10.66.1.3"][2] == "bob-key-2"
    acc, ref, _ = n.verify(rotated=lambda ip, a, b: False)
    assert "bob" not in acc and "rotation" in ref["bob"]
    # once accepted, the key stays accepted while the record is the same
    acc, ref, _ = n.verify(known=known, rotated=lambda ip, a, b: False)
    assert "bob" in acc


def test_an_admins_next_signing_names_the_rotated_key_its_own_sync_took():
    """Sixth outside attack, finding 1: a rotation was never signed, every
    admin signature named the old key, and a server holding the old private
    key could show it to a client that joined later. An admin's host that
    took the new key along the peer's proofs signs it at its next change."""
    n = Net()
    n.set("bob", public_key="bob-key-2")
    chain = {("10.66.1.3", "bob-key", "bob-key-2")}
    _, _, known = n.verify(rotated=lambda ip, a, b: (ip, a, b) in chain)
    recs = {innernet.record_subject(p): p for p in n.records}
    assert innernet.lock_known_keys(recs, known) == {"peer:10.66.1.3": "bob-key-2"}
    signer = innernet.LockSigner(n.chain, recs, n.admin[0], innernet.lock_known_keys(recs, known),
                                 innernet.lock_newest({"known": known}))
    carol = recs["peer:10.66.2.4"]
    out = signer.signed({"peer:10.66.2.4": dict(innernet.lock_fields(carol), name="caroline")})
    again = {innernet.record_subject(r): r for r in out["records"]}
    assert again["peer:10.66.1.3"]["key"] == "bob-key-2"
    n.records.append(again["peer:10.66.1.3"])
    n.batches.append(out["batch"])
    acc, ref, _ = n.verify(rotated=lambda ip, a, b: False)     # a client with no proofs
    assert acc["bob"].public_key == "bob-key-2" and "bob" not in ref
    n.set("bob", public_key="bob-key")                         # the old key, shown again
    acc, ref, _ = n.verify(rotated=lambda ip, a, b: False)
    assert "bob" not in acc


def test_a_rotated_peers_record_signed_again_drops_the_routes_it_withdrew():
    """Outside round 35, R35-7: the record of a peer whose rotated key an
    admin's host took is signed again at that host's next change; it named
    a route the peer had withdrawn since, and the server refused every change
    of that admin. It is signed as the server holds it now where that is
    only fewer routes (the route is then signed no more), and as signed
    where the server holds more (a route it approved by itself stays out)."""
    n = Net()
    bob = "peer:10.66.1.3"
    recs = {innernet.record_subject(p): p for p in n.records}
    recs[bob] = dict(recs[bob], routes=["192.168.5.0/24"])
    carol = recs["peer:10.66.2.4"]
    change = {"peer:10.66.2.4": dict(innernet.lock_fields(carol), name="caroline")}
    for now_routes, signed_routes in ((["192.168.5.0/24", "10.9.9.0/24"], ["192.168.5.0/24"]),
                                      ([], [])):
        now = {bob: dict(innernet.lock_fields(recs[bob]), routes=now_routes)}
        signer = innernet.LockSigner(n.chain, recs, n.admin[0], {bob: "bob-key-2"},
                                     {bob: recs[bob]["n"]})
        out = signer.signed(change, now=now)
        again = {innernet.record_subject(r): r for r in out["records"]}
        assert again[bob]["key"] == "bob-key-2" and again[bob]["routes"] == signed_routes


def test_widening_the_tree_or_the_associations_without_a_signature_is_refused():
    n = Net()
    # the server moves 'others' under 'humans' and adds an association, unsigned
    n.cidrs[3] = innernet.replaced(n.cidrs[3], parent=3)
    forged = [cidr_payload(NET, 99, cidr="10.66.2.0/24", name="others", parent="10.66.1.0/24"),
              assoc_payload(NET, 99, a="10.66.1.0/24", b="10.66.2.0/24")]
    n.records += forged
    acc, ref, _ = n.verify()
    assert "carol" not in acc


def test_a_deleted_peer_brought_back_or_an_older_record_replayed_is_refused():
    n = Net()
    old = [copy.deepcopy(n.records), copy.deepcopy(n.batches)]
    _, _, known = n.verify()
    bob = n.set("bob", routes=["192.168.9.0/24"])
    n.records.append(n.payload(bob))
    n.sign(payloads=n.records[-1:])
    acc, ref, known = n.verify(known=known)
    assert "bob" in acc
    # the server replays the older record (and the peer as it was)
    n.set("bob", routes=[])
    acc, ref, _ = n.verify(known=known, lock={"batches": old[1], "records": old[0]})
    assert "bob" not in acc and "older signed record" in ref["bob"]
    # deleted: a tombstone the client saw keeps it from coming back
    bob = n.set("bob", routes=["192.168.9.0/24"])
    n.records.append(n.payload(bob, deleted=True))
    n.sign(payloads=n.records[-1:])
    _, ref, known = n.verify(known=known)
    assert "deleted" in ref["bob"]
    acc, ref, _ = n.verify(known=known, lock={"batches": n.batches,
                                              "records": n.records[:-1]})
    assert "bob" not in acc


def test_an_invited_peer_is_accepted_with_the_key_its_enrollment_signed():
    n = Net()
    auth_priv, auth_pub = lock_keypair()
    dave = n.add_peer("dave", "10.66.1.9", 3, "dave-key", sign=False)
    n.records.append(n.payload(dave, key="auth:" + auth_pub))
    n.sign(payloads=n.records[-1:])
    acc, ref, _ = n.verify()
    assert "dave" not in acc and "enrollment" in ref["dave"]
    n.enroll["10.66.1.9"] = sign_enrollment(NET, "10.66.1.9", "other-key", auth_priv)
    acc, ref, _ = n.verify()
    assert "dave" not in acc and "rotation" in ref["dave"]
    n.enroll["10.66.1.9"] = sign_enrollment(NET, "10.66.1.9", "dave-key", auth_priv)
    acc, ref, _ = n.verify()
    assert "dave" in acc
    assert enrollment_key(NET, "10.66.1.10", auth_pub, n.enroll["10.66.1.9"]) is None


def test_a_batch_seen_before_is_not_verified_again():
    n = Net()
    cache = {}
    assert batch_valid(NET, n.batches[0], n.chain.keys, cache)
    assert len(cache) == 1
    calls = []
    real = innernet.lock_verify
    innernet.lock_verify = lambda *a: calls.append(a) or real(*a)
    try:
        assert batch_valid(NET, n.batches[0], n.chain.keys, cache)
    finally:
        innernet.lock_verify = real
    assert calls == []
    tampered = dict(n.batches[0], h=n.batches[0]["h"] + ["x"])
    assert not batch_valid(NET, tampered, n.chain.keys, cache)


def test_a_removed_keys_signatures_no_longer_count():
    n = Net()
    b = lock_keypair()
    entries = list(n.chain.entries)
    entries.append(lock_update(n.chain, "add", b[1], "b", n.admin[0], T))
    ch = LockChain(entries)
    entries.append(lock_update(ch, "remove", n.admin[1], "k0", b[0], T))
    n.chain = LockChain(entries)
    acc, ref, _ = n.verify()
    assert set(acc) == {"alice"}
    n.sign(b[0])
    acc, _, _ = n.verify()
    assert "bob" in acc


def test_an_adoption_proof_verifies_for_its_peer_genesis_and_admin_only():
    """A client that joined before the lock takes a genesis only with its
    admin's proof made for it (an HMAC under their X25519 secret)."""
    admin, peer, other = (innernet.generate_private_key() for _ in range(3))
    pub = innernet.public_key
    mac = innernet.adoption_proof(admin, "genesis-hash", pub(peer))
    assert innernet.adoption_valid(peer, "genesis-hash", pub(admin), mac)
    assert not innernet.adoption_valid(peer, "another-genesis", pub(admin), mac)
    assert not innernet.adoption_valid(other, "genesis-hash", pub(admin), mac)
    assert not innernet.adoption_valid(peer, "genesis-hash", pub(other), mac)
    server_made = innernet.adoption_proof(other, "genesis-hash", pub(peer))
    assert not innernet.adoption_valid(peer, "genesis-hash", pub(admin), server_made)


def test_an_enrollment_binds_its_address_and_a_second_one_under_the_same_invitation_is_refused():
    """The reviewer's attack, in the pure core: the server, with a copy of
    dave's invitation (its one-time lock key), enrolls another key at dave's
    address after dave joined. A client that verified dave's enrollment keeps
    that binding across the admin's re-signed records; one that never saw it
    refuses an enrollment it first sees after the invitation's signed expiry;
    an admin's next signing names dave's enrolled key, and then no enrollment
    counts."""
    n = Net()
    now = T + 100
    auth_priv, auth_pub = lock_keypair()
    dave = n.add_peer("dave", "10.66.1.9", 3, "dave-key", sign=False)
    n.records.append(n.payload(dave, key=innernet.lock_auth(auth_pub, T + 600)))
    n.sign(payloads=n.records[-1:])
    n.enroll["10.66.1.9"] = sign_enrollment(NET, "10.66.1.9", "dave-key", auth_priv, at=T + 50)

    def verify(known, at, peers=None):
        acc, ref, known = verify_state(n.chain, n.lock(), peers or n.peers, n.cidrs,
                                       "10.66.1.2", known, now=at)
        return {p.name: p for p in acc}, {p.name: r for p, r in ref}, known
    acc, _, known = verify({}, now)
    assert "dave" in acc and known["peer:10.66.1.9"][2] == "dave-key"
    # an admin renames dave: the record is signed again, still under the invitation
    dave = n.set("dave", name="davey")
    n.records.append(n.payload(dave, key=innernet.lock_auth(auth_pub, T + 600)))
    n.sign(payloads=n.records[-1:])
    acc, _, known = verify(known, now)
    assert "davey" in acc
    # the hijacked server re-enrolls the attacker's key with the stolen invitation
    n.enroll["10.66.1.9"] = sign_enrollment(NET, "10.66.1.9", "evil-key", auth_priv, at=T + 60)
    evil = n.set("davey", public_key="evil-key")
    acc, ref, _ = verify(known, now)
    assert "davey" not in acc and "enrollment named when this host verified" in ref["davey"]
    # the same lie without a binding, before the expiry, would be taken (the
    # invitation is a bearer credential while it is valid) ...
    acc, _, _ = verify({}, now)
    assert "davey" in acc
    # ... but not by a client that first sees it after the expiry, whatever it claims
    acc, ref, _ = verify({}, T + 600 + innernet.ENROLL_GRACE + 1)
    assert "davey" not in acc and "expired before this host saw" in ref["davey"]
    # an enrollment dated after the signed expiry is refused too
    n.enroll["10.66.1.9"] = sign_enrollment(NET, "10.66.1.9", "evil-key", auth_priv, at=T + 601)
    acc, ref, _ = verify({}, now)
    assert "davey" not in acc and "signed enrollment" in ref["davey"]
    # the admin's next signing: its host's binding names dave's enrolled key
    recs = {innernet.record_subject(p): p for p in n.records}
    bound = innernet.lock_known_keys(recs, known)
    assert bound == {"peer:10.66.1.9": "dave-key"}
    signer = innernet.LockSigner(n.chain, recs, n.admin[0], bound,
                                 innernet.lock_newest({"known": known}))
    alice = next(p for p in n.peers if p.name == "alice")
    out = signer.signed({"peer:10.66.1.2": {k: v for k, v in innernet.lock_fields(
        n.payload(alice)).items()}})
    resigned = next(r for r in out["records"] if r["ip"] == "10.66.1.9")
    assert resigned["key"] == "dave-key" and resigned["name"] == "davey"
    n.records += out["records"]
    n.batches.append(out["batch"])
    # now even a client that never saw the enrollment, long after, takes only dave's key
    acc, ref, _ = verify({}, now + 10 ** 6)
    assert "davey" not in acc and "key is not the signed one" in ref["davey"]
    real = innernet.replaced(evil, public_key="dave-key")
    acc, ref, _ = verify({}, now + 10 ** 6, peers=[real if p is evil else p for p in n.peers])
    assert "davey" in acc


def test_a_pin_conflict_under_lock_is_one_line_and_the_rest_applies():
    """Under lock, merge_pinned takes a list for its refusals: a known address
    with another key keeps its pinned key, the other peers are applied."""
    bob = Peer(11, "bob", "10.66.1.3", 3, "bob-key", is_redeemed=True)
    carol = Peer(12, "carol", "10.66.1.4", 3, "carol-key", is_redeemed=True)
    swapped = innernet.replaced(bob, public_key="evil-key")
    dave = Peer(13, "dave", "10.66.1.5", 3, "dave-key", is_redeemed=True)
    with pytest.raises(InnernetError, match="PINNING ERROR"):
        innernet.merge_pinned([bob, carol], [swapped, carol, dave])
    lines = []
    got = innernet.merge_pinned([bob, carol], [swapped, carol, dave], refusals=lines)
    assert {(p.name, p.public_key) for p in got} == {("bob", "bob-key"),
                                                     ("carol", "carol-key"), ("dave", "dave-key")}
    (line, peer), = lines
    assert "refused peer 'bob' (10.66.1.3)" in line and peer == swapped
    # the pinned key is kept cut off (round 22, V22-1: its holder may be who
    # the peer was deleted for, the signed record a new peer's at that address)
    assert [p.is_disabled for p in got] == [True, False, False]
    assert not any(p.is_disabled for p in innernet.merge_pinned(
        [bob, carol], [bob, carol, dave], refusals=[]))


def test_the_disablement_secret_comes_from_stdin_or_a_file_and_an_argument_is_warned(
        tmp_path, monkeypatch, capsys):
    import io
    import types
    args = types.SimpleNamespace(secret=None, secret_file=None)
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert innernet._disable_secret(args) == "s3cret"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(InnernetError, match="needs the disablement secret"):
        innernet._disable_secret(args)
    f = tmp_path / "secret"
    f.write_text("from-file\n")
    args.secret_file = str(f)
    assert innernet._disable_secret(args) == "from-file"
    assert "visible" not in capsys.readouterr().err
    args.secret = "on-the-line"
    assert innernet._disable_secret(args) == "on-the-line"
    assert "visible to local users (ps)" in capsys.readouterr().err
    p = innernet.build_parser() if hasattr(innernet, "build_parser") else None
    if p is not None:
        ns = p.parse_args(["lock", "disable", "evilcorp", "--secret-file", str(f)])
        assert ns.secret_file == str(f) and ns.secret is None


def test_a_lock_key_file_in_another_format_is_one_line_with_a_hint(tmp_path):
    for name, data in (("binary", b"\xff\xfe\x00garbage"), ("toml", b"[interface]\n"),
                       ("empty", b"")):
        f = tmp_path / name
        f.write_bytes(data)
        with pytest.raises(InnernetError, match="holds no lock key") as e:
            innernet.read_lock_key(str(f), required=True)
        assert "innernet lock key" in e.value.hint


# -- the state's compact form (lock_wire_section) against a lying server -----------

def wire(n, shown=None):
    """``n``'s lock section as a server sends it: a peer record without the
    key its peer has in the state (``shown`` {ip: key}, the honest peers'
    by default), and a batch's hash of each record it carries as null."""
    batches = dict(enumerate(n.batches))
    recs = [(p, lock_hash(p), next((i for i, b in batches.items() if lock_hash(p) in b["h"]),
                                   None)) for p in n.records]
    wb, wr = innernet.lock_wire_section(recs, batches, shown or {p.ip: p.public_key
                                                                 for p in n.peers})
    return {"batches": wb, "records": wr, "enroll": n.enroll}


def two_batches():
    """Net with dave (humans) signed in a batch of his own after the first."""
    n = Net()
    n.add_peer("dave", "10.66.1.5", 3, "dave-key")
    n.sign(payloads=n.records[-1:])
    return n


def test_the_compact_form_verifies_as_the_full_one():
    n = two_batches()
    w = wire(n)
    assert "key" not in next(r for r in w["records"] if r.get("ip") == "10.66.1.3")
    assert all(h is None for b in w["batches"] for h in b["h"])
    assert n.verify(lock=w)[:2] == n.verify()[:2]
    assert set(n.verify(lock=w)[0]) == {"alice", "bob", "dave"}


def test_a_key_beside_a_record_sent_without_it_must_be_the_signed_one():
    """The server shows bob with another key than the one signed, his record
    sent without a key: it verifies only with the signed key, so bob is
    refused. A client that verified the batch before puts its remembered
    hash back and loses bob alone; on a first fetch the whole batch fails
    (the server could withhold it anyway), the other batch's dave not --
    but without alice's own record signed, nothing of her view is."""
    n = two_batches()
    w = wire(n)
    _, _, known = n.verify(lock=w)
    n.set("bob", public_key="evil-key")
    acc, ref, _ = n.verify(lock=w, known=known)
    assert set(acc) == {"alice", "dave"}
    assert ref["bob"] == innernet.LOCK_KEY_NOT_SIGNED
    acc, ref, _ = n.verify(lock=w)
    assert set(acc) == {"alice"}
    assert ref["bob"] == innernet.LOCK_BATCH_BROKEN and "own record" in ref["dave"]
    # with the key put back in the record, the lie fails all the same
    lied = copy.deepcopy(w)
    next(r for r in lied["records"] if r.get("ip") == "10.66.1.3")["key"] = "evil-key"
    acc, ref, _ = n.verify(lock=lied, known=known)
    assert set(acc) == {"alice", "dave"} and "bob" in ref
    # the signed key put back instead (and the hashes too: the full form) is the truth
    n.set("bob", public_key="bob-key")
    acc, ref, _ = n.verify(lock=n.lock(), known=known)
    assert set(acc) == {"alice", "bob", "dave"} and set(ref) == {"carol"}     # not in view


def test_records_out_of_their_batchs_order_or_a_null_too_many_fail_the_batch():
    """Nulls are filled by the records in the order they come: swapped
    records, a null for a record the state does not carry, a hash put back
    while its record is still sent, or a record left out each fill the batch
    wrongly, and its signature fails -- with the client's memory too."""
    n = two_batches()
    w = wire(n)
    _, _, known = n.verify(lock=w)
    first = len(w["batches"][0]["h"])
    bob = next(i for i, r in enumerate(w["records"]) if r.get("ip") == "10.66.1.3")

    def swapped(s):
        s["records"][bob], s["records"][bob - 1] = s["records"][bob - 1], s["records"][bob]

    def extra_null(s):
        s["batches"][0]["h"].insert(0, None)

    def hash_back(s):
        s["batches"][0]["h"][bob] = n.batches[0]["h"][bob]

    def left_out(s):
        del s["records"][bob]

    for lie in (swapped, extra_null, hash_back, left_out):
        s = copy.deepcopy(w)
        lie(s)
        for mem in ({}, known):
            acc, ref, _ = n.verify(lock=s, known=mem)
            assert "bob" not in acc, lie.__name__
            assert ref["bob"] in (innernet.LOCK_BATCH_BROKEN, "no record signed by a trusted "
                                  "lock key"), (lie.__name__, ref)
    assert bob < first


def test_a_record_left_out_with_its_hash_put_back_is_no_record_signed():
    """A server that drops bob's record from the compact form and puts its
    hash back in the batch (as the full form has it): the batch holds, and
    bob, still in the state, has no record."""
    n = two_batches()
    w = wire(n)
    bob = next(i for i, r in enumerate(w["records"]) if r.get("ip") == "10.66.1.3")
    del w["records"][bob]
    w["batches"][0]["h"][bob] = n.batches[0]["h"][bob]
    acc, ref, _ = n.verify(lock=w)
    assert set(acc) == {"alice", "dave"} and ref["bob"] == "no record signed by a trusted lock key"


def test_an_admin_signs_only_over_what_was_signed():
    """lock_divergence: a field the server changed by itself is not signed
    along with an admin's change (fewer routes or no exit node is the peer's
    own withdrawal); verified_lock_records keeps only records a trusted
    batch covers, so the server cannot make up the record it is compared to."""
    n = Net()
    bob = n.set("bob", routes=["192.168.5.0/24"], exit_node=True)
    n.records.append(n.payload(bob))
    n.sign(payloads=n.records[-1:])
    rec = n.records[-1]
    now = innernet.lock_fields(rec)
    assert innernet.lock_divergence(now, rec) is None
    assert innernet.lock_divergence(dict(now, routes=[], exit=False), rec) is None
    assert innernet.lock_divergence(dict(now, routes=["192.168.5.0/24", "192.168.6.0/24"]),
                                    rec) == "routes not as signed"
    assert innernet.lock_divergence(dict(now, admin=True), rec) == "admin flag not as signed"
    assert innernet.lock_divergence(now, None) == "it has no signed record"
    assert innernet.lock_divergence(now, dict(rec, deleted=True)) == "it has no signed record"
    records = {innernet.record_subject(p): p for p in n.records}
    forged = dict(rec, routes=["0.0.0.0/1"])
    got = innernet.verified_lock_records(n.chain, dict(records, **{"peer:10.66.1.3": forged}),
                                         n.batches)
    assert "peer:10.66.1.3" not in got and "peer:10.66.1.2" in got
    assert innernet.verified_lock_records(n.chain, records, n.batches)["peer:10.66.1.3"] == rec
    assert innernet.verified_lock_records(n.chain, records, None) == {}


def test_an_admin_host_signs_over_no_record_older_than_the_newest_it_knows():
    """Outside probe, finding 3: the server replays an older signed record
    (a route revoked since, a name changed, a peer deleted); the admin's
    next change to that subject -- or `lock remove`, which signs every
    record again -- would sign it anew, newer than the one that undid it."""
    n = Net()
    recs = {innernet.record_subject(p): p for p in n.records}
    bob = recs["peer:10.66.1.3"]
    mine = {"known": {"peer:10.66.1.3": [bob["n"] + 5, "h", "bob-key", "bob-key"]},
            "signed": {"peer:10.66.1.2": 10 ** 12, "cidr:10.66.1.0/24": "junk"}}
    newest = innernet.lock_newest(mine)
    assert newest == {"peer:10.66.1.3": bob["n"] + 5, "peer:10.66.1.2": 10 ** 12}
    signer = innernet.LockSigner(n.chain, recs, n.admin[0], newest=newest)
    with pytest.raises(InnernetError, match=r"signed record of peer 10.66.1.3 is older "
                                            r"\(serial \d+\) than the newest this host knows"):
        signer.signed({"peer:10.66.1.3": dict(innernet.lock_fields(bob), name="bobby")})
    with pytest.raises(InnernetError, match="not signing over it"):    # as lock remove asks
        innernet.refuse_stale(recs, newest, recs)
    # a subject it knows nothing newer of is signed, and its serial remembered
    carol = recs["peer:10.66.2.4"]
    out = signer.signed({"peer:10.66.2.4": dict(innernet.lock_fields(carol), name="caroline")})
    assert out["records"][0]["n"] > carol["n"]
    assert signer.newest["peer:10.66.2.4"] == out["records"][0]["n"]
    # the server holding no record at all of a subject this host knows
    del recs["peer:10.66.1.3"]
    with pytest.raises(InnernetError, match=r"older \(none\)"):
        innernet.refuse_stale(recs, newest, ["peer:10.66.1.3"])
    innernet.refuse_stale(recs, {}, recs)            # nothing known: nothing refused


def test_approve_routes_signs_a_route_the_server_approved_alone_only_if_asked():
    """Outside probe, finding 5: the server holding a route approved (unsigned)
    is no divergence for the admin's approval of that very route; any
    other route or field the server changed still is."""
    n = Net()
    bob = next(r for r in n.records if r.get("name") == "bob")
    now = dict(innernet.lock_fields(bob), routes=["192.168.5.0/24"])
    assert innernet.lock_divergence(now, bob) == "routes not as signed"
    assert innernet.lock_divergence(now, innernet.lock_asked(bob, {"192.168.5.0/24"})) is None
    assert innernet.lock_divergence(dict(now, routes=["192.168.5.0/24", "192.168.6.0/24"]),
                                    innernet.lock_asked(bob, {"192.168.5.0/24"})) \
        == "routes not as signed"
    assert innernet.lock_divergence(dict(now, exit=True),
                                    innernet.lock_asked(bob, {"0.0.0.0/0", "192.168.5.0/24"})) \
        is None
    peer = Peer(1, "bob", "10.66.1.3", 3, "k", routes=["192.168.5.0/24"],
                pending_routes=["192.168.6.0/24"], exit_node=True)
    assert innernet.approval_asked(peer, None) == {"192.168.5.0/24", "192.168.6.0/24",
                                                   "0.0.0.0/0", "::/0"}
    assert innernet.approval_asked(peer, ["192.168.6.0/24"]) == {"192.168.6.0/24"}


def test_lock_init_names_the_peers_that_see_no_admin():
    """lock_blind_peers: a peer takes a lock from an admin it knows; one whose
    view holds no admin peer cannot yet (outside probe, finding 6)."""
    n = Net()
    n.set("alice", is_admin=True)
    recs = {innernet.record_subject(p): p for p in n.records}
    recs["peer:10.66.1.2"] = dict(recs["peer:10.66.1.2"], admin=True)
    ips = {"10.66.1.3", "10.66.2.4"}
    assert innernet.lock_blind_peers(recs, ips) == ["carol"]
    recs["assoc:x"] = assoc_payload(NET, 9, a="10.66.1.0/24", b="10.66.2.0/24")
    assert innernet.lock_blind_peers(recs, ips) == []


def test_an_admin_host_takes_no_record_older_than_one_it_signed_itself():
    """Issue 32, F3: verify_state judges replays against the serials this
    admin's host signed (its lock file's "signed"), not only those its syncs
    saw: the server cannot hand it back the record its own change replaced."""
    n = Net()
    bob = next(p for p in n.peers if p.name == "bob")
    rec = n.records[-2]
    assert rec["ip"] == bob.ip
    signed_here = {"peer:" + bob.ip: rec["n"] + 5}     # this host signed a newer one
    acc, _, _ = n.verify()
    assert "bob" in acc                                # without it: taken
    acc, ref, _ = verify_state(n.chain, n.lock(), n.peers, n.cidrs, "10.66.1.2", {},
                               own_signed=signed_here)
    names = {p.name for p in acc}
    assert "bob" not in names and "older signed record" in dict(
        (p.name, r) for p, r in ref)["bob"]


def test_a_client_takes_a_lock_only_from_an_admin_pinned_before_it_first_saw_one(tmp_path):
    """Issue 32, F1: adopters keeps the admins this host had pinned when a
    lock was first shown to it, never the server's own record; an admin that
    appears with or after the lock is not added later."""
    path = str(tmp_path / "x.lock-seen.json")
    server = Peer(1, "innernet-server", "10.66.0.1", 2, "srv-key", is_admin=True)
    admin = Peer(2, "admin", "10.66.1.1", 3, "adm-key", is_admin=True)
    plain = Peer(3, "bob", "10.66.1.3", 3, "bob-key")
    got = innernet.adopters(path, [server, admin, plain], ("10.66.0.1", "srv-key"))
    assert got == [["10.66.1.1", "adm-key"]]
    assert os.stat(path).st_mode & 0o777 == 0o600
    late = Peer(4, "evil", "10.66.1.9", 3, "evil-key", is_admin=True)
    assert innernet.adopters(path, [server, admin, late], ("10.66.0.1", "srv-key")) == got


def test_an_admin_host_signs_again_no_record_it_cannot_vouch_for_as_the_newest():
    """Third outside attack, finding 1: a second admin added an invited peer
    (out of this admin's view) and deleted it later; the hijacked server puts
    the peer's older signed record (and its enrollment) back. This admin's
    next unrelated change signed every invited peer's record whose enrollment
    it holds again, with a fresh serial -- the deleted peer alive, newer than
    its deletion -- and `lock remove` signed every record again. Now neither
    signs a record this host did not verify or sign at that very serial."""
    n = Net()
    now = T + 100
    k2_private, k2 = lock_keypair()
    n.chain = LockChain(n.chain.entries + [lock_update(n.chain, "add", k2, "adm2", n.admin[0],
                                                       T + 1)])
    auth_priv, auth_pub = lock_keypair()
    pf = n.add_peer("pf", "10.66.2.9", 4, "pf-key", sign=False)
    alive = n.payload(pf, key=innernet.lock_auth(auth_pub, T + 600))
    n.records.append(alive)
    n.sign(k2_private, [alive])
    n.enroll["10.66.2.9"] = sign_enrollment(NET, "10.66.2.9", "pf-key", auth_priv, at=T + 50)
    # adm2 deleted pf since (serial alive + 1); the server replays `alive`
    recs = {innernet.record_subject(p): p for p in n.records}
    # an admin signs only the enrolled key its own sync bound: not the server's word
    assert innernet.lock_known_keys(recs, {}) == {}
    bound = innernet.lock_known_keys(recs, {"peer:10.66.2.9": [alive["n"], "h", "pf-key",
                                                                  alive["key"]]})
    assert bound == {"peer:10.66.2.9": "pf-key"}        # the enrollment is still held
    carol = recs["peer:10.66.2.4"]
    change = {"peer:10.66.2.4": dict(innernet.lock_fields(carol), name="caroline")}
    # this admin's view: its own sync verified carol, never pf
    mine = {"known": {s: [p["n"], "h"] for s, p in recs.items() if s != "peer:10.66.2.9"}}
    out = innernet.LockSigner(n.chain, recs, n.admin[0], bound,
                              innernet.lock_newest(mine)).signed(change)
    assert [innernet.record_subject(r) for r in out["records"]] == ["peer:10.66.2.4"]
    # a host that knows pf at a newer serial (adm2: it signed the deletion) leaves it too
    mine2 = dict(mine, signed={"peer:10.66.2.9": alive["n"] + 1})
    out = innernet.LockSigner(n.chain, recs, k2_private, bound,
                              innernet.lock_newest(mine2)).signed(change)
    assert [innernet.record_subject(r) for r in out["records"]] == ["peer:10.66.2.4"]
    # one that verified that very record signs it again, with the enrolled key
    mine3 = dict(mine, known=dict(mine["known"], **{"peer:10.66.2.9": [alive["n"], "h"]}))
    out = innernet.LockSigner(n.chain, recs, n.admin[0], bound,
                              innernet.lock_newest(mine3)).signed(change)
    again = {innernet.record_subject(r): r for r in out["records"]}
    assert again["peer:10.66.2.9"]["key"] == "pf-key" and again["peer:10.66.2.9"]["n"] > \
        alive["n"]
    # `lock remove --key K2`: only K2's newest records, only those this host knows so
    rest = LockChain(n.chain.entries + [lock_update(n.chain, "remove", k2, "adm2",
                                                    n.admin[0], T + 2)])
    still = innernet.verified_lock_records(rest, recs, n.batches)
    assert "peer:10.66.2.9" not in still and "peer:10.66.2.4" in still
    assert innernet.lock_removal(recs, still, innernet.lock_newest(mine)) == \
        ([], ["peer:10.66.2.9"])
    assert innernet.lock_removal(recs, still, innernet.lock_newest(mine2)) == \
        ([], ["peer:10.66.2.9"])
    assert innernet.lock_removal(recs, still, innernet.lock_newest(mine3)) == \
        (["peer:10.66.2.9"], [])


def test_lock_init_signs_no_key_name_admin_flag_or_cidr_unlike_what_this_host_took(tmp_path):
    """Sixth outside attack, finding 2: `lock init` compared only keys with
    this host's pins; during init the server swapped two names, made a peer
    admin, and added an admin no one had seen, and all of it was signed.
    Each difference at an address this host's sync took is refused now, and
    the peers it never saw are named (admins among them) before signing."""
    n = Net()
    args = type("A", (), {"config_dir": str(tmp_path / "etc"), "data_dir": str(tmp_path)})()
    innernet.save_data_store(str(tmp_path / "net.json"), n.peers, n.cidrs)
    assert innernet._refuse_repinned(args, "net", n.peers, n.cidrs) == []
    lies = {"name": dict(name="robert"), "admin flag": dict(is_admin=True),
            "CIDR": dict(cidr_id=4), "key": dict(public_key="evil-key"),
            "static flag": dict(is_static=True)}     # sixteenth round, N1
    with pytest.raises(InnernetError, match="lists other routes at 10.66.1.3"):
        innernet._refuse_repinned(args, "net", [innernet.replaced(
            p, routes=["192.168.0.0/16"]) if p.name == "bob" else p for p in n.peers], n.cidrs)
    with pytest.raises(InnernetError, match="names CIDR 10.66.1.0/24 otherwise than this host "
                                            "took it \\('humans'\\)"):
        innernet._refuse_repinned(args, "net", n.peers, [innernet.replaced(
            c, name="ops") if c.name == "humans" else c for c in n.cidrs])
    for what, change in lies.items():
        bob = next(p for p in n.peers if p.name == "bob")
        shown = [innernet.replaced(p, **change) if p is bob else p for p in n.peers]
        with pytest.raises(InnernetError, match=f"lists another {what} at 10.66.1.3 than "
                                                "this host took for 'bob'"):
            innernet._refuse_repinned(args, "net", shown, n.cidrs)
    with pytest.raises(InnernetError, match="lists no peer at 10.66.1.3"):
        innernet._refuse_repinned(args, "net", [p for p in n.peers if p.name != "bob"], n.cidrs)
    mallory = Peer(99, "mallory", "10.66.1.66", 3, "m-key", is_admin=True, is_redeemed=True)
    assert innernet._refuse_repinned(args, "net", n.peers + [mallory], n.cidrs) == [mallory]
    # sixteenth round, N2: at an address this host holds as a deleted peer's, what the
    # server lists was neither compared nor counted as never seen (nor named if admin)
    gone = [innernet.replaced(p, deleted_until=2 ** 31) if p.name == "bob" else p
            for p in n.peers]
    innernet.save_data_store(str(tmp_path / "net.json"), gone, n.cidrs)
    evil = innernet.replaced(next(p for p in n.peers if p.name == "bob"),
                               public_key="evil-key", is_admin=True)
    shown = [evil if p.name == "bob" else p for p in n.peers]
    assert innernet._refuse_repinned(args, "net", shown, n.cidrs) == [evil]


def test_lock_init_signs_no_invitation_that_is_not_redeemed_yet(tmp_path):
    """Outside round 22, V22-4: an invitation pending at `lock init` was
    signed with its own WireGuard key and no expiry: whoever held the file
    (the server host wrote it) had a signed seat on every locked client."""
    n = Net()
    key_file = str(tmp_path / "net.lock-key")
    innernet.refuse_pending_invitations(n.peers, "net", key_file)    # all redeemed: fine
    quinn = Peer(40, "quinn", "10.66.1.40", 3, "inv-key", is_redeemed=False,
                 invite_expires=2 ** 31)
    with pytest.raises(InnernetError) as e:
        innernet.refuse_pending_invitations(n.peers + [quinn], "net", key_file)
    assert e.value.message.startswith("1 invitation(s) not redeemed yet: quinn: ")
    assert "innernet delete-peer net --name NAME" in e.value.hint
    # outside round 24, X24-5/6: nor on a host that has a lock key already
    open(key_file, "w").close()
    with pytest.raises(InnernetError, match="this host has a lock key already"):
        innernet.refuse_pending_invitations(n.peers, "net", key_file)


def test_an_admins_signature_replaces_a_key_this_host_reached_by_proofs():
    """What the seventh to ninth outside rounds settled: a client keeping a
    key it reached by a peer's proofs against a newly signed one (against a
    rotation proved with a stolen old key and signed by a fooled admin)
    refused, in honest use, a new peer at a reused address on a host offline
    across the deletion, and telling them apart by name was undone by a
    rename. Without a signed incarnation of a peer, a newly signed key
    replaces what a host reached; the pin refuses an attacker's key where
    one holds the real key (README, "What lock cannot stop")."""
    n = Net()
    n.set("bob", public_key="bob-key-2")
    real = {("10.66.1.3", "bob-key", "bob-key-2")}
    _, _, known = n.verify(rotated=lambda ip, a, b: (ip, a, b) in real)
    assert known["peer:10.66.1.3"][2:4] == ["bob-key-2", "bob-key"]
    erin = n.set("bob", public_key="erin-key", name="erin")     # a new peer there
    n.records.append(n.payload(erin))
    n.sign(payloads=n.records[-1:])
    acc, ref, _ = n.verify(known=known, rotated=lambda ip, a, b: False)
    assert acc["erin"].public_key == "erin-key" and "erin" not in ref
    assert innernet.lock_binding([1, "h", "k2", "k1"], {"key": "k1", "n": 2}) == ["k2", "k1"]
    assert innernet.lock_binding([1, "h", "k2", "k1"], {"key": "k9", "n": 2}) == [None, None]


@pytest.mark.parametrize("where", ["batch key", "record type", "record ip", "batches",
                                   "records"])
def test_lock_data_of_the_wrong_type_is_one_line_not_a_traceback(where):
    """Seventh outside attack, finding 2: a list where the server should have
    sent a string crashed fetch, install and admin verbs with a TypeError."""
    n = Net()
    lock = copy.deepcopy(n.lock())
    if where in ("batches", "records"):          # outside round 25, Y25-4: a string
        lock[where] = "x"
    elif where == "batch key":
        lock["batches"][0]["k"] = ["a", "list"]
    elif where == "record type":
        lock["records"][0]["t"] = {"an": "object"}
    else:
        lock["records"][-1]["ip"] = ["10.66.1.3"]
    verify = innernet.server_lock_data(verify_state)
    try:
        verify(n.chain, lock, n.peers, n.cidrs, "10.66.1.2", {})
    except InnernetError as e:
        assert e.message.startswith("the server sent malformed lock data") and "\n" not in \
            e.message
    else:
        assert where not in ("batch key", "batches", "records")   # unhashable, not lists


def test_this_hosts_own_rotated_key_is_what_its_admin_host_signs_next():
    """Tenth outside round, L2: an admin's host bound the rotated key of
    every other peer it followed, never its own, so each later signing of
    it named its old key (perhaps the stolen one it rotated away from), and
    new peers installed that. Its own key is bound under its own record."""
    n = Net()
    me = next(p for p in n.peers if p.ip == "10.66.1.2")
    _, _, known = verify_state(n.chain, n.lock(), n.peers, n.cidrs, "10.66.1.2", {},
                               own_key="rotated-key")
    assert known["peer:10.66.1.2"][2:4] == ["rotated-key", me.public_key]
    records = {innernet.record_subject(p): p for p in n.records}
    assert innernet.lock_known_keys(records, known)["peer:10.66.1.2"] == "rotated-key"


def remote_network(request):
    """An admin peer's RemoteNetwork (its host's address 10.66.1.1/16) whose
    API answers ``request(method, path, body)``: (status, headers, body)."""
    api = object.__new__(innernet.ApiClient)
    api.lacks, api.request = None, request
    net = object.__new__(innernet.RemoteNetwork)
    net.api = api
    net.config = type("C", (), {"address": innernet.ipaddress.ip_interface("10.66.1.1/16")})()
    return net


def test_an_admin_verb_reads_the_network_once_between_writes():
    """Eleventh outside round, M1: a verb found the peer or CIDR it names in
    one answer of the server, and its lock records were checked on a second;
    a server that lied only in the first (another peer's id, an admin flag,
    an approved route) had that signed. An admin peer reads each list once
    between two writes, so what the verb names is what is checked."""
    alice = Peer(7, "alice", "10.66.1.2", 3, "alice-key", is_redeemed=True)
    answers = [[alice.to_json()], [innernet.replaced(alice, is_admin=True).to_json()]]
    asked = []

    def request(method, path, body=None):
        asked.append((method, path))
        return 200, {}, json.dumps(answers.pop(0) if method == "GET" else {}).encode()
    net = remote_network(request)
    assert net.peers() == net.peers() == [alice]
    assert asked == [("GET", "/admin/peers")]
    net.api.call("PUT", "/admin/peers/7", {})              # a write: read anew
    assert net.peers()[0].is_admin and asked[-1] == ("GET", "/admin/peers")


def test_the_plan_under_lock_names_a_key_this_host_signs_again():
    """Eleventh outside round, M2: `apply` under lock listed the records of
    the change, not a peer's record signed again with the rotated key this
    admin's host took (perhaps one a stolen old key proved to it)."""
    rec = peer_payload(NET, 5, ip="10.66.1.3", key="old-key", name="carol",
                       cidr="10.66.1.0/24", admin=False, routes=[], exit=False, static=False,
                       disabled=False, deleted=False)
    fields = innernet.lock_fields(rec)
    lines = innernet.lock_change_lines({"peer:10.66.1.3": (fields, "new-key")},
                                       {"peer:10.66.1.3": rec})
    assert lines == ["~ peer 10.66.1.3 (carol): key old-key -> new-key"]


def test_a_cidr_outside_its_parent_is_neither_signed_nor_seen_through(tmp_path):
    """Fifteenth outside round, F1: at `lock init` the server put 'others'
    (10.66.2.0/24) under 'humans' (10.66.1.0/24), a parent that does not
    hold it; the admin's host signed that tree (it compared names, not
    parents), and humans' clients saw others' peers through it. `lock init`
    refuses a parent other than the one this host took, or one that does
    not hold the CIDR; no signing makes such a record; a client's view does
    not follow one."""
    n = Net()
    args = type("A", (), {"config_dir": str(tmp_path / "etc"), "data_dir": str(tmp_path)})()
    innernet.save_data_store(str(tmp_path / "net.json"), n.peers, n.cidrs)
    moved = [innernet.replaced(c, parent=3) if c.name == "others" else c for c in n.cidrs]
    with pytest.raises(InnernetError, match="puts CIDR 10.66.2.0/24 under 10.66.1.0/24, which "
                                            "does not hold it"):
        innernet._refuse_repinned(args, "net", n.peers, moved)
    kid = Cidr(5, "kids", "10.66.1.128/25", 1)           # moved under humans, which holds it
    innernet.save_data_store(str(tmp_path / "net.json"), n.peers, n.cidrs + [kid])
    with pytest.raises(InnernetError, match="places CIDR 10.66.1.128/25 otherwise than this "
                                            "host took it"):
        innernet._refuse_repinned(args, "net", n.peers,
                                  n.cidrs + [innernet.replaced(kid, parent=3)])
    fields = {"t": "cidr", "cidr": "10.66.2.0/24", "name": "others", "parent": "10.66.1.0/24",
              "deleted": False}
    assert innernet.lock_hidden_overlap(fields, {}, {}) == \
        "it is not inside its parent 10.66.1.0/24"
    records = {"cidr:10.66.1.0/24": {"t": "cidr", "cidr": "10.66.1.0/24", "parent": None,
                                     "deleted": False}, "cidr:10.66.2.0/24": fields}
    assert innernet.lock_view(records, "10.66.1.0/24") == {"10.66.1.0/24"}


@pytest.mark.parametrize("path,dup", [("/admin/peers", "id"), ("/admin/peers", "ip"),
                                      ("/admin/peers", "name"), ("/admin/cidrs", "id"),
                                      ("/admin/cidrs", "cidr"), ("/admin/associations", "id"),
                                      ("/admin/associations", "pair")])
def test_an_admin_peer_takes_no_list_with_two_entries_for_one_id(path, dup):
    """Seventeenth outside round, R1: the server gave frank bob's id, and
    `delete-peer bob` signed frank's deletion too (the change is worked out
    by id); a CIDR given another's id had an association signed to it. An
    admin peer refuses a list in which two entries share an id (or an
    address, a range, a name)."""
    a = {"/admin/peers": Peer(3, "bob", "10.66.1.2", 3, "bob-key").to_json(),
         "/admin/cidrs": Cidr(3, "humans", "10.66.1.0/24", 1).to_json(),
         "/admin/associations": {"id": 1, "cidr_id_1": 3, "cidr_id_2": 4}}[path]
    b = dict(a, **{"/admin/peers": {"id": 4, "name": "frank", "ip": "10.66.1.3",
                                    "public_key": "frank-key"},
                   "/admin/cidrs": {"id": 4, "name": "ops", "cidr": "10.66.2.0/24"},
                   "/admin/associations": {"id": 2, "cidr_id_2": 5}}[path])
    if dup == "pair":              # eighteenth round, S1: one pair under two ids
        b = {"id": 2, "cidr_id_1": 4, "cidr_id_2": 3}
    else:
        b[dup] = a[dup]
    root = Cidr(1, "net", "10.66.0.0/16", None).to_json()
    answers = {path: [a, b], "/admin/cidrs": [root] + ([a, b] if path == "/admin/cidrs" else [])}

    def request(method, p, body=None):
        return 200, {}, json.dumps(answers.get(p, [])).encode()
    net = remote_network(request)
    read = {"/admin/peers": net.peers, "/admin/cidrs": net.cidrs,
            "/admin/associations": net.associations}[path]
    with pytest.raises(InnernetError, match=f"the server lists two .* with {dup} "
                       if dup != "pair" else "the server lists two associations with CIDRs 3-4"):
        read()


@pytest.mark.parametrize("path,answer", [("/admin/peers", None), ("/admin/peers", 5),
                                         ("/admin/cidrs", "x"), ("/admin/associations", {}),
                                         ("/admin/peers", [dict(Peer(
                                             3, "carol", "::ffff:10.66.2.1", 1, "k").to_json())])])
def test_an_admin_list_of_the_wrong_shape_is_one_line(path, answer):
    """Eighteenth outside round, S2: a null or a number for an admin list,
    or a peer at an IPv4-mapped address (which `apply` compared with the
    network's IPv4 addresses), ended an admin's verb in a traceback. Each is
    one InnernetError, and nothing is signed."""
    root = Cidr(1, "net", "10.66.0.0/16", None).to_json()
    answers = {"/admin/cidrs": [root], path: answer} if path != "/admin/cidrs" else {path: answer}

    def request(method, p, body=None):
        return 200, {}, json.dumps(answers.get(p, [])).encode()
    net = remote_network(request)
    read = {"/admin/peers": net.peers, "/admin/cidrs": net.cidrs,
            "/admin/associations": net.associations}[path]
    with pytest.raises(InnernetError, match="must be a JSON list|must be a JSON object|outside "
                                            "the network's range"):
        read()


@pytest.mark.parametrize("answer", [{"forgotten": "x"}, {"forgotten": [1]}, {"forgotten": 1.5},
                                    [], None])
def test_forget_pins_takes_no_count_of_another_shape(answer):
    """Nineteenth outside round, T4: a non-number in forget-pins' answer
    ended the verb in a ValueError or TypeError traceback; it is one line."""
    def request(method, p, body=None):
        return 200, {}, json.dumps(answer).encode()
    net = remote_network(request)
    with pytest.raises(InnernetError, match="must be|JSON object"):
        net.forget_pins(Peer(3, "bob", "10.66.1.2", 3, "bob-key"))


def test_a_sync_in_flight_writes_back_no_lock_copy_older_than_a_lock_verbs(tmp_path):
    """Outside round 26, Z26-2 and Z26-3: a sync read the host's lock file,
    the server held it open while the admin ran `lock remove` (or signed a
    record), and its save wrote the older copy back: the removed key trusted
    again, the signed serial forgotten. The save now keeps a chain a lock
    verb changed meanwhile (the sync's lock data dropped, the sync failed and
    its ETag with it) and the serials signed meanwhile."""
    a, thief = lock_keypair(), lock_keypair()
    entries = chain_of(a)
    entries.append(lock_update(LockChain(entries), "add", thief[1], "thief", a[0], T))
    path = str(tmp_path / "net.lock.json")
    innernet.save_client_lock(path, {"chain": entries, "signed": {"peer:10.66.1.2": 5}})

    def sync_read():
        """What a sync holds once locked() read the file, and will save."""
        f = types.SimpleNamespace(files=types.SimpleNamespace(lock=path), failure=None,
                                  etag="e1", lock_on=False, lock_base=innernet.load_client_lock(path))
        f.lock = {"chain": f.lock_base["chain"], "known": {"peer:10.66.1.2": [5, "x"]},
                  "cache": {}, "refused": [], "signed": f.lock_base["signed"],
                  "synced": len(f.lock_base["chain"])}
        f.lock_changed = lambda now: innernet._Fetch.lock_changed(f, now)
        return f
    # a verb signs a newer record of one subject meanwhile: its serial stays
    f = sync_read()
    innernet.remember_signed(path, {"records": [{"t": "peer", "ip": "10.66.1.2", "n": 6}]})
    innernet._Fetch.save_lock(f)
    kept = innernet.load_client_lock(path)
    assert kept["signed"] == {"peer:10.66.1.2": 6} and f.failure is None
    assert kept["known"] == {"peer:10.66.1.2": [5, "x"]}          # the sync's own, kept
    # `lock remove` of the thief's key meanwhile: the sync's copy is not written back
    f = sync_read()
    removed = entries + [lock_update(LockChain(entries), "remove", thief[1], "thief", a[0], T)]
    with innernet.client_lock_guard(path):
        innernet.save_client_lock(path, dict(innernet.load_client_lock(path), chain=removed))
    innernet._Fetch.save_lock(f)
    kept = innernet.load_client_lock(path)
    assert kept["chain"] == removed and thief[1] not in LockChain(kept["chain"]).keys
    assert f.failure and "changed while this sync ran" in f.failure[0] and f.etag is None
    # ... nor applied (round 27, R27-2): checked before the device is touched
    with pytest.raises(InnernetError, match="nothing applied"):
        innernet._Fetch.lock_unchanged(f)
    # and the cached state verified under the old chain is not answered "not
    # modified" to the next sync: it asks for the whole state
    files = types.SimpleNamespace(lock=path, lock_seen=str(tmp_path / "net.lock-seen.json"))
    assert innernet.lock_moved(files)
    innernet.save_client_lock(path, dict(innernet.load_client_lock(path), synced=len(removed)))
    assert not innernet.lock_moved(files)
    # a host that has seen a lock and holds none asks for it at every sync (round 28)
    os.unlink(path)
    assert not innernet.lock_moved(files)
    open(files.lock_seen, "w").write('{"admins": []}')
    assert innernet.lock_moved(files)
    assert oct(os.stat(path + ".guard").st_mode & 0o777) == "0o600"


def test_a_lock_adoption_proof_still_counts_after_the_admin_or_the_peer_rotated(tmp_path):
    """Outside round 27, R27-3: `lock init` makes each adoption proof with the
    admin's key of the time, for the peer's key of the time. After either
    one's `rotate-key` (before the peer's next sync) the peer never took the
    lock, and said nothing in `status`. The proof is now checked with the
    admin key the peer pinned before it first saw the lock, and with the
    peer's own kept old keys; a lock not taken is a problem for `status`."""
    from innernet import generate_private_key as gen, public_key as pub
    a1, a2, p_old, p_new = gen(), gen(), gen(), gen()
    lk = lock_keypair()
    chain = chain_of(lk)
    genesis = LockChain(chain).genesis
    mac = innernet.adoption_proof(a1, genesis, pub(p_old))     # at lock init
    seen = tmp_path / "net.lock-seen.json"
    seen.write_text(json.dumps({"admins": [["10.66.1.1", pub(a1)]]}))
    admin = Peer(id=2, name="admin", ip="10.66.1.1", cidr_id=2, public_key=pub(a2),
                 is_admin=True)

    def fetch(answer, own=p_new, kept=(p_old,)):
        f = types.SimpleNamespace(
            iface="net", files=types.SimpleNamespace(lock_seen=str(seen)), problems=[],
            stored_peers=[admin], kept=lambda: {pub(k): k for k in kept},
            cfg=types.SimpleNamespace(server_ip="10.66.0.1", server_public_key=pub(gen()),
                                      private_key=own),
            api=types.SimpleNamespace(call=lambda *a: answer))
        f.not_adopted = lambda why: innernet._Fetch.not_adopted(f, why)
        return innernet._Fetch.adopt(f, {"chain": chain}), f.problems
    # the admin rotated to a2 and the peer to p_new since: taken all the same
    taken, problems = fetch({"admin_ip": "10.66.1.1", "admin_key": pub(a2), "mac": mac})
    assert taken == {"chain": chain} and problems == []
    # without the kept old key the proof is for no key of ours: not taken, and said
    taken, problems = fetch({"admin_ip": "10.66.1.1", "admin_key": pub(a2), "mac": mac},
                            kept=())
    assert taken is None and "not valid for this host" in problems[0]
    # a proof made by a key not pinned here before the lock counts for nothing
    forged = innernet.adoption_proof(a2, genesis, pub(p_new))
    taken, problems = fetch({"admin_ip": "10.66.1.1", "admin_key": pub(a2), "mac": forged})
    assert taken is None and problems


def test_a_lost_copy_takes_the_lock_again_only_as_far_as_this_host_had_seen_it(tmp_path):
    """Outside round 30, U30-2: a host restored without its lock copy took
    the lock again from an admin's proof, which binds only the genesis: a
    hijacked server showed it the chain from before a `lock remove` of a
    stolen key, trusted again. lock-seen now keeps how far the chain had got
    (note_lock_seen, at every locked sync), and a chain that does not reach
    it is not taken: a status problem."""
    from innernet import generate_private_key as gen, public_key as pub
    a1, own = gen(), gen()
    lk, stolen = lock_keypair(), lock_keypair()
    old = chain_of(lk)
    old.append(lock_update(LockChain(old), "add", stolen[1], "stolen", lk[0], T))
    new = old + [lock_update(LockChain(old), "remove", stolen[1], "stolen", lk[0], T)]
    mac = innernet.adoption_proof(a1, LockChain(old).genesis, pub(own))
    seen = str(tmp_path / "net.lock-seen.json")
    admin = Peer(id=2, name="admin", ip="10.66.1.1", cidr_id=2, public_key=pub(a1),
                 is_admin=True)
    server = ("10.66.0.1", pub(gen()))
    innernet.note_lock_seen(seen, [admin], server, [2, LockChain(old).head])
    innernet.note_lock_seen(seen, [admin], server, [3, LockChain(new).head])
    innernet.note_lock_seen(seen, [admin], server, [2, LockChain(old).head])   # never back
    assert innernet.read_lock_seen(seen)[1] == [3, LockChain(new).head]
    assert json.load(open(seen))["admins"] == [["10.66.1.1", pub(a1)]]
    assert oct(os.stat(seen).st_mode & 0o777) == "0o600"

    def fetch(chain):
        f = types.SimpleNamespace(
            iface="net", files=types.SimpleNamespace(lock_seen=seen), problems=[],
            stored_peers=[admin], kept=lambda: {},
            cfg=types.SimpleNamespace(server_ip=server[0], server_public_key=server[1],
                                      private_key=own),
            api=types.SimpleNamespace(call=lambda *a: {
                "admin_ip": "10.66.1.1", "admin_key": pub(a1), "mac": mac}))
        f.not_adopted = lambda why, line=None: innernet._Fetch.not_adopted(f, why, line)
        return innernet._Fetch.adopt(f, {"chain": chain}), f.problems
    taken, problems = fetch(old)                        # rolled back past the removal
    assert taken is None and "older than the one this host had seen" in problems[0]
    taken, problems = fetch(new)
    assert taken == {"chain": new[:1]} and problems == []


def test_an_admin_signs_under_no_chain_older_than_the_one_its_host_had_seen(tmp_path):
    """Outside round 31, V31-1b: an admin's lock copy put back from an older
    backup, and a hijacked server showing the chain from before a `lock
    remove` of a stolen key: the chain extends the copy, so the admin's next
    verb (another `lock remove`) signed the stolen key's records again under
    a trusted key, for every host. Its verbs now refuse a chain that does not
    reach the one its host had verified (lock-seen's "reached")."""
    lk, stolen = lock_keypair(), lock_keypair()
    old = chain_of(lk)
    old.append(lock_update(LockChain(old), "add", stolen[1], "stolen", lk[0], T))
    new = old + [lock_update(LockChain(old), "remove", stolen[1], "stolen", lk[0], T)]
    own = str(tmp_path / "net.lock.json")
    innernet.save_client_lock(own, {"chain": old})               # the restored copy

    def info(chain, reached):
        answer = {"chain": chain, "records": {}}
        return innernet.remote_lock_info(lambda: (answer, reached), own)[0]
    with pytest.raises(InnernetError, match="older than the one this host had seen"):
        info(old, [3, LockChain(new).head])
    assert info(old, [2, LockChain(old).head]) == old
    assert info(new, [3, LockChain(new).head]) == new


def test_a_lock_verb_never_saves_a_chain_over_a_copy_it_does_not_extend(tmp_path):
    """Outside round 31, V31-2: `lock add` and `lock remove` at once, both
    taken by a hijacked server; the later answer wrote its fork (still
    trusting the removed key) over the copy the other had saved."""
    a, b, c = lock_keypair(), lock_keypair(), lock_keypair()
    base = chain_of(a)
    base.append(lock_update(LockChain(base), "add", b[1], "b", a[0], T))
    removed = base + [lock_update(LockChain(base), "remove", b[1], "b", a[0], T)]
    added = base + [lock_update(LockChain(base), "add", c[1], "c", a[0], T)]
    path = str(tmp_path / "net.lock.json")
    files = types.SimpleNamespace(lock=path, lock_seen=str(tmp_path / "net.lock-seen.json"))
    innernet.save_client_lock(path, {"chain": base})
    innernet.save_own_lock(files, removed, None)
    with pytest.raises(InnernetError, match="another lock verb changed this host's copy"):
        innernet.save_own_lock(files, added, None)
    assert innernet.load_client_lock(path)["chain"] == removed
    longer = removed + [lock_update(LockChain(removed), "add", c[1], "c", a[0], T)]
    innernet.save_own_lock(files, longer, None)
    assert innernet.load_client_lock(path)["chain"] == longer
    # outside round 32, X32-2: how far this host's own verbs took the chain is
    # in lock-seen, so a copy put back from before them is refused as rolled back
    assert innernet.read_lock_seen(files.lock_seen) == (None, [4, LockChain(longer).head])


class RestoredServer:
    """GET/POST /admin/lock of a server restored from a backup, as far as
    server_lock_answer sees it: its chain, its records and their batches. A
    POST extends the chain (an extension of its own only) and keeps signed
    records it holds at the same serial (what the database holds); one it
    does not hold sinks the request, as the real server's check does."""

    def __init__(self, chain, records, batches):
        self.chain, self.records, self.batches, self.calls = chain, records, batches, []

    def call(self, method, path, body=None):
        self.calls.append(method)
        if method == "POST":
            if LockChain(self.chain).extended_by(body["chain"]) is None:
                raise InnernetError("409 not an extension")
            self.chain = body["chain"]
            signed = body["signed"]
            if signed:
                for r in signed["records"]:
                    s = innernet.record_subject(r)
                    if (self.records.get(s) or {}).get("n") != r["n"]:
                        raise InnernetError(f"400 the signed record of {s} does not match")
                self.records.update({innernet.record_subject(r): r for r in signed["records"]})
                self.batches.append(signed["batch"])
        return {"chain": self.chain, "records": dict(self.records), "batches": list(self.batches)}


def test_an_admin_verb_sends_a_restored_server_the_chain_it_lost_and_changes_nothing_hidden(
        tmp_path, capsys):
    """Outside round 32. X32-1: a server database restored from before the
    last lock change left every admin verb refused ("does not extend this
    host's copy") with no way back; the admin's host now sends the server the
    entries it lacks (it takes an extension of its own chain), once. X32-3: an
    admin host that has seen the lock and lost its copy, shown no lock at
    all, ran every verb but `lock init` unsigned; none runs now. Round 35:
    what a lost `lock remove` signed again is sent too when another admin's
    host sent the chain first (R35-2), and only the records the server holds:
    one signed after the backup no longer sinks the rest (R35-5)."""
    a, b = lock_keypair(), lock_keypair()
    base = chain_of(a, b)
    longer = base + [lock_update(LockChain(base), "remove", a[1], "k0", b[0], T)]
    old = [peer_payload(NET, 5, ip=f"10.0.0.{i}", key=f"key{i}", name=f"p{i}", cidr="10.0.0.0/24")
           for i in (2, 3)]
    late = peer_payload(NET, 7, ip="10.0.0.4", key="key4", name="p4", cidr="10.0.0.0/24")
    again = old + [late]             # the removed key's newest, signed again by the remover
    kept = {"batch": sign_batch(NET, b[0], again), "records": again}
    files = types.SimpleNamespace(iface="net", lock=str(tmp_path / "net.lock.json"),
                                  lock_seen=str(tmp_path / "net.lock-seen.json"))
    innernet.save_client_lock(files.lock, {"chain": longer, "resend": [[1, {"old": 1}],
                                                                        [2, kept]]})

    def restored():      # the backup: a's batch of the two old records, no `lock remove`
        return RestoredServer(base, {innernet.record_subject(r): r for r in old},
                              [sign_batch(NET, a[0], old)])

    def verified(server):
        return innernet.verified_lock_records(LockChain(server.chain), server.records,
                                              server.batches)
    server = restored()
    got, _ = innernet.server_lock_answer(server, files)
    assert got["chain"] == longer and server.chain == longer
    assert sorted(verified(server)) == ["peer:10.0.0.2", "peer:10.0.0.3"]
    assert server.calls == ["GET", "POST", "GET", "POST", "GET"]
    err = capsys.readouterr().err
    assert "lacks the last 1 entries of this host's copy" in err
    assert "had lost the signature of 2 record(s) signed with lock entry 2: sent again" in err
    server.calls.clear()                  # all there: one look, nothing sent
    assert innernet.server_lock_answer(server, files)[0]["chain"] == longer
    assert server.calls == ["GET"]
    server = restored()                   # R35-2: another admin's host sent the chain first
    server.chain = longer
    innernet.server_lock_answer(server, files)
    assert sorted(verified(server)) == ["peer:10.0.0.2", "peer:10.0.0.3"]
    assert server.calls == ["GET", "POST", "GET"]
    server = restored()                   # the remover's key removed since: nothing sent
    server.chain = longer + [lock_update(LockChain(longer), "add", a[1], "k0", b[0], T)]
    server.chain.append(lock_update(LockChain(server.chain), "remove", b[1], "k1", a[0], T))
    innernet.server_lock_answer(server, files)
    assert server.calls == ["GET"]
    calls = []                            # a server that keeps losing it: sent once a verb
    innernet.server_lock_answer(types.SimpleNamespace(
        call=lambda m, p, body=None: calls.append(m) or {"chain": base}), files)
    assert calls == ["GET", "POST", "GET"]
    os.unlink(files.lock)                      # X32-3
    innernet.note_lock_seen(files.lock_seen, None, None, [2, LockChain(longer).head])
    with pytest.raises(InnernetError, match=r"the server shows none \(hiding it\?\)"):
        innernet.server_lock_answer(types.SimpleNamespace(call=lambda *a: {}), files)


def test_a_chain_entry_has_one_encoding_so_no_copy_of_it_forks_the_chain():
    """Outside round 34, Q34-2: an entry's hash covers its encoding, and a
    copy with an extra field beside the signed payload, or its signature in
    another base64 form of the same 64 bytes, verified: taken first by a
    server, it forked the chain for every host holding the original. Such a
    copy is refused now."""
    import base64
    a, b = lock_keypair(), lock_keypair()
    base = chain_of(a)
    entry = lock_update(LockChain(base), "add", b[1], "b", a[0], T)
    assert LockChain(base + [entry]).keys
    raw = base64.b64decode(entry["sig"])
    abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    sig = entry["sig"]                   # 64 bytes: "xy==", y's low 4 bits are padding
    other = sig[:-3] + abc[abc.index(sig[-3]) ^ 1] + "=="
    assert base64.b64decode(other) == raw and other != entry["sig"]    # same bytes
    for copy_ in (dict(entry, extra="x" * 10), dict(entry, sig=other)):
        with pytest.raises(InnernetError, match="lock chain entry 1"):
            LockChain(base + [copy_])
    assert not lock_verify(a[1], entry["payload"], other)


def test_a_disablement_has_one_encoding_too():
    """Outside round 35, R35-1: a disablement is not signed, and a copy with a
    signer, a signature, another field or a time that is no integer verified
    beside the original, so two hosts could end on two disabled chains that
    refuse each other. Such copies are refused; the disablement itself is taken."""
    a = lock_keypair()
    base = chain_of(a)
    entry = lock_disablement(LockChain(base), "s3cret", T)
    assert LockChain(base + [entry]).disabled
    for copy_ in (dict(entry, signer=a[1]), dict(entry, sig="AAAA"),
                  dict(entry, payload=dict(entry["payload"], note="x")),
                  dict(entry, payload=dict(entry["payload"], at=float(T))),
                  dict(entry, payload=dict(entry["payload"], at=True)),
                  dict(entry, payload={k: v for k, v in entry["payload"].items() if k != "at"})):
        with pytest.raises(InnernetError, match="lock chain entry 1: a disablement with fields"):
            LockChain(base + [copy_])
    # Outside round 36, S36-5: the secret is out once used, and a disablement
    # at another time is another entry; a host holding one takes the other's
    # chain as its own (nothing is verified after a disablement), not as a fork.
    ours = LockChain(base + [entry])
    other = base + [lock_disablement(LockChain(base), "s3cret", T + 1)]
    assert ours.extended_by(other) is ours and adopt_chain(ours, other) == (ours, None)
    assert LockChain(base).extended_by(other).disabled
    b = lock_keypair()
    longer = base + [lock_update(LockChain(base), "add", b[1], "b", a[0], T)]
    assert ours.extended_by(longer + [lock_disablement(LockChain(longer), "s3cret", T)]) is None
