"""Network lock against a hijacked server (issue 32), end to end.

A network with the real server; an admin locks it from its own host
(`innernet lock init`), makes signed changes over the API (apply, delete-peer)
and invites alice, who joins under lock. zed joined before the lock and never
took it (its adoption proof is withheld): it is the control, a client without
lock. Then the scripted double (hostile.py) takes the server's place with
full control of its database and its keys, and tells both clients each lie of
the issue: alice refuses every one of them, zed takes every one -- so each
test would fail if the lie were taken, and shows what lock adds.

bob, carol and dave are peers on paper: redeemed in the database, never on a
host (their keys are made here). The lab runs the .pyz under the test's own
interpreter, which has PyNaCl (lock needs it).
"""
import copy
import json
import os
import sys
import time
import types

import pytest

from lab import ROOT, Lab, db_rows, db_write, device, invite, start_network, wait_for

from .hostile import honest_state, take_over

try:
    import nacl.signing  # noqa: F401
    HAVE_NACL = True
except ImportError:
    HAVE_NACL = False
# Collected without PyNaCl too (tests/test_suite.py), and skipped with the reason.
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not HAVE_NACL,
                                                    reason="network lock needs PyNaCl")]

SERVER_IP, ADMIN_IP, ALICE_IP, ZED_IP = "10.66.0.1", "10.66.1.1", "10.66.1.2", "10.66.1.9"
PAPER = {"bob": ("humans", "10.66.1.3"), "carol": ("others", "10.66.2.4"),
         "dave": ("humans", "10.66.1.5")}


def _innernet():
    sys.path.insert(0, ROOT)
    import innernet
    return innernet


def _install(w, name, path):
    host = w.lab.add_host(name)
    iface = w.lab.ifname(name)
    out = host.innernet("install", "--name", iface, "--no-write-hosts", path)
    return host, iface, out


@pytest.fixture(scope="module")
def w(pyz):
    I = _innernet()
    lab = Lab(innernet_cmd=[sys.executable, pyz])
    w = types.SimpleNamespace(lab=lab, n=0)
    try:
        w.srv, w.net, w.serve = start_network(lab, {"humans": "10.66.1.0/24",
                                                    "others": "10.66.2.0/24"})
        w.db = w.srv.path("server", "lib", f"{w.net}.db")
        w.admin, w.admin_if, _ = _install(w, "admin", invite(w.srv, w.net, "admin", "humans",
                                                             admin="true", ip=ADMIN_IP))
        w.zed, w.zed_if, _ = _install(w, "zed", invite(w.srv, w.net, "zed", "humans",
                                                       ip=ZED_IP))
        w.keys = {}
        for name, (cidr, ip) in PAPER.items():
            invite(w.srv, w.net, name, cidr, ip=ip)
            w.keys[name] = I.public_key(I.generate_private_key())
            db_write(w.db, "UPDATE peers SET is_redeemed = 1, public_key = ? WHERE name = ?",
                    (w.keys[name], name))
        w.admin.innernet("fetch", w.admin_if, "--no-write-hosts")
        out = w.admin.innernet("lock", "init", w.admin_if, "--yes")
        w.secret = out.stdout.split("keep it offline): ")[1].split()[0]
        w.lock_init_err = out.stderr
        zed_key = db_rows(w.db, "SELECT public_key FROM peers WHERE name = 'zed'")[0][0]
        db_write(w.db, "DELETE FROM lock_adoptions WHERE peer_key = ?", (zed_key,))
        path = w.admin.path("alice.toml")
        w.admin.innernet("add-peer", w.admin_if, "--name", "alice", "--cidr", "humans",
                         "--ip", ALICE_IP, "--admin", "false", "--save-config", path,
                         "--invite-expires", "1h", "--yes")
        w.alice_invite = open(path).read()          # a copy the hijacker keeps
        w.alice, w.alice_if, w.alice_join = _install(w, "alice", path)
        # alice's record as the invitation signed it, before any re-signing
        row = db_rows(w.db, "SELECT r.payload, b.signer, b.sig, b.hashes FROM lock_records r "
                      "JOIN lock_batches b ON b.id = r.batch_id WHERE r.subject = ?",
                      (f"peer:{ALICE_IP}",))[0]
        w.alice_auth = (json.loads(row[0]), {"k": row[1], "s": row[2], "h": json.loads(row[3])})
        cfg = I.InterfaceConfig.from_toml(open(w.alice.path(
            "client", "etc", f"{w.alice_if}.conf")).read(), "alice")
        w.server_key = cfg.server_public_key
        # the admin's host takes alice's enrollment itself: only then does its
        # next signing name her enrolled key (never the server's word for it)
        w.admin.innernet("fetch", w.admin_if, "--no-write-hosts")
        # Honest, signed changes: bob routes a LAN (the state then is S1), no
        # longer does, and dave is deleted.
        _apply(w, lambda doc: doc.replace('name = "bob"\n', 'name = "bob"\n'
                                          'routes = ["192.168.60.0/24"]\n'))
        w.alice.innernet("fetch", w.alice_if, "--no-write-hosts")
        w.s1 = honest_state(w.alice, f"{SERVER_IP}:51820", w.server_key)
        w.s1_zed = honest_state(w.zed, f"{SERVER_IP}:51820", w.server_key)
        _apply(w, lambda doc: doc.replace('routes = ["192.168.60.0/24"]\n', ''))
        w.admin.innernet("delete-peer", w.admin_if, "--name", "dave", "--yes")
        for host, iface in ((w.alice, w.alice_if), (w.zed, w.zed_if)):
            w.zed_fetch = host.innernet("fetch", iface, "--no-write-hosts")
        w.honest = honest_state(w.alice, f"{SERVER_IP}:51820", w.server_key)
        w.honest_zed = honest_state(w.zed, f"{SERVER_IP}:51820", w.server_key)
        w.records = {r[0]: json.loads(r[1]) for r in db_rows(
            w.db, "SELECT subject, payload FROM lock_records")}
        w.hostile = take_over(w.srv, w.serve, SERVER_IP, 51820, w.net,
                              {"GET /v1/user/state": {"body": w.honest}})
        yield w
    finally:
        lab.close()


