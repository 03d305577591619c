"""Subnet routes and exit nodes: validation, overlap, approval, who gets them
(issue 14, acceptance item 4), on a real SQLite file through the API logic."""
import ipaddress
import json
import sqlite3

import pytest

import innernet
from innernet import EXIT_ROUTES, InnernetError, Peer
from helpers import IPS, call, cli_network, make_coordinator

ROUTE_ERRORS = {
    "192.168.10.1/24": "has host bits set (did you mean 192.168.10.0/24?)",
    "192.168.10.0": "needs a prefix length",
    "0.0.0.0/0": "is a default route: offer the peer as an exit node",
    "::/0": "is a default route",
    "127.0.0.0/8": "not routable",
    "169.254.1.0/24": "not routable",
    "224.1.0.0/16": "not routable",
    "fe80::/64": "not routable",
    "banana": "is not a network",
    "10.0.0.0/33": "is not a network",
    "": "is not a network",
}


@pytest.mark.parametrize("text,why", ROUTE_ERRORS.items())
def test_bad_routes_are_refused_with_the_reason(text, why):
    with pytest.raises(InnernetError) as e:
        innernet.parse_route(text)
    assert why in e.value.message and e.value.status == 400


def test_routes_are_canonical_and_default_routes_only_as_the_exit_offer():
    assert innernet.parse_route(" 192.168.10.0/24 ") == "192.168.10.0/24"
    assert innernet.parse_route("fd00:0:0:1::/64") == "fd00:0:0:1::/64"
    assert innernet.parse_route("0.0.0.0/0", exit_routes=True) == "0.0.0.0/0"
    assert innernet.parse_routes(["10.9.0.0/16", "10.9.0.0/16"]) == ["10.9.0.0/16"]
    with pytest.raises(InnernetError):
        innernet.parse_routes("10.9.0.0/16")            # not a list
    with pytest.raises(InnernetError):
        innernet.parse_routes([f"172.16.{i}.0/24" for i in range(200)])


def peer(pid, name, cidr_id, routes=(), pending=(), exit_node=False):
    return Peer(pid, name, f"10.80.{cidr_id}.{pid}", cidr_id, f"k{pid}", is_redeemed=True,
                routes=list(routes), pending_routes=list(pending), exit_node=exit_node)


CIDRS = [innernet.Cidr(1, "net", "10.80.0.0/15", None),
         innernet.Cidr(2, "innernet-server", "10.80.0.1/32", 1),
         innernet.Cidr(3, "office", "10.80.1.0/24", 1),
         innernet.Cidr(4, "home", "10.80.64.0/24", 1),
         innernet.Cidr(5, "lab", "10.80.65.0/24", 4)]


def test_overlaps_name_both_owners_and_the_network_range():
    gw = peer(1, "gw", 3, routes=["192.168.0.0/16"])
    gw2 = peer(2, "gw2", 3, pending=["172.16.0.0/12"])
    other = peer(3, "alice", 4)
    for route, theirs, owner in (("192.168.10.0/24", "192.168.0.0/16", "gw"),
                                 ("128.0.0.0/1", "192.168.0.0/16", "gw")):
        with pytest.raises(InnernetError) as e:
            innernet.check_routes([gw, gw2, other], CIDRS, other, [route])
        assert e.value.message == (f"route {route} of peer 'alice' overlaps route {theirs} "
                                   f"of peer '{owner}'")
    # gw2's route waits for approval: it reserves nothing (issue 28.7)
    innernet.check_routes([gw, gw2, other], CIDRS, other, ["172.16.5.0/24"])
    with pytest.raises(InnernetError) as e:
        innernet.check_routes([gw], CIDRS, other, ["10.80.64.0/24"])
    assert "overlaps the network's own range 10.80.0.0/15" in e.value.message
    # A peer may re-advertise its own routes; default routes (exit offers) never clash;
    # other families do not overlap.
    innernet.check_routes([gw, gw2], CIDRS, gw, ["192.168.0.0/16", "192.168.1.0/24"])
    innernet.check_routes([peer(4, "x1", 3, routes=[]), peer(5, "x2", 3, exit_node=True)],
                          CIDRS, other, list(EXIT_ROUTES))
    innernet.check_routes([gw], CIDRS, other, ["fd00::/8"])


