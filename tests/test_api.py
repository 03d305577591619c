"""The HTTP API, against innernet's server test fixture (server/src/test.rs in
innernet's repository) and the behaviours its server tests check.

The Coordinator is driven without a WireGuard device (backend=None): these
tests cover routing, roles, validation and JSON shapes. The end-to-end tests
drive the same API over real tunnels.
"""
import http.client
import sqlite3
import json
import threading
import time

import pytest

import innernet
from innernet import Cidr, Coordinator, Peer, ServerConfig, Store
from helpers import IPS, call, key, make_coordinator, old_database, peer_contents


# -- authentication (as innernet's server tests) -------------------------------

def test_proxy_headers_never_grant_identity(co):
    for h in ("Forwarded", "X-Forwarded-For", "X-Real-IP"):
        assert call(co, "GET", "/v1/admin/peers", ip="10.99.9.9",
                    headers={h: IPS["admin"]})[0] == 401


@pytest.mark.parametrize("value", [None, "!!!", "DD5yKRfzExcV5+kDnTroDgCU15latdMjiQ59j1hEuk8="])
def test_missing_or_wrong_server_key(co, value):
    status, body = call(co, "GET", "/v1/user/state", "developer1",
                        headers={innernet.SERVER_KEY_HEADER: value})
    assert status == 401 and "error" in body


def test_unknown_ip_gets_401_and_bad_paths_404(co):
    assert call(co, "GET", "/v1/user/state", ip="10.80.64.99")[0] == 401
    assert call(co, "GET", "/v2/user/state", ip="10.80.64.99")[0] == 404
    assert call(co, "GET", "/v1/nope/state")[0] == 404
    assert call(co, "GET", "/v1/user/nothing")[0] == 404
    assert call(co, "DELETE", "/v1/admin/peers/abc")[0] == 404
    assert call(co, "PATCH", "/v1/admin/peers/3")[0] == 404
    # routes are anchored, as innernet's (review item 4): no prefix matches
    for path in ("/v1/user/state/anything", "/v1/user/state/3", "/v1/user/state/",
                 "/v1/admin/peers/x", "/v1/admin/cidrs/3/extra"):
        assert call(co, "GET", path)[0] == 404, path
    assert call(co, "PUT", "/v1/admin/peers/3/x", body={})[0] == 404
    assert call(co, "GET", "/v1/user/state")[0] == 200


# -- associations and CIDRs (as innernet's server tests) -----------------------

def test_associations(co):
    assert call(co, "POST", "/v1/admin/associations", body={"cidr_id_1": 1, "cidr_id_2": 2}) \
        == (201, None)
    assert call(co, "POST", "/v1/admin/associations", body={"cidr_id_1": 1, "cidr_id_2": 2})[0] == 400
    assert call(co, "POST", "/v1/admin/associations", body={"cidr_id_1": 2, "cidr_id_2": 1})[0] == 400
    assert call(co, "POST", "/v1/admin/associations", body={"cidr_id_1": 3, "cidr_id_2": 6})[0] == 400
    assert call(co, "POST", "/v1/admin/cidrs",
                body={"name": "experimental", "cidr": "10.81.0.0/16", "parent": 1})[0] == 201
    assert call(co, "POST", "/v1/admin/associations", body={"cidr_id_1": 3, "cidr_id_2": 6})[0] == 201
    status, assocs = call(co, "GET", "/v1/admin/associations")
    assert status == 200 and assocs == [{"id": 1, "cidr_id_1": 1, "cidr_id_2": 2},
                                        {"id": 2, "cidr_id_1": 3, "cidr_id_2": 6}]
    assert call(co, "DELETE", "/v1/admin/associations/2")[0] == 204
    assert call(co, "DELETE", "/v1/admin/associations/99")[0] == 204