def _apply(w, edit):
    doc = w.admin.innernet("export", w.admin_if).stdout
    path = w.admin.path(f"doc{w.n}.toml")
    w.n += 1
    with open(path, "w") as f:
        f.write(edit(doc))
    w.admin.innernet("apply", w.admin_if, path, "--yes")


def peer_of(state, name):
    return next(p for p in state["peers"] if p["name"] == name)


def lie(w, host, iface, state, code=0):
    """Tell ``host`` ``state``; its fetch's output (its exit status ``code``)."""
    w.hostile.script({"GET /v1/user/state": {"body": state},
                      "GET /v1/user/capabilities": {"body": {"dns": f"{w.net}.wg"}}})
    before = len(w.hostile.requests())
    out = host.innernet("fetch", iface, "--no-write-hosts", check=False)
    assert ("GET", "/v1/user/state") in [(m, p.split("?")[0])
                                         for m, p in w.hostile.requests()[before:]]
    assert out.returncode == code, out.stderr
    return out


def both(w, make):
    """The lie ``make(state)`` told to alice (locked) and to zed (no lock): their
    outputs and devices ({allowed IP: key})."""
    res = {}
    for who, host, iface, honest in (("alice", w.alice, w.alice_if, w.honest),
                                     ("zed", w.zed, w.zed_if, w.honest_zed)):
        state = make(copy.deepcopy(honest))
        if who == "zed":
            state.pop("lock", None)
        out = lie(w, host, iface, state)
        held = {a: p["public_key"] for p in device(host, iface)["peers"]
                for a in p["allowed_ips"]}
        res[who] = types.SimpleNamespace(out=out, held=held, err=out.stderr)
    return res["alice"], res["zed"]


def refused(out, name):
    return [ln for ln in out.err.splitlines() if f"lock refused peer '{name}'" in ln]


def test_lock_init_signs_the_running_network_and_a_peer_joins_under_lock(w):
    assert "network lock" in w.lock_init_err or "locked" in w.lock_init_err
    assert {"peer:10.66.1.3", "peer:10.66.2.4", "peer:10.66.1.5", "cidr:10.66.1.0/24",
            f"peer:{ALICE_IP}"} <= set(w.records)
    assert w.records["peer:10.66.1.5"]["deleted"]             # dave, signed deleted
    # alice's record named her invitation's one-time key, with its expiry; the
    # admin's next signing (the apply) named the key she enrolled instead
    assert w.alice_auth[0]["key"].startswith("auth:") and w.alice_auth[0]["key"].count(":") == 2
    assert w.records[f"peer:{ALICE_IP}"]["key"] == peer_of(w.honest, "alice")["public_key"]
    held = {a for p in device(w.alice, w.alice_if)["peers"] for a in p["allowed_ips"]}
    assert f"{ADMIN_IP}/32" in held and "10.66.1.3/32" in held     # admin, bob: signed
    assert "lock refused" not in w.alice_join.stderr, w.alice_join.stderr
    # zed never took the lock: its adoption proof was withheld
    assert not os.path.exists(w.zed.path("client", "lib", f"{w.zed_if}.lock.json"))


def mallory(w, ip="10.66.1.66", name="mallory", **kw):
    I = _innernet()
    p = copy.deepcopy(peer_of(w.honest, "bob"))
    p.update(id=990, name=name, ip=ip, public_key=I.public_key(I.generate_private_key()),
             endpoint=None, candidates=[])
    p.update(kw)
    return p