def test_auto_approval_covers_routes_inside_the_rule_from_the_cidr_or_below():
    rules = [innernet.RouteApprover(1, "192.168.0.0/16", 4),
             innernet.RouteApprover(2, "0.0.0.0/0", 3)]
    home, lab, office = peer(1, "a", 4), peer(2, "b", 5), peer(3, "c", 3)
    assert innernet.auto_approved("192.168.10.0/24", home, CIDRS, rules)
    assert innernet.auto_approved("192.168.10.0/24", lab, CIDRS, rules)     # a child CIDR
    assert not innernet.auto_approved("172.16.0.0/12", home, CIDRS, rules)
    assert not innernet.auto_approved("192.0.0.0/8", home, CIDRS, rules)    # wider than the rule
    assert innernet.auto_approved("0.0.0.0/0", office, CIDRS, rules)        # its exit node too
    assert not innernet.auto_approved("::/0", office, CIDRS, rules)


def test_a_new_rule_is_sent_without_an_id_and_read_back():
    """An admin peer's `approve-routes --auto-approve` posts a rule with no id
    yet: it went as "id": null, which the server refused (400, field 'id')."""
    rule = innernet.RouteApprover(None, "192.168.0.0/16", 4)
    assert "id" not in rule.to_json()
    assert innernet.RouteApprover.from_json(rule.to_json()) == rule
    assert innernet.RouteApprover(7, "192.168.0.0/16", 4).to_json()["id"] == 7


def visible_routes(peers, cidrs, associations, me):
    """(route, owner) pairs ``me`` gets: what the state (the peers in its view) carries."""
    view = innernet.visible_cidr_ids(cidrs, associations, me.cidr_id)
    return [(r, p) for p in innernet.peers_in_view(peers, view)
            if p.id != me.id for r in p.routes]


def test_routes_go_only_to_peers_that_may_see_the_advertiser():
    gw = peer(1, "gw", 3, routes=["192.168.10.0/24"], exit_node=True)
    alice, lab, bob = peer(2, "alice", 4), peer(3, "labby", 5), peer(4, "bob", 3)
    assocs = [innernet.Association(1, 3, 5)]      # office <-> lab only
    peers = [gw, alice, lab, bob]
    assert [(r, p.name) for r, p in visible_routes(peers, CIDRS, assocs, lab)] == \
        [("192.168.10.0/24", "gw")]
    assert [r for r, _ in visible_routes(peers, CIDRS, assocs, bob)] == \
        ["192.168.10.0/24"]
    assert visible_routes(peers, CIDRS, assocs, alice) == []   # home is not associated
    assert visible_routes(peers, CIDRS, assocs, gw) == []      # not its own


def test_a_client_routes_approved_subnets_but_not_its_lan_and_exit_only_when_chosen():
    cfg = type("Cfg", (), {"peer_endpoint_overrides": {}, "server_public_key": "srv",
                           "server_ip": "10.80.0.1",
                           "server_external_endpoint": "1.2.3.4:51820"})()
    gw = peer(1, "gw", 3, routes=["192.168.10.0/24", "10.200.0.0/16"])
    ex = peer(2, "ex", 3, exit_node=True)
    me = peer(3, "me", 4)
    local = [ipaddress.ip_network("10.200.5.0/24")]            # this host is on that LAN
    assert innernet.interface_routes([gw, ex, me], "k3", local) == \
        [ipaddress.ip_network("192.168.10.0/24")]
    desired = innernet.desired_peers(cfg, [gw, ex, me], exit_key="k2")
    assert [p.routes for p in desired] == [gw.routes, list(EXIT_ROUTES), [], []]
    assert innernet.interface_routes(desired, "k3") == [ipaddress.ip_network(r)
                                                        for r in gw.routes]   # no default here
    plain = innernet.desired_peers(cfg, [gw, ex, me], accept_routes=False)
    assert [p.routes for p in plain] == [[], [], [], []]
    updates = innernet.diff_peers([], desired, "k3", 0, resolve=lambda e: e)
    allowed = {u.public_key: u.allowed_ips for u in updates}
    assert allowed == {"k1": ["10.80.3.1/32", "192.168.10.0/24", "10.200.0.0/16"],
                       "k2": ["10.80.3.2/32", "0.0.0.0/0", "::/0"],
                       "srv": ["10.80.0.1/32"]}      # the server's, from the config


