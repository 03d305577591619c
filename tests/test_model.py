"""Pure rules: visibility, CIDR validation, IP allocation, the peer diff, pinning."""
import ipaddress

import pytest

from innernet import (Association, Cidr, DevicePeer, InnernetError, Peer, check_new_cidr,
                      check_new_peer, cidr_tree_lines, diff_peers, generate_private_key,
                      is_assignable, merge_pinned, next_free_ip, peers_in_view, public_key,
                      visible_cidr_ids)

# innernet's server test fixture (server/src/test.rs)
CIDRS = [Cidr(1, "test", "10.80.0.0/15", None), Cidr(2, "innernet-server", "10.80.0.1/32", 1),
         Cidr(3, "admin", "10.80.1.0/24", 1), Cidr(4, "developer", "10.80.64.0/24", 1),
         Cidr(5, "user", "10.80.128.0/17", 1)]


def key():
    return public_key(generate_private_key())


def peer(pid, name, ip, cidr, **kw):
    kw.setdefault("is_redeemed", True)
    return Peer(pid, name, ip, cidr, kw.pop("public_key", None) or key(), **kw)


PEERS = [peer(1, "innernet-server", "10.80.0.1", 2, is_admin=True),
         peer(2, "admin", "10.80.1.1", 3, is_admin=True), peer(3, "developer1", "10.80.64.2", 4),
         peer(4, "developer2", "10.80.64.3", 4), peer(5, "user1", "10.80.128.2", 5),
         peer(6, "user2", "10.80.129.2", 5)]


def visible_peers(peers, cidrs, associations, me):
    """The peers ``me`` may talk to, as the server's state views find them."""
    return peers_in_view(peers, visible_cidr_ids(cidrs, associations, me.cidr_id))


def names(peers):
    return {p.name for p in peers}


def test_peer_sees_own_cidr_and_server_only():
    assert names(visible_peers(PEERS, CIDRS, [], PEERS[2])) == \
        {"developer1", "developer2", "innernet-server"}
    assert names(visible_peers(PEERS, CIDRS, [], PEERS[1])) == {"admin", "innernet-server"}


def test_association_is_symmetric():
    assocs = [Association(1, 3, 4)]
    assert names(visible_peers(PEERS, CIDRS, assocs, PEERS[1])) == \
        {"admin", "developer1", "developer2", "innernet-server"}
    assert "admin" in names(visible_peers(PEERS, CIDRS, assocs, PEERS[3]))
    assert "admin" not in names(visible_peers(PEERS, CIDRS, assocs, PEERS[4]))


def test_associations_of_ancestors_reach_descendants():
    # innernet test 30: experimental /16 with a /17 child holding a peer
    cidrs = CIDRS + [Cidr(6, "experimental", "10.81.0.0/16", 1),
                     Cidr(7, "experimental-sub", "10.81.0.0/17", 6)]
    peers = PEERS + [peer(7, "experiment-peer", "10.81.0.1", 7)]
    assocs = [Association(1, 4, 6), Association(2, 2, 6)]
    want = {"developer1", "developer2", "experiment-peer", "innernet-server"}
    assert names(visible_peers(peers, cidrs, assocs, peers[2])) == want
    assert names(visible_peers(peers, cidrs, assocs, peers[6])) == want


def test_association_with_root_sees_everyone():
    assert names(visible_peers(PEERS, CIDRS, [Association(1, 3, 1)], PEERS[1])) == names(PEERS)


def test_ancestor_itself_is_not_visible_unless_associated():
    ids = visible_cidr_ids(CIDRS, [], 4)
    assert 1 not in ids and ids == {2, 4}


def test_unredeemed_and_disabled_are_invisible():
    peers = PEERS + [peer(7, "dev3", "10.80.64.4", 4, is_redeemed=False),
                     peer(8, "dev4", "10.80.64.5", 4, is_disabled=True)]
    assert names(visible_peers(peers, CIDRS, [], peers[2])) == \
        {"developer1", "developer2", "innernet-server"}


def test_cycle_in_parents_does_not_hang():
    cidrs = [Cidr(1, "a", "10.0.0.0/8", 3), Cidr(3, "b", "10.1.0.0/16", 1)]
    assert visible_cidr_ids(cidrs, [], 3) >= {3}


# -- CIDR rules (innernet's DatabaseCidr::create and its tests) ----------------