def test_create_cidr(co):
    body = {"name": "experimental", "cidr": "10.81.0.0/16", "parent": 1}
    status, created = call(co, "POST", "/v1/admin/cidrs", body=body)
    assert status == 201 and {k: created[k] for k in body} == body and created["id"] == 6
    assert len(call(co, "GET", "/v1/admin/cidrs")[1]) == 6
    assert call(co, "POST", "/v1/admin/cidrs",
                body={"name": "experimental", "cidr": "10.81.0.0/17", "parent": 6})[0] == 400
    assert call(co, "POST", "/v1/admin/cidrs", "user1",
                body={"name": "x", "cidr": "10.82.0.0/16", "parent": 1})[0] == 401
    assert call(co, "POST", "/v1/admin/cidrs",
                body={"name": "sub", "cidr": "10.81.0.0/17", "parent": 1})[0] == 400
    assert call(co, "POST", "/v1/admin/cidrs",
                body={"name": "overlap", "cidr": "10.80.1.0/21", "parent": 1})[0] == 400
    assert len(call(co, "GET", "/v1/admin/cidrs")[1]) == 6


def test_delete_cidrs(co):
    call(co, "POST", "/v1/admin/cidrs", body={"name": "e", "cidr": "10.81.0.0/16", "parent": 1})
    call(co, "POST", "/v1/admin/cidrs", body={"name": "es", "cidr": "10.81.0.0/17", "parent": 6})
    assert call(co, "DELETE", "/v1/admin/cidrs/6")[0] == 400
    assert call(co, "DELETE", "/v1/admin/cidrs/7")[0] == 204
    assert call(co, "DELETE", "/v1/admin/cidrs/6")[0] == 204
    assert call(co, "DELETE", "/v1/admin/cidrs/4")[0] == 400      # holds peers
    assert call(co, "DELETE", "/v1/admin/cidrs/99")[0] == 204


def test_rename_cidr(co):
    assert call(co, "PUT", "/v1/admin/cidrs/4",
                body={"name": "devs", "cidr": "10.80.64.0/24", "parent": 1})[0] == 204
    assert co.store.cidrs()[3].name == "devs"
    assert call(co, "PUT", "/v1/admin/cidrs/4",
                body={"name": "user", "cidr": "10.80.64.0/24", "parent": 1})[0] == 400
    assert call(co, "PUT", "/v1/admin/cidrs/99",
                body={"name": "zz", "cidr": "10.80.64.0/24", "parent": 1})[0] == 404


def test_a_cidr_update_refuses_what_it_would_ignore(co):
    """Issue 28.8: a new range or parent is refused (it was ignored, with 204),
    and the root CIDR, whose name is the network's, keeps it."""
    before = co.store.cidrs()
    for body in ({"name": "devs", "cidr": "10.80.65.0/24", "parent": 1},
                 {"name": "devs", "cidr": "10.80.64.0/24", "parent": 3}):
        status, answer = call(co, "PUT", "/v1/admin/cidrs/4", body=body)
        assert status == 400 and "only a CIDR's name can change" in answer["error"]
        assert "10.80.64.0/24" in answer["error"]
    status, answer = call(co, "PUT", "/v1/admin/cidrs/1",
                          body={"name": "other", "cidr": "10.80.0.0/15", "parent": None})
    assert status == 400 and "root CIDR cannot be renamed" in answer["error"]
    assert co.store.cidrs() == before
    # what innernet's rename-cidr sends (the CIDR as it is, with a new name) still works
    assert call(co, "PUT", "/v1/admin/cidrs/4",
                body={"name": "devs", "cidr": "10.80.64.0/24", "parent": 1})[0] == 204


# -- peers (as innernet's server tests) ----------------------------------------

def test_admin_adds_peer(co):
    body = peer_contents("developer3", "10.80.64.4", 4)
    status, created = call(co, "POST", "/v1/admin/peers", body=body)
    assert status == 201
    assert {k: created[k] for k in body if k != "persistent_keepalive_interval"} == \
        {k: v for k, v in body.items() if k != "persistent_keepalive_interval"}
    assert created["id"] == 7 and len(co.store.peers()) == 7


