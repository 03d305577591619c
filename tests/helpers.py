"""What several test modules share: innernet's server test fixture as a
Coordinator, calls to its API, the server CLI's network, old databases.

Test modules import from here (and from lab.py), never from one another.
"""
import contextlib
import json
import os
import sqlite3
import threading

import pytest

import innernet
from innernet import Cidr, Coordinator, Peer, ServerConfig, Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules that cost memory and stay out of serving state requests and of the
# argument parser (test_footprint.py; test_admin_proof.py for the proofs).
HEAVY = ["http.server", "http.client", "email", "ssl", "hashlib", "_hashlib", "hmac", "nacl",
         "pyroute2", "shutil", "bz2", "lzma"]


def rows(db, sql):
    return sqlite3.connect(db).execute(sql).fetchall()


ENDPOINTS = {"developer1": "169.10.26.8:14720", "developer2": "169.55.140.9:5833"}
IPS = {"innernet-server": "10.80.0.1", "admin": "10.80.1.1", "developer1": "10.80.64.2",
       "developer2": "10.80.64.3", "user1": "10.80.128.2", "user2": "10.80.129.2"}


def key():
    return innernet.public_key(innernet.generate_private_key())


def make_coordinator(tmp_path):
    """innernet's server test fixture (server/src/test.rs in innernet's repository) on a real
    SQLite file."""
    server_key = innernet.generate_private_key()
    store = Store(str(tmp_path / "test.db"), create=True)
    store.create_network("test", innernet.parse_network("10.80.0.0/15"),
                         innernet.parse_ip("10.80.0.1"), innernet.public_key(server_key),
                         "155.155.155.155:54321")
    for name, cidr in (("admin", "10.80.1.0/24"), ("developer", "10.80.64.0/24"),
                       ("user", "10.80.128.0/17")):
        store.add_cidr(Cidr(None, name, cidr, 1))
    for name, cidr_id in (("admin", 3), ("developer1", 4), ("developer2", 4), ("user1", 5),
                          ("user2", 5)):
        store.add_peer(Peer(None, name, IPS[name], cidr_id, key(), is_admin=name == "admin",
                            is_redeemed=True))
    c = Coordinator(store, ServerConfig(server_key, 54321, "10.80.0.1", 15), "test")
    c.redeems.hold_time = 0.01     # unproved redemptions: not 3 s per test (test_admin_proof)
    for p in store.peers():
        if p.name in ENDPOINTS:
            c.device.observed[p.public_key] = ENDPOINTS[p.name]
    return c