def test_a_new_peer_is_refused_under_lock_and_taken_without(w):
    bad = mallory(w)
    alice, zed = both(w, lambda s: dict(s, peers=s["peers"] + [bad]))
    assert len(refused(alice, "mallory")) == 1 and "no record signed" in alice.err
    assert bad["public_key"] not in alice.held.values()
    assert zed.held.get("10.66.1.66/32") == bad["public_key"]


def test_a_key_change_without_the_peers_own_proof_is_refused_under_lock_even_unpinned(w):
    """Pinning refuses it where a client knew the old key; lock refuses it on a
    client that never pinned bob (its data store lost), where pinning cannot.
    bob's record comes without its key (the compact form: the state's key is
    put back), so it is the record's hash that fails; alice verified its
    batch before, so she loses bob alone."""
    new = _innernet().public_key(_innernet().generate_private_key())
    forget_pins(w)
    assert "key" not in bob_record(w.honest["lock"])[1]

    def swap(s):
        peer_of(s, "bob")["public_key"] = new
        return s
    alice, zed = both(w, swap)
    line = refused(alice, "bob")
    assert len(line) == 1 and "sent without the key" in line[0] \
        and "nor reached by the peer's own rotation" in line[0], alice.err
    assert new not in alice.held.values()
    assert alice.held.get(f"{ADMIN_IP}/32") and "lock refused" not in alice.err.replace(
        line[0], "")
    assert zed.held.get("10.66.1.3/32") == new
    # the proof may come without the state changing: status says alice waits
    # for it, and her next sync asks for the whole state, not "unchanged?"
    st = w.alice.innernet("status", w.alice_if, check=False).stdout
    assert "waiting for the proof of peer bob's new key (10.66.1.3), refused under lock " \
           "until it comes (or a key the server swapped: none will)" in st, st
    assert not os.path.exists(w.alice.path("client", "lib", f"{w.alice_if}.fetch"))
    forget_pins(w)                             # zed pinned the lie
    both(w, lambda s: s)                       # the truth again, for the tests after


def bob_record(lock):
    """(index, record) of bob's peer record in a state's lock section."""
    return next((i, r) for i, r in enumerate(lock["records"])
                if r.get("t") == "peer" and r.get("ip") == PAPER["bob"][1])


def full_form(state):
    """``state``'s lock section as its admins signed it, every key and hash
    back in place (lock_unwire): a client takes it as it takes the compact
    form, and a lying server edits it to drop or swap one record without
    breaking the rest of its batch."""
    I = _innernet()
    lock = state["lock"]
    recs, batches = I.lock_unwire(I.LockChain(lock["chain"]).net, lock,
                                  {p["ip"]: p["public_key"] for p in state["peers"]})
    lock["records"] = [p for p, _, _ in recs]
    lock["batches"] = [b for b, _ in batches]
    return state


def test_the_compact_lock_section_lied_about_is_refused_under_lock(w):
    """The state's compact form (a peer record without the key beside it, a
    batch's hashes of the records it carries as nulls, filled in the order
    the records come) gives a lying server nothing: bob's record carrying
    another key, his record moved out of its batch's order, a null for a
    record the state does not carry -- each refuses bob (the rest of a
    batch filled wrongly goes with him), never installs his record as
    signed. The full form is taken as the compact one is."""
    I = _innernet()
    new = I.public_key(I.generate_private_key())

    def key_in_record(s):
        peer_of(s, "bob")["public_key"] = new
        bob_record(s["lock"])[1]["key"] = new

    def moved(s):
        i, rec = bob_record(s["lock"])
        j = i + 1 if i + 1 < len(s["lock"]["records"]) else i - 1
        s["lock"]["records"][i], s["lock"]["records"][j] = s["lock"]["records"][j], rec

    def extra_null(s):              # in bob's batch: the batches before it stay whole
        i, _ = bob_record(s["lock"])
        for b in s["lock"]["batches"]:
            if i < b["h"].count(None):
                b["h"].insert(0, None)
                return
            i -= b["h"].count(None)

    for tell in (key_in_record, moved, extra_null):
        state = copy.deepcopy(w.honest)
        tell(state)
        out = lie(w, w.alice, w.alice_if, state)
        line = [ln for ln in out.stderr.splitlines() if "lock refused peer 'bob'" in ln]
        assert len(line) == 1, (tell.__name__, out.stderr)
        held = {a: p["public_key"] for p in device(w.alice, w.alice_if)["peers"]
                for a in p["allowed_ips"]}
        assert "10.66.1.3/32" not in held and new not in held.values(), tell.__name__
    out = lie(w, w.alice, w.alice_if, full_form(copy.deepcopy(w.honest)))
    assert "lock refused" not in out.stderr, out.stderr
    held = {a: p["public_key"] for p in device(w.alice, w.alice_if)["peers"]
            for a in p["allowed_ips"]}
    assert held.get("10.66.1.3/32") == w.keys["bob"]
    lie(w, w.alice, w.alice_if, w.honest)