@pytest.mark.parametrize("name,ip", [("has space", "10.80.64.4"), ("developer1", "10.80.64.4"),
                                     ("developer3", "10.80.64.2"), ("developer3", "10.80.65.4"),
                                     ("developer3", "10.80.64.0"), ("developer3", "10.80.64.255")])
def test_bad_peers_are_refused(co, name, ip):
    assert call(co, "POST", "/v1/admin/peers", body=peer_contents(name, ip, 4))[0] == 400
    assert len(co.store.peers()) == 6


def test_non_admin_cannot_use_admin_routes(co):
    for method, path, body in (("POST", "/v1/admin/peers", peer_contents("x", "10.80.64.9", 4)),
                               ("PUT", "/v1/admin/peers/3", peer_contents("x", "10.80.64.2", 4)),
                               ("GET", "/v1/admin/peers", None),
                               ("DELETE", "/v1/admin/peers/5", None)):
        assert call(co, method, path, "developer1", body=body)[0] == 401
    assert [p.name for p in co.store.peers() if not p.is_disabled] == list(IPS)


def test_admin_renames_lists_and_disables(co):
    assert call(co, "PUT", "/v1/admin/peers/3",
                body=peer_contents("dev-one", "10.80.64.2", 4, is_redeemed=True))[0] == 204
    assert co.store.peer(3).name == "dev-one"
    status, peers = call(co, "GET", "/v1/admin/peers")
    assert status == 200 and [p["name"] for p in peers] == \
        ["innernet-server", "admin", "dev-one", "developer2", "user1", "user2"]
    assert peers[2]["endpoint"] == "169.10.26.8:14720" and peers[2]["persistent_keepalive_interval"] == 25
    assert call(co, "DELETE", "/v1/admin/peers/5")[0] == 204
    assert co.store.peer(5).is_disabled and len(co.store.peers()) == 6
    assert call(co, "DELETE", "/v1/admin/peers/99")[0] == 404
    assert call(co, "GET", "/v1/user/state", "user1")[0] == 401       # disabled peer


# -- user routes (as innernet's server tests) ----------------------------------

def test_state_is_visibility_plus_all_cidrs(co):
    status, state = call(co, "GET", "/v1/user/state", "developer1")
    assert status == 200
    assert {p["name"] for p in state["peers"]} == {"developer1", "developer2", "innernet-server"}
    assert len(state["cidrs"]) == 5
    p = next(p for p in state["peers"] if p["name"] == "developer2")
    assert list(p) == ["id", "name", "ip", "cidr_id", "public_key", "endpoint",
                       "persistent_keepalive_interval", "is_admin", "is_disabled",
                       "is_redeemed", "invite_expires", "candidates"]
    assert p["endpoint"] == "169.55.140.9:5833" and p["invite_expires"] is None


def test_state_etag_and_304(co):
    hdrs = {innernet.SERVER_KEY_HEADER: co.public_key}
    first = co.handle("GET", "/v1/user/state", hdrs, IPS["developer1"])
    etag = first.headers["ETag"]
    again = co.handle("GET", "/v1/user/state", dict(hdrs, **{"If-None-Match": etag}),
                      IPS["developer1"])
    assert again.status == 304 and again.raw is None and again.body is None
    call(co, "POST", "/v1/admin/peers", body=peer_contents("developer3", "10.80.64.4", 4,
                                                           is_redeemed=True))
    changed = co.handle("GET", "/v1/user/state", dict(hdrs, **{"If-None-Match": etag}),
                        IPS["developer1"])
    assert changed.status == 200 and changed.headers["ETag"] != etag