def test_choosing_an_exit_node_needs_a_visible_approved_offer():
    ex, plain = peer(1, "ex", 3, exit_node=True), peer(2, "plain", 3)
    assert innernet.choose_exit_node([ex, plain], "ex", "k9") == (ex, None)
    assert "does not offer an approved exit node" in \
        innernet.choose_exit_node([ex, plain], "plain", "k9")[1]
    assert "is visible to this peer" in innernet.choose_exit_node([plain], "ex", "k9")[1]
    assert "is visible" in innernet.choose_exit_node([ex], "ex", "k1")[1]   # not itself
    # Once chosen, the exit node is the peer at its address (pinned to its key):
    # the name given to another peer changes nothing (issue 28).
    thief = peer(7, "ex", 3, exit_node=True)
    renamed = innernet.replaced(ex, name="old")
    assert innernet.choose_exit_node([thief, renamed], "ex", "k9", ip=ex.ip) == (renamed, None)
    assert "to choose again, run 'up' without --exit-node" in \
        innernet.choose_exit_node([thief], "ex", "k9", ip=ex.ip)[1]


def test_exit_rules_follow_wg_quick():
    rules = innernet.exit_rules(51820, allow_lan=False, families=(4,))
    assert [str(r) for r in rules] == [
        "ip -4 rule add priority 5209 not fwmark 0xca6c lookup 51820"]
    rules = innernet.exit_rules(51821, allow_lan=True)
    assert [str(r) for r in rules] == [
        "ip -4 rule add priority 5208 lookup main suppress_prefixlength 0",
        "ip -4 rule add priority 5209 not fwmark 0xca6d lookup 51821",
        "ip -6 rule add priority 5208 lookup main suppress_prefixlength 0",
        "ip -6 rule add priority 5209 not fwmark 0xca6d lookup 51821"]
    # What the kernel answers to a dump reads back as the same rules.
    for r in rules:
        kind, flags, body = innernet.rtnl_request("add-rule", 0, rule=r)
        assert innernet.parse_rule_message(body) == r


def test_route_messages_round_trip():
    for net, table in (("192.168.10.0/24", None), ("0.0.0.0/0", 51820), ("fd00::/8", None)):
        _, _, body = innernet.rtnl_request("add-route", 7, route=ipaddress.ip_network(net),
                                           table=table, protocol=innernet.RTPROT_INNERNET)
        assert innernet.parse_route_message(body) == (
            ipaddress.ip_network(net), 7, table or 254, innernet.RTPROT_INNERNET)


# -- the store and the API -----------------------------------------------------------

@pytest.fixture
def co(tmp_path):
    return make_coordinator(tmp_path)


def state_of(co, who):
    status, body = call(co, "GET", "/v1/user/state", who)
    assert status == 200
    return {p["name"]: p for p in body["peers"]}


def test_advertise_approve_and_the_state_carries_only_approved_routes(co):
    status, me = call(co, "POST", "/v1/user/routes", "developer1",
                      body={"routes": ["192.168.10.0/24"]})
    assert status == 200 and me["pending_routes"] == ["192.168.10.0/24"] and "routes" not in me
    seen = state_of(co, "developer2")["developer1"]
    assert "routes" not in seen and "pending_routes" not in seen      # not approved: nothing
    pid = me["id"]
    status, me = call(co, "PUT", f"/v1/admin/routes/{pid}", body={"routes": None})
    assert status == 200 and me["routes"] == ["192.168.10.0/24"]
    assert state_of(co, "developer2")["developer1"]["routes"] == ["192.168.10.0/24"]
    # user1 (CIDR 'user', not associated with 'developer') does not see developer1 at all.
    assert "developer1" not in state_of(co, "user1")
    # Re-advertising keeps approvals; a new route waits; the exit offer is separate.
    status, me = call(co, "POST", "/v1/user/routes", "developer1",
                      body={"routes": ["192.168.10.0/24", "192.168.11.0/24"]})
    assert me["routes"] == ["192.168.10.0/24"] and me["pending_routes"] == ["192.168.11.0/24"]
    status, me = call(co, "POST", "/v1/user/routes", "developer1", body={"exit_node": True})
    assert me["routes"] == ["192.168.10.0/24"]
    assert set(me["pending_routes"]) == {"192.168.11.0/24", "0.0.0.0/0", "::/0"}
    status, me = call(co, "PUT", f"/v1/admin/routes/{pid}", body={"routes": ["0.0.0.0/0"]})
    assert me["exit_node"] is True and me["pending_routes"] == ["192.168.11.0/24"]
    # Revoked: gone from the state at once.
    call(co, "PUT", f"/v1/admin/routes/{pid}", body={"routes": None, "approved": False})
    assert "routes" not in state_of(co, "developer2")["developer1"]
    # Approving what it does not advertise is a 400 naming the route.
    status, body = call(co, "PUT", f"/v1/admin/routes/{pid}", body={"routes": ["10.1.0.0/16"]})
    assert status == 400 and "does not advertise 10.1.0.0/16" in body["error"]