def forget_pins(w):
    """Both clients lose their data stores (their pins): alice keeps her lock file."""
    for host, iface in ((w.alice, w.alice_if), (w.zed, w.zed_if)):
        _innernet().save_data_store(host.path("client", "lib", f"{iface}.json"), [], [])


def test_an_address_move_is_refused_under_lock(w):
    def move(s):
        peer_of(s, "bob")["ip"] = "10.66.1.77"
        return s
    alice, zed = both(w, move)
    assert len(refused(alice, "bob")) == 1
    assert "10.66.1.77/32" not in alice.held
    assert zed.held.get("10.66.1.77/32") == w.keys["bob"]
    both(w, lambda s: s)


def test_a_route_or_exit_node_not_signed_is_not_installed_under_lock(w):
    def route(s):
        peer_of(s, "bob").update(routes=["192.168.70.0/24"], exit_node=True)
        return s
    alice, zed = both(w, route)
    line = refused(alice, "bob")
    assert len(line) == 1 and "192.168.70.0/24, the exit node not signed" in line[0]
    assert "192.168.70.0/24" not in alice.held and alice.held["10.66.1.3/32"] == w.keys["bob"]
    assert zed.held.get("192.168.70.0/24") == w.keys["bob"]
    both(w, lambda s: s)


def test_an_admin_flag_not_signed_is_refused_under_lock(w):
    def admin(s):
        peer_of(s, "bob")["is_admin"] = True
        return s
    alice, zed = both(w, admin)
    assert len(refused(alice, "bob")) == 1 and "admin flag differs" in alice.err
    assert "10.66.1.3/32" not in alice.held
    stored = json.load(open(w.zed.path("client", "lib", f"{w.zed_if}.json")))
    assert next(p for p in stored["peers"] if p["name"] == "bob")["is_admin"] is True
    both(w, lambda s: s)


def test_a_widened_view_is_refused_under_lock(w):
    """carol is a real, signed peer in 'others', which 'humans' may not see:
    the server adds her to alice's state with a forged association."""
    I = _innernet()
    carol = mallory(w, ip=PAPER["carol"][1], name="carol", public_key=w.keys["carol"],
                    cidr_id=next(c["id"] for c in w.honest["cidrs"] if c["name"] == "others"))
    forged = I.assoc_payload(I.LockChain(w.honest["lock"]["chain"]).net, 2 ** 40,
                             a="10.66.1.0/24", b="10.66.2.0/24")

    def widen(s):
        s["peers"].append(carol)
        if "lock" in s:
            s["lock"]["records"] += [w.records["peer:10.66.2.4"], forged]
            s["lock"]["batches"] = _all_batches(w)
        return s
    alice, zed = both(w, widen)
    assert len(refused(alice, "carol")) == 1 and "is not one this host may see" in alice.err
    assert "10.66.2.4/32" not in alice.held
    assert zed.held.get("10.66.2.4/32") == w.keys["carol"]
    both(w, lambda s: s)


def _all_batches(w):
    return [{"k": r[0], "s": r[1], "h": json.loads(r[2])}
            for r in db_rows(w.db, "SELECT signer, sig, hashes FROM lock_batches")] + \
        w.honest["lock"]["batches"]


def test_a_deleted_peer_brought_back_is_refused_under_lock(w):
    """dave was deleted by a signed record alice saw; the server sends the
    state from before (S1), dave and his older signed record in it."""
    alice = lie(w, w.alice, w.alice_if, w.s1)
    zed = lie(w, w.zed, w.zed_if, {k: v for k, v in w.s1_zed.items() if k != "lock"})
    dave_key = peer_of(w.s1, "dave")["public_key"]
    assert len([ln for ln in alice.stderr.splitlines() if "'dave'" in ln]) == 1, alice.stderr
    assert dave_key not in [p["public_key"] for p in device(w.alice, w.alice_if)["peers"]]
    assert dave_key in [p["public_key"] for p in device(w.zed, w.zed_if)["peers"]]
    both(w, lambda s: s)


def test_an_older_signed_record_replayed_is_refused_under_lock(w):
    """bob's route was signed, then signed away; S1 replays the older record."""
    alice = lie(w, w.alice, w.alice_if, w.s1)
    lie(w, w.zed, w.zed_if, {k: v for k, v in w.s1_zed.items() if k != "lock"})
    line = [ln for ln in alice.stderr.splitlines() if "lock refused peer 'bob'" in ln]
    assert len(line) == 1 and "older signed record" in line[0], alice.stderr
    held = {a for p in device(w.alice, w.alice_if)["peers"] for a in p["allowed_ips"]}
    assert "192.168.60.0/24" not in held
    zheld = {a for p in device(w.zed, w.zed_if)["peers"] for a in p["allowed_ips"]}
    assert "192.168.60.0/24" in zheld
    both(w, lambda s: s)