def test_endpoint_override(co):
    set_ = {"option": "Set", "content": "1.2.3.4:51820"}
    assert call(co, "PUT", "/v1/user/endpoint", "developer1", body=set_)[0] == 204
    assert co.store.peer(3).endpoint == "1.2.3.4:51820"
    assert call(co, "PUT", "/v1/user/endpoint", "developer1", body={"option": "Unset"})[0] == 204
    assert co.store.peer(3).endpoint is None
    assert call(co, "PUT", "/v1/user/endpoint", "developer1", body="endpoint=blah")[0] == 400
    status, caps = call(co, "GET", "/v1/user/capabilities", "developer1")
    assert status == 200 and caps["unspecified_ip_in_override_endpoint"] is True


def test_candidates_and_injection(co):
    assert call(co, "PUT", "/v1/user/candidates", "developer1", body=["1.1.1.1:51820"])[0] == 204
    assert co.store.peer(3).candidates == ["1.1.1.1:51820"]
    dev1 = lambda: next(p for p in call(co, "GET", "/v1/user/state", "developer2")[1]["peers"]
                        if p["name"] == "developer1")
    assert dev1()["endpoint"] == "169.10.26.8:14720" and dev1()["candidates"] == ["1.1.1.1:51820"]
    call(co, "PUT", "/v1/user/endpoint", "developer1",
         body={"option": "Set", "content": "1.2.3.4:51820"})
    assert dev1()["endpoint"] == "1.2.3.4:51820"
    assert sorted(dev1()["candidates"]) == ["1.1.1.1:51820", "169.10.26.8:14720"]
    call(co, "PUT", "/v1/user/endpoint", "developer1",
         body={"option": "Set", "content": "0.0.0.0:40000"})
    assert dev1()["endpoint"] == "169.10.26.8:40000"
    assert call(co, "PUT", "/v1/user/candidates", "developer1",
                body=[f"1.1.1.{i}:1" for i in range(11)])[0] == 413
    assert call(co, "PUT", "/v1/user/candidates", "developer1", body=["nonsense"])[0] == 400


def test_redeem_flow(co):
    invite = innernet.generate_private_key()
    body = peer_contents("newbie", "10.80.64.9", 4, public_key=innernet.public_key(invite),
                         invite_expires={"secs_since_epoch": int(time.time()) + 100,
                                         "nanos_since_epoch": 0})
    assert call(co, "POST", "/v1/admin/peers", body=body)[0] == 201
    assert call(co, "GET", "/v1/user/state", ip="10.80.64.9")[0] == 401
    assert call(co, "POST", "/v1/user/redeem", ip="10.80.64.9",
                body={"public_key": "not-a-key"})[0] == 400
    assert call(co, "POST", "/v1/user/redeem", ip="10.80.64.9", body={"public_key": key()})[0] == 204
    assert call(co, "POST", "/v1/user/redeem", ip="10.80.64.9", body={"public_key": key()})[0] == 401
    assert call(co, "GET", "/v1/user/state", ip="10.80.64.9")[0] == 200


def test_error_paths_name_no_peer_the_caller_may_not_see(co):
    """Issue 28.5: redeem, rotation and rotation lookups answer what the
    caller may not see (another CIDR, a disabled peer) as what does not exist."""
    dev1 = co.store.peer_by_name("developer1")
    invite = innernet.generate_private_key()
    body = peer_contents("newbie", "10.80.128.9", 5, public_key=innernet.public_key(invite),
                         invite_expires={"secs_since_epoch": int(time.time()) + 100,
                                         "nanos_since_epoch": 0})
    assert call(co, "POST", "/v1/admin/peers", body=body)[0] == 201
    told = [call(co, "POST", "/v1/user/redeem", ip="10.80.128.9",
                 body={"public_key": dev1.public_key}),
            call(co, "POST", "/v1/user/rotation", "user1",
                 body={"public_key": dev1.public_key, "proofs": {}})]
    assert [status for status, _ in told] == [400, 403]
    co.store.set_disabled(co.store.peer_by_name("user2").id, True)
    nobody = call(co, "GET", "/v1/user/rotations?ip=10.80.64.99", "user1")
    for ip in (dev1.ip, IPS["user2"]):            # another CIDR's; a disabled one's
        status, answer = call(co, "GET", f"/v1/user/rotations?ip={ip}", "user1")
        assert (status, json.dumps(answer).replace(ip, "X")) == \
            (nobody[0], json.dumps(nobody[1]).replace("10.80.64.99", "X"))
        told.append((status, answer))
    for _, answer in told:
        assert "developer1" not in json.dumps(answer) and dev1.ip not in json.dumps(answer) \
            or answer["error"] == f"no visible peer has {dev1.ip}"