def test_pending_routes_reserve_nothing_and_approval_checks_overlap(co):
    """Issue 28.7: a route waiting for approval reserves no range; approving
    checks overlap then, naming both owners to the admin."""
    status, dev1 = call(co, "POST", "/v1/user/routes", "developer1",
                        body={"routes": ["192.168.0.0/16"]})
    assert status == 200 and dev1["pending_routes"] == ["192.168.0.0/16"]
    status, dev2 = call(co, "POST", "/v1/user/routes", "developer2",
                        body={"routes": ["192.168.10.0/24"]})
    assert status == 200 and dev2["pending_routes"] == ["192.168.10.0/24"]
    status, user1 = call(co, "POST", "/v1/user/routes", "user1",
                         body={"routes": ["192.168.20.0/24"]})
    assert status == 200 and user1["pending_routes"] == ["192.168.20.0/24"]
    assert call(co, "PUT", f"/v1/admin/routes/{dev1['id']}", body={"routes": None})[0] == 200
    for other, route in ((dev2, "192.168.10.0/24"), (user1, "192.168.20.0/24")):
        status, body = call(co, "PUT", f"/v1/admin/routes/{other['id']}", body={"routes": None})
        assert status == 400 and body["error"] == (
            f"route {route} of peer '{other['name']}' overlaps route 192.168.0.0/16 of "
            "peer 'developer1'")
    assert "192.168.20.0/24" in co.store.peer(user1["id"]).pending_routes
    # An auto-approve rule leaves a route that would overlap an approved one waiting.
    assert call(co, "POST", "/v1/admin/route-approvers",
                body={"route": "192.168.0.0/16", "cidr_id": 5})[0] == 201
    assert co.store.peer(user1["id"]).pending_routes == ["192.168.20.0/24"]


def test_overlap_between_peers_is_a_400_naming_both_only_to_who_may_see_them(co):
    status, dev1 = call(co, "POST", "/v1/user/routes", "developer1",
                        body={"routes": ["192.168.0.0/16"]})
    call(co, "PUT", f"/v1/admin/routes/{dev1['id']}", body={"routes": None})
    status, body = call(co, "POST", "/v1/user/routes", "developer2",
                        body={"routes": ["192.168.10.0/24"]})
    assert status == 400
    assert body["error"] == ("route 192.168.10.0/24 of peer 'developer2' overlaps route "
                             "192.168.0.0/16 of peer 'developer1'")
    # user1 may not see developer1: its overlapping route waits, and the answer
    # is the one a free range gets (issue 28.5)
    _, free = call(co, "POST", "/v1/user/routes", "user1", body={"routes": ["172.20.0.0/24"]})
    status, body = call(co, "POST", "/v1/user/routes", "user1",
                        body={"routes": ["192.168.10.0/24"]})
    assert status == 200 and body == dict(free, pending_routes=["192.168.10.0/24"])
    assert "developer1" not in json.dumps(body)
    status, body = call(co, "POST", "/v1/user/routes", "user1", body={"routes": ["10.80.9.0/24"]})
    assert status == 400 and "the network's own range" in body["error"]
    # The server routes for nobody.
    with pytest.raises(InnernetError):
        co.store.advertise_routes(1, ["172.16.0.0/12"], False)