def test_the_servers_own_record_gives_no_route_or_name_beyond_its_signed_one_under_lock(w):
    """The server's entry is kept (its key and endpoint are the client's
    config's), but a route or a name on it that its signed record lacks is
    not taken: a /25 would outrank a peer's signed /24, and a peer's name
    would map to the server in the hosts file (outside probe, finding 1)."""
    assert f"peer:{SERVER_IP}" in w.records

    def server(s):
        peer_of(s, "innernet-server").update(routes=["192.168.72.0/25"], name="bob")
        return s
    alice, zed = both(w, server)
    line = refused(alice, "innernet-server")
    assert len(line) == 1 and "192.168.72.0/25 not signed" in line[0], alice.err
    assert "name 'bob' is not the signed one" in line[0]
    assert "192.168.72.0/25" not in alice.held and alice.held[f"{SERVER_IP}/32"] == w.server_key
    assert zed.held.get("192.168.72.0/25") == w.server_key
    stored = json.load(open(w.alice.path("client", "lib", f"{w.alice_if}.json")))
    assert [p["name"] for p in stored["peers"] if p["ip"] == SERVER_IP] == ["innernet-server"]
    both(w, lambda s: s)


def _forwarding(host, iface):
    return host.exec(["cat", f"/proc/sys/net/ipv4/conf/{iface}/forwarding"]).stdout.strip()


def test_an_unsigned_route_on_a_clients_own_record_turns_no_forwarding_on_under_lock(w):
    """The server gives each client's own record a route: forwarding would
    go on for the hijacker to reach its LAN (outside probe, finding 2)."""
    out = {}
    for who, host, iface, honest in (("alice", w.alice, w.alice_if, w.honest),
                                     ("zed", w.zed, w.zed_if, w.honest_zed)):
        assert _forwarding(host, iface) == "0"
        state = copy.deepcopy(honest)
        peer_of(state, who)["routes"] = ["192.168.73.0/24"]
        if who == "zed":
            state.pop("lock", None)
        out[who] = lie(w, host, iface, state)
    line = [ln for ln in out["alice"].stderr.splitlines() if "lock refused peer 'alice'" in ln]
    assert len(line) == 1 and "192.168.73.0/24 not signed" in line[0], out["alice"].stderr
    assert _forwarding(w.alice, w.alice_if) == "0"
    assert _forwarding(w.zed, w.zed_if) == "1"              # without lock: taken
    w.zed.exec(["sh", "-c", f"echo 0 > /proc/sys/net/ipv4/conf/{w.zed_if}/forwarding"])
    both(w, lambda s: s)


def test_a_host_whose_own_record_the_server_leaves_out_is_unhealthy_under_lock(w):
    """Outside round 35, R35-4: a host whose own record verifies under no
    trusted key refuses every peer (it cannot tell what it may see), and
    `status` called it healthy, exit 0. It is a problem there now, exit 1."""
    def drop(state):
        lock = full_form(state)["lock"]
        lock["records"] = [r for r in lock["records"]
                           if not (r.get("t") == "peer" and r.get("ip") == ALICE_IP)]
        return state
    line = refused(types.SimpleNamespace(err=lie(w, w.alice, w.alice_if,
                                                 drop(copy.deepcopy(w.honest))).stderr), "bob")
    assert len(line) == 1 and "own record is not signed" in line[0]
    st = w.alice.innernet("status", w.alice_if, check=False)
    assert st.returncode == 1 and "own record is not signed" in st.stdout, st.stdout
    lie(w, w.alice, w.alice_if, copy.deepcopy(w.honest))       # the truth again
    assert w.alice.innernet("status", w.alice_if, check=False).returncode == 0


def test_the_server_alone_cannot_turn_lock_off(w):
    """A state without lock, or with a disablement whose secret is wrong: alice
    keeps her chain and refuses the new peer all the same; `show` says why."""
    I = _innernet()
    bad = mallory(w, ip="10.66.1.67", name="mallory2")
    state = copy.deepcopy(w.honest)
    state.pop("lock")
    state["peers"].append(bad)
    out = lie(w, w.alice, w.alice_if, state, code=1)      # loud (round 24, X24-7)
    assert "error: network lock: the server sent no lock chain: kept ours" in out.stderr
    assert w.alice.innernet("status", w.alice_if, check=False).returncode == 1
    assert len(refused(types.SimpleNamespace(err=out.stderr), "mallory2")) == 1
    chain = I.LockChain(w.honest["lock"]["chain"])
    forged = copy.deepcopy(w.honest)
    forged["lock"]["chain"].append(I.lock_disablement(chain, "guessed", 0))
    forged["peers"].append(bad)
    out = lie(w, w.alice, w.alice_if, forged, code=1)
    assert "invalid" in out.stderr and "kept ours" in out.stderr
    held = {p["public_key"] for p in device(w.alice, w.alice_if)["peers"]}
    assert bad["public_key"] not in held
    show = w.alice.innernet("show", w.alice_if).stdout
    assert "lock refused peer 'mallory2'" in show
    # a chain of the server's own: kept ours, and no verb gives ours up
    # (rounds 22-23: `lock forget` did, on that line's advice, for the server)
    private, public = I.lock_keypair()
    own = copy.deepcopy(forged)
    own["lock"]["chain"] = [I.lock_genesis(chain.net, [(public, "evil")], "s", private, 0)]
    out = lie(w, w.alice, w.alice_if, own, code=1)
    assert "does not extend ours: kept ours (hijacked?)" in out.stderr, out.stderr
    assert bad["public_key"] not in {p["public_key"] for p in device(w.alice, w.alice_if)["peers"]}
    out = w.alice.innernet("lock", "forget", w.alice_if, "--yes", check=False)
    assert out.returncode == 2 and "invalid choice: 'forget'" in out.stderr, out.stderr
    lie(w, w.alice, w.alice_if, w.honest)