def test_expired_invitation(co):
    body = peer_contents("late", "10.80.64.9", 4,
                         invite_expires={"secs_since_epoch": int(time.time()) - 1,
                                         "nanos_since_epoch": 0})
    assert call(co, "POST", "/v1/admin/peers", body=body)[0] == 201
    assert call(co, "GET", "/v1/user/state", ip="10.80.64.9")[0] == 401
    assert call(co, "POST", "/v1/user/redeem", ip="10.80.64.9", body={"public_key": key()})[0] == 401


# -- bodies ----------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"{", b"\xff\xfe", b"[" * 100000, b'{"name": 5}', b"null",
                                 b'{"name":"x","cidr":"10.81.0.0/16","parent":1e999}'])
def test_bad_bodies_are_400(co, raw):
    status, body = call(co, "POST", "/v1/admin/cidrs", raw=raw)
    assert status == 400 and body["error"]


def test_body_errors_from_the_transport_are_400(co):
    hdrs = {innernet.SERVER_KEY_HEADER: co.public_key}
    resp = co.handle("POST", "/v1/admin/cidrs", hdrs, IPS["admin"], None,
                     "request body is larger than 16384 bytes")
    assert resp.status == 400 and "16384" in resp.body["error"]


# -- real HTTP on loopback ---------------------------------------------------------

def test_http_round_trip_on_loopback(tmp_path):
    server_key = innernet.generate_private_key()
    store = Store(str(tmp_path / "lo.db"), create=True)
    store.create_network("lo", innernet.parse_network("127.0.0.0/8"),
                         innernet.parse_ip("127.0.0.1"), innernet.public_key(server_key), "127.0.0.1:1")
    store.add_cidr(Cidr(None, "humans", "127.1.0.0/16", 1))
    store.add_peer(Peer(None, "me", "127.1.0.1", 3, key(), is_admin=True, is_redeemed=True))
    co = Coordinator(store, ServerConfig(server_key, 0, "127.0.0.1", 8), "lo", local_callers=True)
    httpd = innernet.make_api_server(co, "127.0.0.1", 0)
    port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5,
                                          source_address=("127.1.0.1", 0))
        hdrs = {innernet.SERVER_KEY_HEADER: co.public_key}
        for _ in range(3):                               # keep-alive: one connection
            conn.request("GET", "/v1/user/state", headers=hdrs)
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 200 and r.getheader("Content-Type") == "application/json"
            assert {p["name"] for p in body["peers"]} == {"me", "innernet-server"}
        conn.request("POST", "/v1/admin/cidrs", body=b"x" * 20000, headers=hdrs)
        r = conn.getresponse()
        assert r.status == 400 and b"16384" in r.read()
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5,
                                          source_address=("127.1.0.1", 0))
        conn.putrequest("POST", "/v1/admin/cidrs")
        conn.putheader(innernet.SERVER_KEY_HEADER, co.public_key)
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == 400 and b"Content-Length" in r.read()
        conn.close()
        # The server's own address is a local process, never a caller.
        with pytest.raises(innernet.InnernetError, match="local processes") as e:
            innernet.ApiClient(f"127.0.0.1:{port}", co.public_key).call("GET", "/admin/peers")
        assert e.value.status == 401
        # The real client (from the peer's address) against the real server:
        # 401 for the wrong server key.
        assert innernet.ApiClient(f"127.0.0.1:{port}", co.public_key,
                                  source_address=("127.1.0.1", 0)).call(
            "GET", "/user/capabilities")["unspecified_ip_in_override_endpoint"] is True
        api = innernet.ApiClient(f"127.0.0.1:{port}", key(), source_address=("127.1.0.1", 0))
        with pytest.raises(innernet.InnernetError) as e:
            api.call("GET", "/user/state")
        assert e.value.status == 401 and not e.value.unreachable
    finally:
        httpd.shutdown()
        httpd.server_close()
    api = innernet.ApiClient(f"127.0.0.1:{port}", co.public_key, timeout=2)
    with pytest.raises(innernet.InnernetError) as e:
        api.call("GET", "/user/state")
    assert e.value.unreachable