def test_auto_approve_rules_approve_new_and_waiting_routes(co):
    call(co, "POST", "/v1/user/routes", "developer1", body={"routes": ["192.168.10.0/24"]})
    status, rule = call(co, "POST", "/v1/admin/route-approvers",
                        body={"route": "192.168.0.0/16", "cidr_id": 4})
    assert status == 201
    assert state_of(co, "developer2")["developer1"]["routes"] == ["192.168.10.0/24"]
    status, me = call(co, "POST", "/v1/user/routes", "developer2",
                      body={"routes": ["192.168.20.0/24", "172.16.0.0/16"]})
    assert me["routes"] == ["192.168.20.0/24"] and me["pending_routes"] == ["172.16.0.0/16"]
    assert call(co, "GET", "/v1/admin/route-approvers")[1] == [rule]
    assert call(co, "DELETE", f"/v1/admin/route-approvers/{rule['id']}")[0] == 204
    assert call(co, "GET", "/v1/admin/route-approvers")[1] == []
    status, body = call(co, "POST", "/v1/admin/route-approvers",
                        body={"route": "192.168.0.0/16", "cidr_id": 99})
    assert status == 400 and "does not exist" in body["error"]


def test_admins_set_routes_at_invitation_approved(co):
    body = {"name": "router", "ip": "10.80.64.40", "cidr_id": 4, "endpoint": None,
            "public_key": innernet.public_key(innernet.generate_private_key()),
            "persistent_keepalive_interval": None, "is_admin": False, "is_disabled": False,
            "is_redeemed": False, "invite_expires": None, "candidates": [],
            "routes": ["192.168.50.0/24"]}
    status, made = call(co, "POST", "/v1/admin/peers", body=body)
    assert status == 201 and made["routes"] == ["192.168.50.0/24"]
    body.update(name="router2", ip="10.80.64.41", routes=["192.168.50.128/25"],
                public_key=innernet.public_key(innernet.generate_private_key()))
    status, err = call(co, "POST", "/v1/admin/peers", body=body)
    assert status == 400 and "of peer 'router'" in err["error"]


def test_deleting_a_peer_deletes_its_routes(co):
    call(co, "POST", "/v1/user/routes", "developer1", body={"routes": ["192.168.10.0/24"]})
    pid = co.store.peer_by_name("developer1").id
    co.store.delete_peer(pid, 0)
    assert co.store.conn.execute("SELECT COUNT(*) FROM peer_routes").fetchone()[0] == 0
    assert call(co, "POST", "/v1/user/routes", "developer2",
                body={"routes": ["192.168.10.0/24"]})[0] == 200


def test_innernet_databases_get_the_new_tables_and_innernet_clients_see_no_new_fields(tmp_path):
    path = str(tmp_path / "innernet.db")
    db = sqlite3.connect(path)
    db.executescript(innernet.SCHEMA + "PRAGMA user_version = 2;")
    db.execute("INSERT INTO cidrs (name, ip, prefix) VALUES ('n', '10.9.0.0', 16)")
    db.commit()
    db.close()
    store = innernet.Store(path)
    tables = {r[0] for r in store.conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"peer_routes", "route_approvers"} <= tables
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == 2   # innernet's own
    # A peer without routes is innernet's JSON exactly: no new keys.
    assert set(Peer(1, "a", "10.9.0.2", 1, "k").to_json()) == {
        "id", "name", "ip", "cidr_id", "public_key", "endpoint", "persistent_keepalive_interval",
        "is_admin", "is_disabled", "is_redeemed", "invite_expires", "candidates"}


def test_capabilities_name_the_zone_and_routes(co):
    assert call(co, "GET", "/v1/user/capabilities", "developer1")[1]["routes"] is True
    assert call(co, "GET", "/v1/user/capabilities", "developer1")[1]["dns"] is None
    co.views.dns_zone_name = "test.wg"
    assert call(co, "GET", "/v1/user/capabilities", "developer1")[1]["dns"] == "test.wg"


def test_ips_fixture_is_what_the_tests_assume():
    assert IPS["developer1"] == "10.80.64.2"