def test_a_stolen_invitation_cannot_enroll_another_key_at_an_enrolled_address(w):
    """The outside review's attack: the hijacker kept a copy of alice's
    invitation, re-enrolls its own key at her address with it (the server's
    enrollment row replaced, the key swapped) and tells the admin's host,
    whose data store (its pins) is gone -- as a new joiner's is. Under lock it
    is refused: the admin's signing after alice joined named her enrolled
    key, and the older record naming the invitation's key, replayed, is an
    older signed record; even with this host's lock memory wiped too (a
    client that never saw alice's enrollment), the current record names her
    key. zed, without lock, takes the attacker's key."""
    I = _innernet()
    auth = I.InterfaceConfig.from_toml(w.alice_invite, "alice").lock["key"]
    net = I.LockChain(w.honest["lock"]["chain"]).net
    evil = I.public_key(I.generate_private_key())

    def reenroll(s, replay=False):
        if "lock" in s:
            full_form(s)        # so the lie costs the other records nothing
        peer_of(s, "alice")["public_key"] = evil
        if "lock" in s:
            s["lock"].setdefault("enroll", {})[ALICE_IP] = I.sign_enrollment(
                net, ALICE_IP, evil, auth)
            if replay:
                s["lock"]["records"] = [r for r in s["lock"]["records"]
                                        if r.get("ip") != ALICE_IP] + [w.alice_auth[0]]
                s["lock"]["batches"].append(w.alice_auth[1])
        return s
    lock_file = w.admin.path("client", "lib", f"{w.admin_if}.lock.json")
    kept = json.load(open(lock_file))
    try:
        # the admin's host syncs once honestly: it verifies alice's record
        first = lie(w, w.admin, w.admin_if, w.honest)
        kept = json.load(open(lock_file))
        # A lock memory wiped but pins kept: the old record replayed with the
        # new enrollment passes lock (an invitation is a bearer credential
        # until its expiry) and meets the pin: one line, the rest applied.
        stored = json.load(open(w.admin.path("client", "lib", f"{w.admin_if}.json")))
        assert ALICE_IP in [p["ip"] for p in stored["peers"]], (first.stderr, stored)
        I.save_client_lock(lock_file, {"chain": kept["chain"]})
        out = lie(w, w.admin, w.admin_if, reenroll(copy.deepcopy(w.honest), True))
        line = [ln for ln in out.stderr.splitlines() if "peer 'alice'" in ln]
        assert len(line) == 1 and "PINNING ERROR: refused" in line[0], out.stderr
        held = {p["public_key"] for p in device(w.admin, w.admin_if)["peers"]}
        assert evil not in held and w.keys["bob"] in held
        status = w.admin.innernet("lock", "status", w.admin_if).stdout
        assert "1 record(s) refused at the last sync" in status, status
        assert "PINNING ERROR: refused peer 'alice'" in w.admin.innernet("show",
                                                                       w.admin_if).stdout
        I.save_client_lock(lock_file, kept)
        for replay, wipe in ((True, False), (False, False), (False, True)):
            I.save_data_store(w.admin.path("client", "lib", f"{w.admin_if}.json"), [], [])
            if wipe:
                I.save_client_lock(lock_file, {"chain": kept["chain"]})
            state = reenroll(copy.deepcopy(w.honest), replay)
            out = lie(w, w.admin, w.admin_if, state)
            line = [ln for ln in out.stderr.splitlines() if "lock refused peer 'alice'" in ln]
            assert len(line) == 1, out.stderr
            assert ("older signed record" if replay else "key is not the signed one") \
                in line[0], line
            held = {p["public_key"] for p in device(w.admin, w.admin_if)["peers"]}
            assert evil not in held
        forget_pins(w)                          # zed pinned alice's real key
        zed = lie(w, w.zed, w.zed_if, reenroll({k: v for k, v in copy.deepcopy(
            w.honest_zed).items() if k != "lock"}))
        assert zed.returncode == 0
        assert evil in {p["public_key"] for p in device(w.zed, w.zed_if)["peers"]}
    finally:
        I.save_client_lock(lock_file, kept)
        I.save_data_store(w.admin.path("client", "lib", f"{w.admin_if}.json"), [], [])
        forget_pins(w)
        lie(w, w.admin, w.admin_if, w.honest)
        both(w, lambda s: s)