def test_new_cidr_ok():
    check_new_cidr(CIDRS, PEERS, Cidr(None, "experimental", "10.81.0.0/16", 1))


@pytest.mark.parametrize("contents,message", [
    (Cidr(None, "developer", "10.81.0.0/16", 1), "already exists"),          # duplicate name
    (Cidr(None, "overlap", "10.80.1.0/21", 1), "overlaps"),                  # test 11
    (Cidr(None, "outside", "10.90.0.0/16", 1), "outside"),
    (Cidr(None, "deep", "10.80.64.0/25", 1), "belongs under 'developer'"),   # test 10
    (Cidr(None, "child", "10.80.64.128/25", 4), "has peers"),                # parent has peers
    (Cidr(None, "second-root", "10.99.0.0/16", None), "needs a parent"),
    (Cidr(None, "nope", "10.81.0.0/16", 42), "does not exist"),
    (Cidr(None, "Bad Name", "10.81.0.0/16", 1), "invalid CIDR name"),
    (Cidr(None, "v6", "fd00::/64", 1), "outside"),
])
def test_new_cidr_refused(contents, message):
    with pytest.raises(InnernetError, match=message) as e:
        check_new_cidr(CIDRS, PEERS, contents)
    assert e.value.status == 400


# -- peer rules and allocation (as innernet's server and its tests) ------------

def test_new_peer_ok():
    check_new_peer(CIDRS, PEERS, peer(None, "developer3", "10.80.64.4", 4))


@pytest.mark.parametrize("ip", ["10.80.65.4", "10.80.64.0", "10.80.64.255", "10.80.64.2"])
def test_new_peer_bad_ip(ip):
    with pytest.raises(InnernetError):
        check_new_peer(CIDRS, PEERS, peer(None, "developer3", ip, 4))


@pytest.mark.parametrize("name", ["has space", "UPPER", "-dash", "dash-", "a--b", "x" * 64, ""])
def test_new_peer_bad_name(name):
    with pytest.raises(InnernetError):
        check_new_peer(CIDRS, PEERS, peer(None, name, "10.80.64.9", 4))


def test_new_peer_duplicate_name_and_missing_cidr():
    with pytest.raises(InnernetError, match="already exists"):
        check_new_peer(CIDRS, PEERS, peer(None, "developer1", "10.80.64.9", 4))
    with pytest.raises(InnernetError) as e:
        check_new_peer(CIDRS, PEERS, peer(None, "x", "10.80.64.9", 99))
    assert e.value.status == 404


def test_assignable_addresses():
    n = ipaddress.ip_network("10.0.0.0/30")
    assert [str(ip) for ip in n if is_assignable(ip, n)] == ["10.0.0.1", "10.0.0.2"]
    n31 = ipaddress.ip_network("10.0.0.0/31")
    assert all(is_assignable(ip, n31) for ip in n31)
    n6 = ipaddress.ip_network("fd00::/126")
    assert [str(ip) for ip in n6 if is_assignable(ip, n6)] == ["fd00::1", "fd00::2", "fd00::3"]


def test_next_free_ip():
    net = ipaddress.ip_network("10.80.64.0/24")
    assert str(next_free_ip(net, [])) == "10.80.64.1"
    assert str(next_free_ip(net, ["10.80.64.1", "10.80.64.2", "10.80.64.4"])) == "10.80.64.3"
    assert str(next_free_ip(ipaddress.ip_network("fd00:1337::/64"), ["fd00:1337::1"])) == \
        "fd00:1337::2"


def test_next_free_ip_full_cidr_is_an_error_not_a_panic():
    net = ipaddress.ip_network("10.0.0.0/30")
    with pytest.raises(InnernetError, match="no free address"):
        next_free_ip(net, ["10.0.0.1", "10.0.0.2"])


def test_cidr_tree_text():
    lines = cidr_tree_lines(CIDRS, {3: ["| ◉ 10.80.1.1: admin"]})
    assert lines[0] == "10.80.0.0/15 test"
    assert "  10.80.1.0/24 admin" in lines and "    | ◉ 10.80.1.1: admin" in lines


# -- the peer diff (as innernet's client and its tests) ------------------------

def test_diff_identical_is_empty():
    k = key()
    dev = [DevicePeer(k, None, ["10.0.0.1/32"], 0)]
    assert diff_peers(dev, [Peer(1, "a", "10.0.0.1", 1, k, None, None)], None, 1000) == []