def test_server_cli_routes_verbs(tmp_path, capsys):
    base = cli_network(tmp_path, capsys)
    run = lambda *a: innernet.main(base + list(a))
    assert run("add-peer", "evil", "--name", "gw", "--cidr", "h", "--auto-ip", "--admin",
               "false", "--invite-expires", "1h", "--routes", "192.168.10.0/24,192.168.11.0/24",
               "--save-config",
               str(tmp_path / "gw.toml"), "--yes") == 0
    assert run("add-peer", "evil", "--name", "gw2", "--cidr", "h", "--auto-ip", "--admin",
               "false", "--invite-expires", "1h", "--routes", "192.168.10.0/25", "--save-config",
               str(tmp_path / "gw2.toml"), "--yes") == 1
    err = capsys.readouterr().err
    assert "innernet: error: route 192.168.10.0/25 of peer 'gw2' overlaps route " \
           "192.168.10.0/24 of peer 'gw'" in err
    assert not (tmp_path / "gw2.toml").exists()          # nothing half-made
    assert run("add-peer", "evil", "--name", "gw3", "--cidr", "h", "--auto-ip", "--admin",
               "false", "--invite-expires", "1h", "--routes", "192.168.20.1/24", "--yes") == 1
    assert "did you mean 192.168.20.0/24?" in capsys.readouterr().err
    assert run("list-routes", "evil", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["peer"], r["route"], r["approved"]) for r in listed["routes"]] == [
        ("gw", "192.168.10.0/24", True), ("gw", "192.168.11.0/24", True)]
    assert run("approve-routes", "evil", "--name", "gw", "--routes", "192.168.11.0/24",
               "--revoke", "--yes") == 0
    assert "gw: 192.168.11.0/24 waiting for approval" in capsys.readouterr().err
    assert run("approve-routes", "evil", "--auto-approve", "192.168.0.0/16", "--cidr", "h",
               "--yes") == 0
    assert run("list-routes", "evil") == 0
    out = capsys.readouterr().out
    assert "gw (10.66.1.1): 192.168.11.0/24 approved" in out      # covered by the new rule
    assert "auto-approve: routes in 192.168.0.0/16 from peers in 'h'" in out
    assert run("approve-routes", "evil", "--auto-approve", "192.168.0.0/16", "--cidr", "h",
               "--revoke", "--yes") == 0
    assert run("approve-routes", "evil", "--auto-approve", "192.168.0.0/16", "--yes") == 1
    assert "needs --cidr NAME" in capsys.readouterr().err
    assert run("approve-routes", "evil", "--name", "nobody", "--yes") == 1


def test_a_damaged_exit_choice_is_one_clear_error(tmp_path):
    path = str(tmp_path / "n.exit.json")
    assert innernet.load_exit_state(path) is None
    innernet.save_exit_state(path, {"exit_node": "ex", "allow_lan": False, "table": 51820})
    assert innernet.load_exit_state(path)["table"] == 51820
    assert (tmp_path / "n.exit.json").stat().st_mode & 0o777 == 0o600
    for text in ("{", "[]", '{"exit_node": "ex\\n1.2.3.4 x", "allow_lan": false, "table": 1}',
                 '{"exit_node": "ex", "allow_lan": false, "table": -1}'):
        (tmp_path / "n.exit.json").write_text(text)
        with pytest.raises(InnernetError) as e:
            innernet.load_exit_state(path)
        assert "run 'innernet down'" in e.value.hint


def test_public_routes_need_the_clients_consent():
    cfg = type("Cfg", (), {"peer_endpoint_overrides": {}, "server_public_key": "srv",
                           "server_ip": "10.80.0.1",
                           "server_external_endpoint": "1.2.3.4:51820"})()
    # What a compromised server could send to pull all traffic into one peer.
    grab = peer(1, "grab", 3, routes=["0.0.0.0/1", "128.0.0.0/1", "192.168.9.0/24"])
    assert innernet.desired_peers(cfg, [grab])[0].routes == ["192.168.9.0/24"]
    assert innernet.desired_peers(cfg, [grab], public_routes=True)[0].routes == grab.routes
    assert [innernet.route_is_private(r) for r in (
        "10.1.0.0/16", "172.31.0.0/16", "100.64.0.0/10", "fd12::/64", "8.8.8.0/24",
        "172.32.0.0/16", "2001:db8::/32")] == [True, True, True, True, False, False, False]