def _server_private(w):
    """The server's WireGuard private key, as its hijacker reads it."""
    import re
    for d, _, files in os.walk(w.srv.path("server")):
        if f"{w.net}.conf" in files:
            text = open(os.path.join(d, f"{w.net}.conf")).read()
            return re.search(r'private-key\s*=\s*"([^"]+)"', text).group(1)
    raise AssertionError("no server config")


def test_a_client_without_lock_takes_no_fake_lock_from_the_server_or_a_new_admin(w):
    """Issue 32, F1: zed joined before the lock and never took it. A hijacked
    server writes a lock of its own (its own lock key), proves it to zed
    with its own WireGuard key (the server's record is an admin's) -- then
    with a new admin peer of its making, which zed pins (it still believes
    the server) and is told of at two fetches. zed takes neither: only an
    admin it had pinned before it first saw a lock counts, never the server."""
    I = _innernet()
    zed_key = I.public_key(open(w.zed.path("client", "etc", f"{w.zed_if}.conf")).read()
                           .split('private-key = "')[1].split('"')[0])
    evil_lock = I.lock_keypair()[0]
    genesis = I.lock_genesis(w.net, [(I.lock_public(evil_lock), "evil")], "s", evil_lock,
                             1_700_000_000)
    g_hash = I.LockChain([genesis]).genesis
    lock_path = w.zed.path("client", "lib", f"{w.zed_if}.lock.json")
    evil_wg = I.generate_private_key()
    evil = mallory(w, ip="10.66.1.77", name="evil", is_admin=True,
                   public_key=I.public_key(evil_wg))
    lies = [(SERVER_IP, w.server_key, I.adoption_proof(_server_private(w), g_hash, zed_key),
             "the proof is the server's own")] + \
        [("10.66.1.77", evil["public_key"], I.adoption_proof(evil_wg, g_hash, zed_key),
          "was not pinned here before the lock was first seen")] * 2
    try:
        for ip, key, mac, why in lies:
            state = copy.deepcopy(w.honest_zed)
            for p in state["peers"]:
                p["is_admin"] = p["is_admin"] or p["ip"] == SERVER_IP
            state["peers"].append(evil)
            state["lock"] = {"chain": [genesis], "batches": [], "records": []}
            w.hostile.script({"GET /v1/user/state": {"body": state},
                              "GET /v1/user/capabilities": {"body": {"dns": f"{w.net}.wg"}},
                              "GET /v1/user/lock-adoption": {"body": {
                                  "admin_ip": ip, "admin_key": key, "mac": mac}}})
            out = w.zed.innernet("fetch", w.zed_if, "--no-write-hosts", check=False)
            assert out.returncode == 0, out.stderr
            assert "network lock taken" not in out.stderr and why in out.stderr, out.stderr
            assert not os.path.exists(lock_path)
    finally:
        forget_pins(w)
        both(w, lambda s: s)


def test_a_lock_copy_lost_ends_the_fast_path_so_a_304_cannot_hide_it(w):
    """Outside round 29, T29-2: alice's lock copy lost (a host restored
    without it), cron's fast path, which did not look at the lock files,
    kept answering from the server's 304 and wrote "healthy": the host
    unlocked, unsaid, for as long as the state did not change. The lock
    files are now among what the fast path finds unchanged or leaves to the
    full sync, which asks for the whole state (no ETag): a server's 304 to
    that is an error, and `status` says so."""
    lock_path = w.alice.path("client", "lib", f"{w.alice_if}.lock.json")
    record = w.alice.path("client", "lib", f"{w.alice_if}.fetch")
    argv = ("fetch", w.alice_if, "--no-write-hosts", "--no-nat-traversal")   # no path work due
    w.hostile.script({"GET /v1/user/state": {"body": w.honest},
                      "GET /v1/user/capabilities": {"body": {"dns": f"{w.net}.wg"}}})
    w.alice.innernet(*argv)
    kept = open(lock_path).read()
    try:
        w.hostile.script({"GET /v1/user/state": {"status": 304}})     # "unchanged", always
        before = os.stat(record).st_ino
        assert w.alice.innernet(*argv).returncode == 0
        assert os.stat(record).st_ino == before                       # the fast path took it
        os.unlink(lock_path)
        out = w.alice.innernet(*argv, check=False)
        assert out.returncode == 1 and "304" in out.stderr, out.stderr
        r = w.alice.innernet("status", w.alice_if, check=False)
        assert r.returncode == 1 and "NOT HEALTHY" in r.stdout, r.stdout
    finally:
        with open(lock_path, "w") as f:
            f.write(kept)
        os.chmod(lock_path, 0o600)
        both(w, lambda s: s)