# -- the role table of §3.2 and the statuses of §3.4 -------------------------------

def add_special_peers(co):
    """An unredeemed peer, a disabled user, a disabled admin and an unredeemed admin."""
    future = {"secs_since_epoch": int(time.time()) + 600, "nanos_since_epoch": 0}
    for name, ip, extra in (("unredeemed", "10.80.64.20", {"invite_expires": future}),
                            ("disabled", "10.80.64.21", {"is_redeemed": True, "is_disabled": True}),
                            ("dis-admin", "10.80.1.21", {"is_redeemed": True, "is_disabled": True,
                                                         "is_admin": True}),
                            ("new-admin", "10.80.1.22", {"is_admin": True,
                                                         "invite_expires": future})):
        cidr = 3 if "admin" in name else 4
        assert call(co, "POST", "/v1/admin/peers", body=peer_contents(name, ip, cidr, **extra))[0] == 201
    return {"unredeemed": "10.80.64.20", "disabled": "10.80.64.21", "dis-admin": "10.80.1.21",
            "new-admin": "10.80.1.22", "user": IPS["developer1"], "admin": IPS["admin"]}


ROUTES = [  # method, path, body, minimum role
    ("GET", "/v1/user/capabilities", None, "any"),
    ("POST", "/v1/user/redeem", {"public_key": None}, "unredeemed"),
    ("GET", "/v1/user/state", None, "user"),
    ("PUT", "/v1/user/endpoint", {"option": "Unset"}, "user"),
    ("PUT", "/v1/user/candidates", [], "user"),
    ("GET", "/v1/admin/peers", None, "admin"),
    ("POST", "/v1/admin/peers", "peer", "admin"),
    ("PUT", "/v1/admin/peers/6", "peer6", "admin"),
    ("DELETE", "/v1/admin/peers/6", None, "admin"),
    ("GET", "/v1/admin/cidrs", None, "admin"),
    ("POST", "/v1/admin/cidrs", {"name": "exp", "cidr": "10.81.0.0/16", "parent": 1}, "admin"),
    ("PUT", "/v1/admin/cidrs/5", {"name": "user", "cidr": "10.80.128.0/17", "parent": 1}, "admin"),
    ("DELETE", "/v1/admin/cidrs/99", None, "admin"),
    ("GET", "/v1/admin/associations", None, "admin"),
    ("POST", "/v1/admin/associations", {"cidr_id_1": 4, "cidr_id_2": 5}, "admin"),
    ("DELETE", "/v1/admin/associations/99", None, "admin"),
    ("POST", "/v1/user/routes", {"routes": ["192.168.77.0/24"]}, "user"),
    ("GET", "/v1/user/routes", None, "user"),
    ("PUT", "/v1/admin/routes/6", {"routes": None, "approved": True}, "admin"),
    ("GET", "/v1/admin/route-approvers", None, "admin"),
    ("POST", "/v1/admin/route-approvers", {"route": "192.168.0.0/16", "cidr_id": 4}, "admin"),
    ("DELETE", "/v1/admin/route-approvers/99", None, "admin"),
    ("GET", "/v1/admin/audit", None, "admin"),
    ("POST", "/v1/admin/plan", "document", "admin"),
    ("POST", "/v1/admin/apply", "document", "admin"),
]