def test_diff_keepalive_change():
    k = key()
    dev = [DevicePeer(k, None, ["10.0.0.1/32"], 0)]
    (u,) = diff_peers(dev, [Peer(1, "a", "10.0.0.1", 1, k, None, 15)], None, 1000)
    assert u.keepalive == 15 and u.endpoint is None and u.allowed_ips is None


def test_diff_endpoint_only_when_not_recently_connected():
    k = key()
    want = [Peer(1, "a", "10.0.0.1", 1, k, "1.1.1.1:1111", None)]
    old = [DevicePeer(k, None, ["10.0.0.1/32"], 0, last_handshake=1000 - 200)]
    (u,) = diff_peers(old, want, None, 1000)
    assert u.endpoint == "1.1.1.1:1111"
    fresh = [DevicePeer(k, None, ["10.0.0.1/32"], 0, last_handshake=1000)]
    assert diff_peers(fresh, want, None, 1000) == []


def test_diff_add_remove_and_skip():
    mine, a, b, gone = key(), key(), key(), key()
    dev = [DevicePeer(b, None, ["10.0.0.2/32"], 25), DevicePeer(gone, None, ["10.0.0.9/32"], 25)]
    want = [Peer(1, "me", "10.0.0.5", 1, mine), Peer(2, "a", "10.0.0.1", 1, a, "9.9.9.9:1"),
            Peer(3, "b", "10.0.0.2", 1, b, is_disabled=True)]
    ups = {u.public_key: u for u in diff_peers(dev, want, mine, 1000)}
    assert set(ups) == {a, b, gone}
    assert ups[a].action == "added" and ups[a].allowed_ips == ["10.0.0.1/32"] \
        and ups[a].endpoint == "9.9.9.9:1" and ups[a].keepalive == 25
    assert ups[b].remove and ups[gone].remove


def test_diff_never_adds_a_record_at_our_own_address():
    """A cron peer that rotated and then could not reach the server applied
    its cached peers, among them its own record under the key it rotated
    away from: that key went onto its own device as a peer (60-minute soak,
    h90). A record at our own address is never a peer of ours."""
    new, old, a = key(), key(), key()
    want = [Peer(1, "me", "10.0.0.5", 1, old), Peer(2, "a", "10.0.0.1", 1, a)]
    assert {u.public_key for u in diff_peers([], want, new, 1000, own_ip="10.0.0.5")} == {a}
    dev = [DevicePeer(old, None, ["10.0.0.5/32"], 25)]
    (u,) = [u for u in diff_peers(dev, want, new, 1000, own_ip="10.0.0.5") if u.public_key == old]
    assert u.remove


def test_diff_replaces_wrong_allowed_ips():
    k = key()
    dev = [DevicePeer(k, None, ["10.0.0.1/32", "10.9.0.0/16"], 25)]
    (u,) = diff_peers(dev, [Peer(1, "a", "10.0.0.1", 1, k)], None, 1000)
    assert u.allowed_ips == ["10.0.0.1/32"]


def test_diff_nat_reattempt_is_not_a_device_change():
    k = key()
    dev = [DevicePeer(k, "1.1.1.1:1", ["10.0.0.1/32"], 25)]
    (u,) = diff_peers(dev, [Peer(1, "a", "10.0.0.1", 1, k, "1.1.1.1:1",
                                 candidates=["2.2.2.2:2"])], None, 1000)
    assert u.nat_reattempt and not u.touches_device


# -- pinning (as innernet's client and its tests) ------------------------------

def test_pinning_refuses_new_key_for_known_ip():
    stored = [Peer(1, "a", "10.0.0.1", 1, key())]
    with pytest.raises(InnernetError, match="PINNING"):
        merge_pinned(stored, [Peer(1, "a", "10.0.0.1", 1, key())])


def test_empty_update_keeps_peers_disabled():
    stored = [Peer(1, "a", "10.0.0.1", 1, key()), Peer(2, "b", "10.0.0.2", 1, key())]
    merged = merge_pinned(stored, [])
    assert [p.name for p in merged] == ["a", "b"] and all(p.is_disabled for p in merged)


def test_merge_replaces_same_key():
    k = key()
    merged = merge_pinned([Peer(1, "a", "10.0.0.1", 1, k)], [Peer(1, "renamed", "10.0.0.1", 1, k)])
    assert [p.name for p in merged] == ["renamed"]