def test_a_host_that_has_seen_a_lock_is_not_healthy_when_the_server_shows_none(w):
    """Outside round 29, T29-5: zed saw the lock (it keeps the admins it
    would take it from) and holds no copy; a hijacked server that then
    shows no lock at all had zed take the state as an unlocked network's,
    `status` healthy. An honest server never drops its chain (`lock
    disable` extends it): zed now says so, and `status` keeps it a problem.
    (zed still applies the state, as it trusts the server until it takes
    a lock: README, Backup and restore.)"""
    assert os.path.exists(w.zed.path("client", "lib", f"{w.zed_if}.lock-seen.json"))
    state = copy.deepcopy(w.honest_zed)
    state.pop("lock", None)
    for _ in range(2):                       # the second: the same state again
        out = lie(w, w.zed, w.zed_if, state)
        assert "holds no copy of it, and the server shows none" in out.stderr, out.stderr
        r = w.zed.innernet("status", w.zed_if, check=False)
        assert r.returncode == 1 and "the server shows none" in r.stdout, r.stdout


def _lib(host, iface, ext):
    return host.path("client", "lib", f"{iface}{ext}")


def test_a_host_takes_no_chain_older_than_the_one_it_had_seen_even_with_its_copy(w):
    """Outside round 31, V31-1: alice's lock copy put back from a backup older
    than what she had verified (README, Backup and restore), and a hijacked
    server showing the chain as it was then (before a `lock remove` of a
    stolen key): it extends the copy, so she verified under it, trusting the
    removed key again, healthy. Her syncs now verify under no chain that
    does not reach the one her lock-seen file says she had verified."""
    I = _innernet()
    seen = _lib(w.alice, w.alice_if, ".lock-seen.json")
    kept = open(seen).read()
    chain = I.load_client_lock(_lib(w.alice, w.alice_if, ".lock.json"))["chain"]
    trusted = I.read_lock_key(w.admin.path("client", "etc", f"{w.admin_if}.lock-key"), True)
    later = chain + [I.lock_update(I.LockChain(chain), "add", I.lock_keypair()[1], "later",
                                   trusted, int(time.time()))]
    with open(seen, "w") as f:            # she had verified one entry more than her copy
        json.dump(dict(json.loads(kept), reached=[len(later), I.LockChain(later).head]), f)
    try:
        out = lie(w, w.alice, w.alice_if, copy.deepcopy(w.honest), code=1)
        assert "older than the one this host had seen (rolled back?)" in out.stderr, out.stderr
        r = w.alice.innernet("status", w.alice_if, check=False)
        assert r.returncode == 1 and "rolled back?" in r.stdout, r.stdout
    finally:
        with open(seen, "w") as f:
            f.write(kept)
        both(w, lambda s: s)


def test_lock_init_is_refused_on_a_host_that_has_seen_the_lock_the_server_hides(w):
    """Outside round 31, V31-3: an admin's host that lost its lock copy, and a
    hijacked server showing no lock at all: `lock init` made a new genesis
    and signed the server's whole network (peers it had made with removed
    keys among them). A host that has seen the lock now refuses."""
    own = _lib(w.admin, w.admin_if, ".lock.json")
    assert os.path.exists(_lib(w.admin, w.admin_if, ".lock-seen.json"))
    os.rename(own, own + ".away")
    I = _innernet()
    store = I.Store(w.db)
    try:
        listed = {f"GET /v1/admin/{what}": {"body": [x.to_json() for x in rows]}
                  for what, rows in (("cidrs", store.cidrs()), ("peers", store.peers()),
                                     ("associations", store.associations()))}
        listed["GET /v1/admin/deleted-peers"] = {"body": []}
    finally:
        store.close()
    w.hostile.script({"GET /v1/admin/lock": {"body": {}},      # innernet.py's, unlocked
                      "GET /v1/user/capabilities": {"body": {"routes": True}}, **listed})
    before = len(w.hostile.requests())
    try:
        out = w.admin.innernet("lock", "init", w.admin_if, "--yes", check=False)
        assert out.returncode == 1 and "the server shows none (hiding it?)" in out.stderr, \
            out.stderr
        # nor any other admin verb (outside round 32, X32-3: add-peer made an
        # invitation with no lock, whose peer joined unlocked)
        path = w.admin.path("hidden.toml")
        out = w.admin.innernet("add-peer", w.admin_if, "--name", "hidden", "--cidr", "humans",
                               "--auto-ip", "--admin", "false", "--invite-expires", "1h",
                               "--save-config", path, "--yes", check=False)
        assert out.returncode == 1 and "the server shows none (hiding it?)" in out.stderr, \
            out.stderr
        assert not os.path.exists(path)
        assert not [r for r in w.hostile.requests()[before:] if r[0] != "GET"]
    finally:
        os.rename(own + ".away", own)