ALLOWED = {  # role of the route -> callers that may use it (innernet's)
    "any": {"unredeemed", "user", "admin", "new-admin"},
    "unredeemed": {"unredeemed", "new-admin"},
    "user": {"user", "admin"},
    "admin": {"admin"},
}


@pytest.mark.parametrize("method,path,body,role", ROUTES)
def test_role_table(tmp_path, method, path, body, role):
    for caller in ("unredeemed", "disabled", "dis-admin", "new-admin", "user", "admin"):
        (tmp_path / caller).mkdir()
        fresh = make_coordinator(tmp_path / caller)
        ips = add_special_peers(fresh)
        b = body
        if b == "peer":
            b = peer_contents("zz", "10.80.64.77", 4)
        elif b == "peer6":
            b = peer_contents("user2", "10.80.129.2", 5, is_redeemed=True)
        elif b == "document":       # the network as it is: an empty plan
            b = {"document": innernet.network_document(
                fresh.store.cidrs(), fresh.store.peers(), fresh.store.associations(),
                time.time())}
        elif isinstance(b, dict) and "public_key" in b:
            b = {"public_key": key()}
        status, _ = call(fresh, method, path, body=b, ip=ips[caller])
        if caller in ALLOWED[role]:
            assert 200 <= status < 300, (caller, method, path, status)
        else:
            assert status == 401, (caller, method, path, status)


def test_error_statuses_of_section_3_4(co, tmp_path):
    # 401 unauthorized, and expired invitation on redeem
    assert call(co, "GET", "/v1/user/state", ip="10.9.9.9")[0] == 401
    # 404: bad path, non-numeric id, no such row
    assert call(co, "GET", "/nope")[0] == 404
    assert call(co, "PUT", "/v1/admin/peers/x", body={})[0] == 404
    assert call(co, "PUT", "/v1/admin/peers/999",
                body=peer_contents("ghost", "10.80.64.99", 4))[0] == 404
    # 410: redeem of a row already redeemed (a race only; 401 normally comes first)
    with pytest.raises(innernet.InnernetError) as e:
        co.store.redeem(3, key())
    assert e.value.status == 410
    # 400: validation, JSON, constraint
    assert call(co, "POST", "/v1/admin/cidrs", raw=b"{}")[0] == 400
    assert call(co, "POST", "/v1/admin/associations", body={"cidr_id_1": 3, "cidr_id_2": 3})[0] == 400
    # 413: more than 10 candidates
    assert call(co, "PUT", "/v1/user/candidates", "developer1",
                body=[f"1.1.1.{i}:1" for i in range(11)])[0] == 413
    # 500: a failure that is not the caller's fault, with a JSON reason
    co.store.conn.close()
    status, body = call(co, "GET", "/v1/admin/cidrs")
    assert status == 500 and "error" in body


@pytest.mark.parametrize("version", [0, 1, 2])
def test_innernet_databases_are_served_after_migration(tmp_path, version):
    path = tmp_path / "old.db"
    old_database(path, version)
    rows_before = sqlite3.connect(str(path)).execute("SELECT id, name, ip FROM peers").fetchall()
    store = Store(str(path))
    served = Coordinator(store, ServerConfig(innernet.generate_private_key(), 51820,
                                             "10.80.0.1", 15), "old")
    status, peers = call(served, "GET", "/v1/admin/peers", ip="10.80.1.1")
    assert status == 200
    assert [(p["id"], p["name"], p["ip"]) for p in peers] == rows_before
    assert all(p["candidates"] == [] and p["invite_expires"] is None for p in peers)
    status, state = call(served, "GET", "/v1/user/state", ip="10.80.1.1")
    assert status == 200 and {p["name"] for p in state["peers"]} == {"admin", "innernet-server"}
    assert sqlite3.connect(str(path)).execute("PRAGMA user_version").fetchall() == [(2,)]