def test_the_client_refuses_records_that_route_what_is_not_their_own():
    """Issue 28, item 1: refuse_misrouted, the client's one check of a state."""
    net = ipaddress.ip_network("10.80.0.0/15")
    own, server = ("10.80.64.9", "kme"), ("10.80.0.1", "ksrv")
    admin = peer(1, "admin", 3)                                    # pinned 10.80.3.1 = k1
    stored = [admin, Peer(None, "me", own[0], 4, own[1])]
    ok = innernet.replaced(peer(7, "newcomer", 3, routes=["192.168.7.0/24"]),
                             candidates=["198.18.0.7:51820", "10.80.3.1:51820"])
    lies = {
        "route-pinned": peer(8, "m1", 3, routes=["10.80.3.1/32"]),
        "route-network": peer(9, "m2", 3, routes=["10.0.0.0/8"]),
        "outside": innernet.replaced(peer(10, "m3", 3), ip="192.168.1.1"),
        "own": innernet.replaced(peer(11, "m4", 3), ip=own[0]),
        "server": innernet.replaced(peer(12, "m5", 3), ip=server[0]),
        "static": innernet.replaced(admin, is_static=True),
        "endpoint": innernet.replaced(peer(13, "m6", 3), endpoint="10.80.3.1:51820"),
    }
    kept, refused = innernet.refuse_misrouted([ok] + list(lies.values()), stored, net, own,
                                              server)
    # an endpoint inside the network costs the record its endpoint, not the record
    assert [p.name for p in kept] == ["newcomer", "m6"] and kept[1].endpoint is None
    assert kept[0].candidates == ["198.18.0.7:51820"]          # the one inside is dropped
    assert len(refused) == len(lies) and all(ln.startswith("refused peer '")
                                             for ln in refused[:-1])
    assert "route 10.80.3.1/32 overlaps the network 10.80.0.0/15" in refused[0]
    assert "it claims the server's address" in refused[4]
    assert "cannot turn static" in refused[5]
    assert refused[6].startswith("kept peer 'm6'") and "10.80.3.1:51820 is inside" in refused[6]
    # Outside round 24, X24-1: with another key too (the key change refused
    # alone, the rest applied, the kept pin must not turn static either)
    kept = innernet.merge_pinned([admin], [innernet.replaced(admin, public_key="k-evil",
                                                             is_static=True)], refusals=[])
    assert kept[0].public_key == admin.public_key and not kept[0].is_static
    waits = innernet.merge_pinned([admin], [innernet.replaced(admin, public_key="k2",
                                                              is_static=True)],
                                  waiting=[(admin.ip, admin.public_key, "k2")])   # X24-4
    assert waits[0].public_key == admin.public_key and not waits[0].is_static
    # A pin outside the network (a data store older than the check) is covered too.
    old_pin = innernet.replaced(peer(20, "lan", 3), ip="192.168.5.5")
    grab = peer(21, "m7", 3, routes=["192.168.5.0/24"])
    assert "covers 192.168.5.5, pinned to peer 'lan'" in innernet.refuse_misrouted(
        [grab], stored + [old_pin], net, own, server)[1][0]
    # What the honest server sends passes whole: the same records, the server's own too.
    honest = [admin, Peer(None, "me", own[0], 4, own[1]), Peer(None, "srv", server[0], 2,
                                                               server[1])]
    assert innernet.refuse_misrouted(honest, stored, net, own, server) == (honest, [])


def test_an_exit_node_gets_the_default_routes_without_the_network():
    """Issue 28: no address inside the network goes to the exit node's key."""
    net = ipaddress.ip_network("10.66.0.0/16")
    allowed = innernet.exit_allowed_ips(net)
    assert "::/0" in allowed and "0.0.0.0/0" not in allowed
    v4 = [ipaddress.ip_network(a) for a in allowed if ":" not in a]
    assert len(v4) == 16 and not any(n.overlaps(net) for n in v4)
    assert sum(n.num_addresses for n in v4) == 2 ** 32 - net.num_addresses
    exit_peer = peer(5, "exit", 3, routes=list(EXIT_ROUTES))
    [u] = innernet.diff_peers([], [exit_peer], "me", 0.0, network=net)
    assert u.allowed_ips == ["10.80.3.5/32"] + allowed
    [u] = innernet.diff_peers([], [exit_peer], "me", 0.0)          # the server's own use
    assert u.allowed_ips == ["10.80.3.5/32", "0.0.0.0/0", "::/0"]