@contextlib.contextmanager
def serve_on_loopback(co):
    """The real HTTP server for ``co`` on 127.0.0.1, its peers moved to 127.1.0.<id>
    (a client binding that source address is that peer); yields the port."""
    co.store.conn.execute("UPDATE peers SET ip = '127.1.0.' || id")
    co.gate.local_callers = True
    httpd = innernet.make_api_server(co, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def cli_network(tmp_path, capsys):
    """A network 'evil' with CIDR 'h' made by the server CLI; returns its argv base."""
    base = ["-c", str(tmp_path / "etc"), "-d", str(tmp_path / "lib"), "server"]
    assert innernet.main(base + ["new", "--network-name", "evil", "--network-cidr",
                                 "10.66.0.0/16", "--external-endpoint", "1.2.3.4:51820",
                                 "--listen-port", "51820"]) == 0
    assert innernet.main(base + ["add-cidr", "evil", "--name", "h", "--cidr", "10.66.1.0/24",
                                 "--parent", "evil", "--yes"]) == 0
    capsys.readouterr()
    return base


def call(co, method, path, who="admin", body=None, *, ip=None, headers=None, raw=None):
    hdrs = {innernet.SERVER_KEY_HEADER: co.public_key}
    hdrs.update(headers or {})
    hdrs = {k: v for k, v in hdrs.items() if v is not None}
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    err = None if data is not None else "missing Content-Length header"
    resp = co.handle(method, path, hdrs, ip or IPS[who], data, err)
    payload = resp.raw if resp.raw is not None else (
        None if resp.body is None else json.dumps(resp.body).encode())
    return resp.status, (json.loads(payload) if payload else None)


def peer_contents(name, ip, cidr_id, **kw):
    """A PeerContents body as innernet's client sends it."""
    d = {"name": name, "ip": ip, "cidr_id": cidr_id, "public_key": key(), "endpoint": None,
         "persistent_keepalive_interval": None, "is_admin": False, "is_disabled": False,
         "is_redeemed": False, "invite_expires": None, "candidates": []}
    d.update(kw)
    return d


V0_PEERS = """CREATE TABLE peers (
  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, ip TEXT NOT NULL UNIQUE,
  public_key TEXT NOT NULL UNIQUE, endpoint TEXT, cidr_id INTEGER NOT NULL,
  is_admin INTEGER DEFAULT 0 NOT NULL, is_disabled INTEGER DEFAULT 0 NOT NULL,
  is_redeemed INTEGER DEFAULT 0 NOT NULL,
  FOREIGN KEY (cidr_id) REFERENCES cidrs (id) ON UPDATE RESTRICT ON DELETE RESTRICT)"""


def make_network(path):
    s = Store(str(path), create=True)
    s.create_network("test", innernet.parse_network("10.80.0.0/15"),
                     innernet.parse_ip("10.80.0.1"), key(), "155.155.155.155:54321")
    return s


def old_database(path, version):
    """A database as innernet-server at user_version 0, 1 or 2 left it."""
    c = sqlite3.connect(str(path))
    peers = V0_PEERS
    if version >= 1:
        peers = peers.replace("is_redeemed INTEGER DEFAULT 0 NOT NULL,",
                              "is_redeemed INTEGER DEFAULT 0 NOT NULL, invite_expires INTEGER,")
    if version >= 2:
        peers = peers.replace("invite_expires INTEGER,", "invite_expires INTEGER, candidates TEXT,")
    schema = innernet.SCHEMA.split(";")
    c.execute(peers)
    c.execute(schema[1])
    c.execute(schema[2])
    c.execute("INSERT INTO cidrs VALUES (1, 'test', '10.80.0.0', 15, NULL)")
    c.execute("INSERT INTO cidrs VALUES (2, 'innernet-server', '10.80.0.1', 32, 1)")
    c.execute("INSERT INTO cidrs VALUES (3, 'admin', '10.80.1.0', 24, 1)")
    c.execute("INSERT INTO peers (id, name, ip, public_key, endpoint, cidr_id, is_admin, "
              "is_redeemed) VALUES (1, 'innernet-server', '10.80.0.1', ?, '1.2.3.4:5', 2, 1, 1)",
              (key(),))
    c.execute("INSERT INTO peers (id, name, ip, public_key, cidr_id, is_admin, is_redeemed) "
              "VALUES (2, 'admin', '10.80.1.1', ?, 3, 1, 1)", (key(),))
    c.execute("INSERT INTO associations VALUES (1, 2, 3)")
    c.execute(f"PRAGMA user_version = {version}")
    c.commit()
    c.close()


class _NoStrategy:
    """Stands in for hypothesis's strategies where it is not installed: built at
    import, never drawn from (every test given one is skipped)."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kw):
        return self

    def __or__(self, other):
        return self

    __ror__ = __or__


def hypothesis_or_skips():
    """(HealthCheck, given, settings, strategies) from hypothesis, an optional test
    package; without it, stand-ins under which each @given test is collected and
    skipped with the reason."""
    try:
        from hypothesis import HealthCheck, given, settings, strategies
        return HealthCheck, given, settings, strategies
    except ImportError:
        skip = pytest.mark.skip(reason="needs hypothesis to fuzz (pip install hypothesis; "
                                "tests/run.sh installs it)")
        return (), (lambda *a, **kw: skip), (lambda *a, **kw: (lambda f: f)), _NoStrategy()
