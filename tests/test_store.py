"""The SQLite store: schema, migrations from innernet's versions, constraints."""
import sqlite3

import pytest

import innernet
from innernet import Cidr, InnernetError, Peer, Store
from helpers import key, make_network, old_database


@pytest.mark.parametrize("version", [0, 1, 2])
def test_migration_keeps_every_row(tmp_path, version):
    path = tmp_path / "old.db"
    old_database(path, version)
    before = sqlite3.connect(str(path)).execute("SELECT id, name, ip, public_key FROM peers").fetchall()
    s = Store(str(path))
    assert s._query("PRAGMA user_version")[0][0] == 2
    assert [(p.id, p.name, p.ip, p.public_key) for p in s.peers()] == before
    assert [c.name for c in s.cidrs()] == ["test", "innernet-server", "admin"]
    assert len(s.associations()) == 1
    assert s.peers()[1].candidates == [] and s.peers()[0].endpoint == "1.2.3.4:5"
    s.set_candidates(2, ["1.1.1.1:51820"])
    assert Store(str(path)).peer(2).candidates == ["1.1.1.1:51820"]


def test_new_network_layout(tmp_path):
    s = make_network(tmp_path / "n.db")
    assert [(c.id, c.name, c.cidr, c.parent) for c in s.cidrs()] == \
        [(1, "test", "10.80.0.0/15", None), (2, "innernet-server", "10.80.0.1/32", 1)]
    (server,) = s.peers()
    assert (server.id, server.name, server.is_admin, server.is_redeemed) == \
        (1, "innernet-server", True, True)
    assert oct((tmp_path / "n.db").stat().st_mode & 0o777) == "0o600"


def test_constraints_become_400s_and_change_nothing(tmp_path):
    s = make_network(tmp_path / "n.db")
    dev = s.add_cidr(Cidr(None, "dev", "10.80.64.0/24", 1))
    s.add_peer(Peer(None, "d1", "10.80.64.2", dev.id, key()))
    k = key()
    for contents in (Peer(None, "d1", "10.80.64.3", dev.id, k),
                     Peer(None, "d2", "10.80.64.2", dev.id, k),
                     Peer(None, "d2", "10.80.65.2", dev.id, k)):
        with pytest.raises(InnernetError) as e:
            s.add_peer(contents)
        assert e.value.status == 400
    assert len(s.peers()) == 2
    with pytest.raises(InnernetError, match="in use"):
        s.delete_cidr(dev.id)
    assert len(s.cidrs()) == 3


def test_associations_both_orders_and_missing(tmp_path):
    s = make_network(tmp_path / "n.db")
    a = s.add_cidr(Cidr(None, "a", "10.80.1.0/24", 1))
    b = s.add_cidr(Cidr(None, "b", "10.80.2.0/24", 1))
    s.add_association(a.id, b.id)
    for x, y in ((a.id, b.id), (b.id, a.id), (a.id, 99), (a.id, a.id)):
        with pytest.raises(InnernetError):
            s.add_association(x, y)
    assert len(s.associations()) == 1
    with pytest.raises(InnernetError, match="in use"):
        s.delete_cidr(a.id)


def test_redeem_once_and_sweep(tmp_path):
    s = make_network(tmp_path / "n.db")
    c = s.add_cidr(Cidr(None, "a", "10.80.1.0/24", 1))
    p = s.add_peer(Peer(None, "x", "10.80.1.1", c.id, key(), invite_expires=100))
    q = s.add_peer(Peer(None, "y", "10.80.1.2", c.id, key(), invite_expires=10 ** 10))
    s.redeem(q.id, key())
    with pytest.raises(InnernetError):
        s.redeem(q.id, key())
    assert s.sweep_expired(200) == []                      # re-issuable for a while
    assert [g.name for g in s.sweep_expired(200 + innernet.INVITE_GRACE)] == ["x"]
    assert {p.name for p in s.peers()} == {"innernet-server", "y"}
    assert s.peer_by_ip(p.ip) is None


def test_missing_database_is_a_clear_error(tmp_path):
    with pytest.raises(InnernetError, match="no database file"):
        Store(str(tmp_path / "nope.db"))
