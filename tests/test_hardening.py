"""The outside review's findings (issue 10) and new users' mistakes (issue 19), as
unit tests: each failed on the code before its fix. The end-to-end halves are in
tests/e2e/test_hardening.py.
"""
import argparse
import base64
import ipaddress
import json
import os
import socket
import sqlite3
import stat
import threading
import types

import pytest

import innernet
from innernet import Cidr, InnernetError, Peer
from helpers import IPS, call, cli_network, make_coordinator, peer_contents, serve_on_loopback


def key():
    return innernet.public_key(innernet.generate_private_key())


def installed(tmp_path, name="evil"):
    """The files of a network whose config exists (the daemon runs while it does)."""
    (tmp_path / f"{name}.conf").write_text("")
    (tmp_path / f"{name}.conf").chmod(0o600)
    return innernet.ClientFiles(name, str(tmp_path), str(tmp_path))


# -- 8: one strict ASCII number parser -------------------------------------------------

UNICODE_DIGITS = ["²", "٣", "۴", "१", "𝟓", "①", "１", "7²", " 7", "7 ", "+7", "1_0", "0x10", ""]


@pytest.mark.parametrize("text", UNICODE_DIGITS)
def test_ascii_uint_refuses_everything_but_ascii_digits(text):
    assert innernet.ascii_uint(text) is None


def test_ascii_uint_bounds():
    assert innernet.ascii_uint("0") == 0 and innernet.ascii_uint("65535", 1, 65535) == 65535
    assert innernet.ascii_uint("65536", 1, 65535) is None
    assert innernet.ascii_uint("9" * 21) is None


@pytest.mark.parametrize("text", ["1.2.3.4:²", "1.2.3.4:٣٣", "host:１", "[::1]:²", ":²"])
def test_endpoints_with_unicode_digits_are_one_clear_error(text):
    with pytest.raises(InnernetError, match="invalid endpoint"):
        innernet.parse_endpoint(text)


def test_api_bodies_and_queries_with_unicode_digits_are_4xx(co):
    assert call(co, "GET", "/v1/user/state?wait=²", "developer1")[0] == 200
    status, body = call(co, "PUT", "/v1/user/endpoint", "developer1",
                        {"option": "Set", "content": "1.2.3.4:²"})
    assert status == 400 and "invalid endpoint" in body["error"]
    status, body = call(co, "PUT", "/v1/user/candidates", "developer1", ["1.2.3.4:٣"])
    assert status == 400 and "invalid endpoint" in body["error"]


@pytest.fixture
def loopback(tmp_path):
    co = make_coordinator(tmp_path)
    with serve_on_loopback(co) as port:
        yield co, port


def raw_request(port, data, source="127.1.0.2"):
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    s.sendall(data)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and b'"}' in out:
                break
    except socket.timeout:
        pass
    s.close()
    return out


def test_content_length_in_unicode_digits_gets_an_answer(loopback):
    co, port = loopback
    # b"\xb2" is '²' in latin-1, as http.server decodes header lines
    out = raw_request(port, (f"PUT /v1/user/candidates HTTP/1.1\r\nHost: x\r\n"
                             f"{innernet.SERVER_KEY_HEADER}: {co.public_key}\r\n"
                             ).encode() + b"Content-Length: \xb2\r\n\r\n[]")
    assert out.startswith(b"HTTP/1.1 400") and b"Content-Length" in out


def test_cli_listen_port_in_unicode_digits(tmp_path, capsys):
    assert innernet.main(["-c", str(tmp_path / "e"), "-d", str(tmp_path / "d"), "server", "new",
                          "--network-name", "evil", "--network-cidr", "10.66.0.0/16",
                          "--external-endpoint", "1.2.3.4:51820", "--listen-port", "²"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("innernet: error: invalid port '²'") and "Traceback" not in err


def test_invitation_with_unicode_port_is_one_clear_error(tmp_path, capsys):
    text = open(os.path.join(os.path.dirname(__file__), "..", "tests", "test_files.py")).read()
    assert text  # the invitation below is innernet's shape, with a bad port
    inv = tmp_path / "inv.toml"
    inv.write_text('[interface]\nnetwork-name = "evil"\naddress = "10.66.1.2/16"\n'
                   'private-key = "SGb+ojrRNDuMePufwtIYhXzA//k6wF3R21tEBgKlzlM="\n\n'
                   '[server]\npublic-key = "DD5yKRfzExcV5+kDnTroDgCU15latdMjiQ59j1hEuk8="\n'
                   'external-endpoint = ":²"\ninternal-endpoint = "10.66.0.1:51820"\n')
    assert innernet.main(["-c", str(tmp_path / "e"), "-d", str(tmp_path / "d"), "install",
                          str(inv)]) == 1
    err = capsys.readouterr().err
    assert "invalid endpoint" in err and "Traceback" not in err and len(err.splitlines()) <= 2


# -- 4: names are whole hostnames on both sides -------------------------------------------

EVIL = "dave\n6.6.6.6 github.com #"


@pytest.mark.parametrize("name", ["dave\n", EVIL, "dave\r", "Dave", "da ve", "-dave", "x" * 64])
def test_hostname_rule_is_for_the_whole_string(name):
    assert not innernet.is_hostname(name)


def test_server_refuses_a_name_with_a_trailing_newline(co):
    status, body = call(co, "POST", "/v1/admin/peers", body=peer_contents("dave\n", "10.80.64.9",
                                                                           4))
    assert status == 400 and "invalid peer name" in body["error"]


def test_client_refuses_names_from_the_state_and_never_writes_them(tmp_path):
    peer = Peer(7, "dave", "10.80.64.7", 4, key(), is_redeemed=True).to_json()
    peer["name"] = EVIL
    with pytest.raises(InnernetError, match="invalid peer name"):
        Peer.from_json(peer)
    store = tmp_path / "net.json"
    store.write_text(json.dumps({"version": "1", "peers": [peer], "cidrs": []}))
    with pytest.raises(InnernetError):
        innernet.parse_data_store(store.read_text(), str(store))
    bad = Peer(7, EVIL, "10.80.64.7", 4, key(), is_redeemed=True)
    lines = innernet.hosts_lines([bad, Peer(8, "ok", "10.80.64.8", 4, key(), is_redeemed=True)],
                                 "evil")
    assert lines == ["10.80.64.8 ok.evil.wg"]


@pytest.mark.parametrize("suffix", ["bad suffix!", "a\nb", "x..y", ".x", "UPPER"])
def test_bad_host_suffix_is_refused(suffix):
    with pytest.raises(InnernetError, match="invalid host suffix"):
        innernet.parse_host_suffix(suffix)


def test_good_host_suffixes():
    assert innernet.parse_host_suffix("") == "" and innernet.parse_host_suffix("corp.wg") == "corp.wg"


# -- 3: pins survive address moves -------------------------------------------------------

def test_a_moved_pinned_key_keeps_its_old_address_pin():
    a, b = key(), key()
    stored = [Peer(2, "alice", "10.66.1.2", 3, a, is_redeemed=True)]
    moved = innernet.merge_pinned(stored, [Peer(2, "alice", "10.66.1.9", 3, a, is_redeemed=True)])
    with pytest.raises(InnernetError, match="PINNING ERROR"):
        innernet.merge_pinned(moved, [Peer(2, "alice", "10.66.1.9", 3, a, is_redeemed=True),
                                      Peer(3, "mallory", "10.66.1.2", 3, b, is_redeemed=True)])
    # the pin is not on the device or in the hosts file
    live = [p for p in moved if not p.is_disabled]
    assert [(p.ip, p.public_key) for p in live] == [("10.66.1.9", a)]


def test_the_server_peer_is_reached_at_the_configured_endpoint():
    cfg = innernet.InterfaceConfig("evil", ipaddress.ip_interface("10.66.1.2/16"),
                                   innernet.generate_private_key(), None, key(),
                                   "198.18.0.1:51820", "10.66.0.1:51820")
    server = Peer(1, "innernet-server", "10.66.0.1", 2, cfg.server_public_key,
                  endpoint="6.6.6.6:51820", is_redeemed=True, is_admin=True)
    (p,) = innernet.desired_peers(cfg, [server])
    assert p.endpoint == "198.18.0.1:51820"


def test_the_server_peer_is_the_configs_whatever_the_records_say():
    """B2: no record can drop, disable, move or re-key the server's peer on
    the device: the API (where the next state comes from) stays reachable."""
    cfg = innernet.InterfaceConfig("evil", ipaddress.ip_interface("10.66.1.2/16"),
                                   innernet.generate_private_key(), None, key(),
                                   "198.18.0.1:51820", "10.66.0.1:51820")
    srv = Peer(1, "innernet-server", "10.66.0.1", 2, cfg.server_public_key, is_redeemed=True)
    own = ("10.66.1.2", innernet.public_key(cfg.private_key))
    lies = {"disabled": innernet.replaced(srv, is_disabled=True),
            "static": innernet.replaced(srv, is_static=True),
            "moved": innernet.replaced(srv, ip="10.66.1.9"),
            "re-keyed": innernet.replaced(srv, public_key=key())}
    for what, lie in lies.items():
        kept, refused = innernet.refuse_misrouted([lie], [srv], cfg.address.network, own,
                                                  ("10.66.0.1", cfg.server_public_key))
        assert kept == [] and len(refused) == 1, what
    copy = Peer(5, "copy", "10.66.1.5", 2, cfg.server_public_key, is_redeemed=True)
    for peers in ([], [innernet.replaced(srv, is_disabled=True)], [copy, srv]):
        ups = innernet.diff_peers([], innernet.desired_peers(cfg, peers), own[1], 0,
                                  resolve=lambda e: e)
        assert [(u.public_key, u.allowed_ips, u.endpoint) for u in ups] == \
            [(cfg.server_public_key, ["10.66.0.1/32"], "198.18.0.1:51820")], peers
    # an entry that drifted on the device is put back by the next sync
    drifted = [innernet.DevicePeer(cfg.server_public_key, "198.18.0.1:51820",
                                   ["10.66.1.9/32"], 25, 0.0)]
    (u,) = innernet.diff_peers(drifted, innernet.desired_peers(cfg, [srv]), own[1], 0,
                               resolve=lambda e: e)
    assert u.allowed_ips == ["10.66.0.1/32"]


# -- 2: relay rules for nested CIDR trees ----------------------------------------------------

def _overlap(a, b):
    (s1, d1), (s2, d2) = [(ipaddress.ip_network(x), ipaddress.ip_network(y)) for x, y in (a, b)]
    return s1.overlaps(s2) and d1.overlaps(d2)


def test_relay_rules_never_overlap_for_nested_cidrs():
    cidrs = [Cidr(1, "net", "10.66.0.0/16", None), Cidr(2, "innernet-server", "10.66.0.1/32", 1),
             Cidr(3, "humans", "10.66.1.0/24", 1), Cidr(4, "eng", "10.66.4.0/22", 1),
             Cidr(5, "eng-a", "10.66.4.0/24", 4), Cidr(6, "eng-b", "10.66.5.0/24", 4),
             Cidr(7, "deep", "10.66.6.0/23", 4), Cidr(8, "deeper", "10.66.6.0/24", 7)]
    assocs = [innernet.Association(1, 3, 4), innernet.Association(2, 5, 8)]
    peers = [Peer(1, "innernet-server", "10.66.0.1", 2, key(), is_redeemed=True)]
    peers += [Peer(10 + i, f"p{i}", ip, cid, key(), is_redeemed=True)
              for i, (ip, cid) in enumerate([("10.66.1.2", 3), ("10.66.4.2", 5),
                                            ("10.66.5.2", 6), ("10.66.6.2", 8)])]
    # a legacy peer in a CIDR with children (innernet allowed it): its CIDR overlaps
    peers.append(Peer(20, "legacy", "10.66.7.9", 7, key(), is_redeemed=True))
    addrs, pairs = innernet.relay_rules(peers, cidrs, assocs)
    assert len(pairs) == len(set(pairs)) and pairs
    for i, a in enumerate(pairs):
        for b in pairs[i + 1:]:
            assert not _overlap(a, b), (a, b)
    # every allowed direction is still covered
    def allowed(src, dst):
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        return any(s in ipaddress.ip_network(x) and d in ipaddress.ip_network(y) for x, y in pairs)
    assert allowed("10.66.1.2", "10.66.4.2") and allowed("10.66.4.2", "10.66.1.2")
    assert allowed("10.66.1.2", "10.66.6.2") and allowed("10.66.6.2", "10.66.1.2")
    assert allowed("10.66.4.2", "10.66.6.2") and allowed("10.66.6.2", "10.66.4.2")
    assert allowed("10.66.1.2", "10.66.7.9") and allowed("10.66.7.9", "10.66.1.2")
    assert not allowed("10.66.5.2", "10.66.4.2") and not allowed("10.66.4.2", "10.66.5.2")
    rs = innernet.RelayFirewall("x").ruleset(addrs, pairs)
    assert "flags interval" in rs


def test_a_peer_in_a_cidr_with_children_is_refused(co):
    assert call(co, "POST", "/v1/admin/cidrs", body={"name": "kids", "cidr": "10.80.128.0/18",
                                                     "parent": 5})[0] == 400   # user has peers
    status, body = call(co, "POST", "/v1/admin/peers", body=peer_contents("rooted", "10.80.3.3", 1))
    assert status == 400 and "child CIDRs" in body["error"]


# -- 5: the server's own peer and CIDR ------------------------------------------------------

def test_the_server_peer_endpoint_cannot_be_changed_over_the_api(co):
    (server,) = [p for p in co.store.peers() if p.name == "innernet-server"]
    body = dict(server.to_json(with_id=False), endpoint="6.6.6.6:51820")
    status, reply = call(co, "PUT", "/v1/admin/peers/1", body=body)
    assert status == 400 and "endpoint" in reply["error"]
    assert co.store.peer(1).endpoint == "155.155.155.155:54321"


def test_the_server_cidr_cannot_be_renamed(co):
    status, reply = call(co, "PUT", "/v1/admin/cidrs/2",
                         body={"name": "evil", "cidr": "10.80.0.1/32", "parent": 1})
    assert status == 400 and "server's CIDR" in reply["error"]


# -- 1: local processes are never callers ------------------------------------------------------

def test_the_servers_own_address_is_not_a_caller(co):
    status, body = call(co, "POST", "/v1/admin/cidrs", ip="10.80.0.1",
                        body={"name": "x", "cidr": "10.80.9.0/24", "parent": 1})
    assert status == 401 and "local processes" in body["error"]
    assert call(co, "GET", "/v1/admin/peers", ip="127.0.0.1")[0] == 401


# -- 9: keys, storage errors, hosts files, the API client --------------------------------------

LOW_ORDER = ["00" * 32, "01" + "00" * 31, "ec" + "ff" * 30 + "7f", "ed" + "ff" * 30 + "7f",
             "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
             "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"]


@pytest.mark.parametrize("hexkey", LOW_ORDER)
def test_small_order_public_keys_are_refused(co, hexkey):
    bad = base64.b64encode(bytes.fromhex(hexkey)).decode()
    status, _ = call(co, "POST", "/v1/admin/peers",
                     body=peer_contents("weak", "10.80.64.9", 4, public_key=bad))
    assert status == 400
    assert not innernet.is_public_key(bad)


def test_redeeming_with_the_all_zero_key_is_refused(co):
    future = {"secs_since_epoch": 2 ** 40, "nanos_since_epoch": 0}
    assert call(co, "POST", "/v1/admin/peers", body=peer_contents(
        "inv", "10.80.64.40", 4, invite_expires=future))[0] == 201
    zero = base64.b64encode(bytes(32)).decode()
    status, body = call(co, "POST", "/v1/user/redeem", ip="10.80.64.40", body={"public_key": zero})
    assert status == 400 and "invalid public key" in body["error"]


def test_a_full_disk_is_a_clear_507_and_nothing_changes(co):
    before = co.store.conn.execute("SELECT COUNT(*) FROM cidrs").fetchone()
    pages = co.store.conn.execute("PRAGMA page_count").fetchone()[0]
    co.store.conn.execute(f"PRAGMA max_page_count = {pages}")
    bodies = [call(co, "POST", "/v1/admin/cidrs", body={
        "name": f"c{i}-" + "x" * 50, "cidr": f"10.81.{i // 250}.{i % 250}/32", "parent": 1})
        for i in range(400)]
    statuses = {s for s, _ in bodies}
    assert statuses == {201, 507}
    full = next(b for s, b in bodies if s == 507)
    assert "disk is full" in full["error"]
    assert co.store.conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert before[0] <= co.store.conn.execute("SELECT COUNT(*) FROM cidrs").fetchone()[0]


def test_server_verbs_on_a_read_only_database_say_so(tmp_path, capsys):
    cli_network(tmp_path, capsys)
    db = tmp_path / "lib" / "evil.db"
    conn = sqlite3.connect(str(db))
    conn.execute("PRAGMA query_only = 1")   # how a read-only file looks to sqlite
    conn.close()
    uri_store = innernet.Store(str(db))
    uri_store.conn.execute("PRAGMA query_only = 1")
    with pytest.raises(InnernetError) as e:
        uri_store.add_cidr(Cidr(None, "humans", "10.66.1.0/24", 1))
    assert "it or its directory is read-only" in e.value.message and e.value.status == 503


def test_an_empty_database_file_is_one_clear_error(tmp_path, capsys):
    base = cli_network(tmp_path, capsys)
    (tmp_path / "lib" / "evil.db").write_bytes(b"")
    capsys.readouterr()
    assert innernet.main(base + ["list-cidrs", "evil"]) == 1
    err = capsys.readouterr().err
    assert "is not an innernet database" in err and "Traceback" not in err


def test_deeply_nested_files_are_one_clear_error(tmp_path, capsys):
    inv = tmp_path / "inv.toml"
    inv.write_text("x = " + "[" * 1000 + "\n")
    assert innernet.main(["-c", str(tmp_path / "e"), "-d", str(tmp_path / "d"), "install",
                          str(inv)]) == 1
    assert "nested too deeply" in capsys.readouterr().err
    with pytest.raises(InnernetError, match="nested too deeply"):
        innernet.parse_data_store("[" * 100000, "store.json")


def test_a_symlinked_hosts_file_stays_a_symlink(tmp_path):
    real = tmp_path / "real-hosts"
    real.write_text("127.0.0.1 localhost\n")
    link = tmp_path / "hosts"
    link.symlink_to(real)
    assert innernet.write_hosts_file(str(link), "innernet x", ["10.0.0.1 a.x.wg"])
    assert link.is_symlink() and "a.x.wg" in real.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's symlink needs root")
def test_a_hosts_symlink_planted_by_another_user_is_refused(tmp_path, capsys):
    """Review item 3: --hosts-path in a world-writable sticky directory, where
    `nobody` planted a symlink to a file of root's; fetch must not write there."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    link = sticky / "hosts"
    link.symlink_to(victim)
    os.lchown(link, 65534, 65534)                        # nobody's
    assert not innernet.write_hosts_file(str(link), "innernet x", ["10.0.0.1 a.x.wg"])
    assert victim.read_text() == "root:secret\n"
    assert "owned by user 65534" in capsys.readouterr().err
    with pytest.raises(InnernetError, match="owned by user 65534") as e:
        innernet.HostsOptions.from_args(argparse.Namespace(hosts_path=str(link))).resolve()
    assert "--hosts-path" in e.value.hint
    # root's own symlink there is followed; a directory everyone may write to
    # without the sticky bit is refused whatever is in it
    os.lchown(link, 0, 0)
    assert innernet.write_hosts_file(str(link), "innernet x", ["10.0.0.1 a.x.wg"])
    assert "a.x.wg" in victim.read_text() and link.is_symlink()
    sticky.chmod(0o777)
    with pytest.raises(InnernetError, match="others may write"):
        innernet.HostsOptions(str(sticky / "other")).resolve()
    assert innernet.safe_hosts_path("/etc/hosts")


def test_crlf_and_duplicated_hosts_sections_are_replaced_whole():
    text = ("127.0.0.1 localhost\r\n# DO NOT EDIT innernet x BEGIN\r\n10.0.0.9 stale.x.wg\r\n"
            "# DO NOT EDIT innernet x END\r\n::1 ip6\r\n# DO NOT EDIT innernet x BEGIN\n"
            "10.0.0.8 stale2.x.wg\n# DO NOT EDIT innernet x END\n")
    new = innernet.update_hosts_text(text, "innernet x", ["10.0.0.1 a.x.wg"])
    assert "stale" not in new and new.count("BEGIN") == 1 and "10.0.0.1 a.x.wg" in new
    assert new.startswith("127.0.0.1 localhost\r\n") and "::1 ip6" in new


class _OneShotServer:
    """Answers the first request on each connection, then closes it."""

    def __init__(self, answers):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests = []
        self.answers = list(answers)
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while self.answers:
            c, _ = self.sock.accept()
            with c:
                data = c.recv(65536)
                self.requests.append(data.split(b" ", 2)[:2])
                answer = self.answers.pop(0)
                if answer is not None:
                    c.sendall(answer)
                    if b"keep" in answer:      # keep it open, then close without a word
                        c.recv(65536)
                        self.requests.append([b"(second request on the connection)"])


def test_the_api_client_never_retries_a_write():
    ok = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Note: keep\r\n\r\n{}")
    srv = _OneShotServer([ok, None, None])
    api = innernet.ApiClient(f"127.0.0.1:{srv.port}", key(), timeout=3)
    api.call("GET", "/user/state")
    with pytest.raises(InnernetError):
        api.call("POST", "/admin/cidrs", {"name": "x"})
    # the GET, then the POST once (on the kept-alive connection), never again
    assert srv.requests == [[b"GET", b"/v1/user/state"], [b"(second request on the connection)"]]


def test_the_api_client_bounds_bodies_read_until_close(monkeypatch):
    monkeypatch.setattr(innernet, "MAX_ANSWER", 1000)
    srv = _OneShotServer([b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 5000])
    api = innernet.ApiClient(f"127.0.0.1:{srv.port}", key(), timeout=3)
    with pytest.raises(InnernetError, match="larger than"):
        api.call("GET", "/user/state")


def test_the_api_client_checks_a_chunk_size_before_reading_it(monkeypatch):
    monkeypatch.setattr(innernet, "MAX_ANSWER", 1000)
    srv = _OneShotServer([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffff\r\n"])
    api = innernet.ApiClient(f"127.0.0.1:{srv.port}", key(), timeout=3)
    with pytest.raises(InnernetError, match="larger than"):
        api.call("GET", "/user/state")


# -- 7: bounded memory: rate limits and caches ---------------------------------------------

def test_candidate_updates_are_rate_limited_and_no_ops_are_free(co):
    statuses = [call(co, "PUT", "/v1/user/candidates", "developer1", [f"1.2.3.{i}:51820"])[0]
                for i in range(innernet.PEER_UPDATE_BURST + 5)]
    assert statuses[:innernet.PEER_UPDATE_BURST] == [204] * innernet.PEER_UPDATE_BURST
    assert set(statuses[innernet.PEER_UPDATE_BURST:]) == {429}
    rev = co.store.revision
    last = co.store.peer_by_ip(IPS["developer1"]).candidates
    assert call(co, "PUT", "/v1/user/candidates", "developer1", last)[0] == 204
    assert co.store.revision == rev              # the same list again writes nothing
    status, body = call(co, "PUT", "/v1/user/endpoint", "developer1",
                        {"option": "Set", "content": "9.9.9.9:1"})
    assert status == 429 and "try again" in body["error"]


def test_the_gzip_and_state_caches_are_bounded(co, monkeypatch):
    monkeypatch.setattr(innernet, "GZIP_CACHE_BYTES", 4000)
    for i in range(200):
        body = os.urandom(1500)
        co.views.gzipped(body, f'"{i}"')
    assert co.views._gzip_bytes <= 4000 + 1600 and len(co.views._gzip_cache) < 10
    for i in range(20):
        co.store.set_candidates(3, [f"1.1.1.{i}:1"])
        call(co, "GET", "/v1/user/state", "developer1")
        call(co, "GET", "/v1/user/state", "admin")
    revs = {hit[0] for hit in co.views._state_cache.values()}
    assert len(revs) == 1


# -- the smaller CLI items ----------------------------------------------------------------------

def test_ensure_dir_tightens_an_existing_directory(tmp_path):
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    innernet.ensure_dir(str(d))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_durations():
    assert innernet.format_duration(1209600) == "2w" and innernet.format_duration(86400 * 3) == "3d"
    assert innernet.format_duration(90) == "90s"
    with pytest.raises(InnernetError, match="at least 1 s"):
        innernet.parse_expiry("0s")


def test_misplaced_global_options_are_named(capsys):
    assert innernet.main(["install", "-c", "/tmp/x", "-d", "/tmp/y", "inv.toml"]) == 2
    err = capsys.readouterr().err
    assert "-c is a global option and goes before the command" in err
    assert innernet._misplaced_global(["-c", "x", "-d", "y", "install", "-d", "inv.toml"]) is None


def test_add_peer_with_an_empty_save_config_changes_nothing(tmp_path, capsys):
    base = cli_network(tmp_path, capsys)
    assert innernet.main(base + ["add-peer", "evil", "--name", "p", "--cidr", "h", "--auto-ip",
                                 "--admin", "false", "--save-config", "", "--yes"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("innernet: error: --save-config needs a file name") and "Trace" not in err
    db = str(tmp_path / "lib" / "evil.db")
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM peers").fetchone() == (1,)


def test_a_failing_program_is_reported_by_its_error_line_not_its_last():
    with pytest.raises(InnernetError) as e:
        innernet.run(["sh", "-c", "echo '/dev/stdin:5:44-70: Error: Could not process rule: "
                                  "File exists' >&2; echo '  set pairs' >&2; "
                                  "echo '      ^^^^^' >&2; exit 1"])
    said = e.value.message.split("failed with status 1: ", 1)[1]
    assert said == "/dev/stdin:5:44-70: Error: Could not process rule: File exists"


def test_the_daemon_survives_an_unexpected_error_and_says_when_it_is_back(monkeypatch, capsys,
                                                                        tmp_path):
    calls = []

    def fetch(files, opts, **kw):
        calls.append(files.iface)
        if len(calls) <= 2:
            raise ValueError("a bug in one network")
        return innernet.FetchResult([], False, False, False)

    class Stop(Exception):
        pass

    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) >= 3:
            raise Stop()
    monkeypatch.setattr(innernet, "fetch_interface", fetch)
    monkeypatch.setattr(innernet, "server_capabilities", lambda files, opts: {})
    monkeypatch.setattr(innernet, "_say_innernet_server", lambda files, told: None)
    monkeypatch.setattr(innernet.time, "sleep", sleep)
    opts = innernet.FetchOptions(interval=60, no_nat_traversal=True, no_long_poll=True)
    with pytest.raises(Stop):
        innernet._daemon(installed(tmp_path), opts)
    err = capsys.readouterr().err
    assert err.count("unexpected error: ValueError('a bug in one network') (retrying)") == 1
    assert "in sync with the server again" in err and len(calls) == 3


class FakeClock:
    """time.monotonic and time.sleep for a loop under test: only sleeping
    moves the clock, so what is checked is the loop's own pacing, whatever
    the machine's load."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        assert seconds >= 0
        self.now += seconds


def daemon_on_clock(monkeypatch, tmp_path, clock, fetch, stop, interval):
    """_daemon with long polls offered, ``fetch`` for its rounds, under
    ``clock``, until ``fetch`` raises ``stop``."""
    monkeypatch.setattr(innernet.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(innernet.time, "sleep", clock.sleep)
    monkeypatch.setattr(innernet, "fetch_interface", fetch)
    monkeypatch.setattr(innernet, "server_capabilities",
                        lambda files, opts: {"long_poll_seconds": 60})
    monkeypatch.setattr(innernet, "_say_innernet_server", lambda files, told: None)
    with pytest.raises(stop):
        innernet._daemon(installed(tmp_path), innernet.FetchOptions(interval=interval,
                                                                    no_nat_traversal=True))


@pytest.mark.parametrize("answer", ["changed", "failure", "pending proof", "paths due"])
def test_a_daemons_state_requests_are_a_second_apart_whatever_the_server_answers(
        monkeypatch, answer, tmp_path):
    """Promise 27 (moved here from a timed end-to-end check): a server that
    answers every long poll at once, with a change or an error, or keeps a
    proof pending, or makes the paths due at once, gets the daemon's state
    requests DAEMON_MIN_PERIOD apart at least -- a condition on the loop, with
    a clock that only its sleeps move."""
    clock, starts = FakeClock(), []

    class Stop(BaseException):          # not an Exception: the daemon survives those
        pass

    def fetch(files, opts, **kw):
        starts.append(clock.now)
        if len(starts) > 30:
            raise Stop()
        if answer == "failure":
            raise InnernetError("the server answered 500")
        return innernet.FetchResult([], False, True, True, next_due=0.0 if answer == "paths due"
                                    else None, pending=[1] if answer == "pending proof" else [],
                                    polled=True)
    monkeypatch.setattr(innernet, "load_client_config",
                        lambda files: types.SimpleNamespace(endpoints=["a"]))
    daemon_on_clock(monkeypatch, tmp_path, clock, fetch, Stop, interval=60)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(gaps) == 30 and min(gaps) >= innernet.DAEMON_MIN_PERIOD, gaps


@pytest.mark.parametrize("polled", [False, True])
def test_a_state_asked_for_whole_is_no_long_poll_and_the_daemon_keeps_its_interval(
        monkeypatch, polled, tmp_path):
    """Outside round 29, T29-3 and T29-4: a sync that can send no ETag (a
    host that has seen a lock and holds no copy; a quarantined address for
    a week) sends no ?wait= either, and the server's answer, at once, was
    taken for a long poll that had ended with a change: the daemon asked
    for the whole state every second. Such a round is no long poll: the
    daemon waits its interval. A change a long poll brought still makes
    the next poll start at once."""
    clock, starts = FakeClock(), []

    class Stop(BaseException):
        pass

    def fetch(files, opts, **kw):
        starts.append(clock.now)
        if len(starts) > 5:
            raise Stop()
        return innernet.FetchResult([], False, True, False, polled=polled)
    daemon_on_clock(monkeypatch, tmp_path, clock, fetch, Stop, interval=600)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps == ([innernet.DAEMON_MIN_PERIOD] * 5 if polled else [600] * 5), gaps


# -- 19.13: a direct path lost later is noticed in seconds ------------------------------------

def test_path_watch_pokes_quiet_peers_and_calls_silent_ones_lost(monkeypatch):
    pokes = []
    monkeypatch.setattr(innernet, "trigger_packet", lambda ip, port=9: pokes.append(ip))
    k = key()
    peers = {k: Peer(5, "bob", "10.66.1.5", 3, k, is_redeemed=True)}
    watch = innernet.PathWatch()

    def dev(rx):
        return innernet.Device("x", peers=[innernet.DevicePeer(k, "198.18.0.5:1", [], 25,
                                                              1000.0, rx, 0)])
    assert watch.check(dev(10), peers, set(), now=0) == []
    assert watch.check(dev(20), peers, set(), now=2) == []           # talking: nothing
    assert watch.check(dev(20), peers, set(), now=5) == [] and pokes == ["10.66.1.5"]
    assert watch.check(dev(20), peers, set(), now=10) == [] and len(pokes) == 2
    assert watch.check(dev(52), peers, set(), now=12) == []          # it answered: alive
    assert watch.check(dev(52), peers, set(), now=15.5) == [] and len(pokes) == 3
    assert watch.check(dev(52), peers, set(), now=25) == []          # poke only 9.5 s old
    assert watch.check(dev(52), peers, set(), now=26.5) == [k]       # 14.5 s silent: lost
    # relayed or never connected peers are not watched
    assert watch.check(dev(52), peers, {k}, now=60) == []
    never = innernet.Device("x", peers=[innernet.DevicePeer(k, None, [], 25, 0.0, 0, 0)])
    assert watch.check(never, peers, set(), now=100) == []


def test_a_late_watch_is_no_false_alarm(monkeypatch):
    """A watch thread delayed by load sees the counter moved and resets."""
    monkeypatch.setattr(innernet, "trigger_packet", lambda ip, port=9: None)
    k = key()
    peers = {k: Peer(5, "bob", "10.66.1.5", 3, k, is_redeemed=True)}
    watch = innernet.PathWatch()
    def d(rx):
        return innernet.Device("x", peers=[innernet.DevicePeer(k, "1.2.3.4:5", [], 25, 1.0, rx,
                                                              0)])
    assert watch.check(d(1), peers, set(), now=0) == []
    assert watch.check(d(1), peers, set(), now=30) == []     # no poke yet: not lost
    assert watch.check(d(9), peers, set(), now=31) == []


def test_add_peer_when_the_invitation_file_appears_meanwhile(tmp_path, capsys, monkeypatch):
    """The file is created exclusively before the peer: a file that appears after
    the check (another admin, a script) stops add-peer with no peer created."""
    base = cli_network(tmp_path, capsys)
    target = tmp_path / "p.toml"
    real_confirm = innernet.confirm

    def confirm_and_race(args, question, default=False):
        target.write_text("someone else's file\n")
        return real_confirm(args, question, default)
    monkeypatch.setattr(innernet, "confirm", confirm_and_race)
    capsys.readouterr()
    assert innernet.main(base + ["add-peer", "evil", "--name", "p", "--cidr", "h", "--auto-ip",
                                 "--admin", "false", "--invite-expires", "1h", "--save-config",
                                 str(target), "--yes"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert target.read_text() == "someone else's file\n"
    db = str(tmp_path / "lib" / "evil.db")
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM peers").fetchone() == (1,)


def test_a_client_parses_a_state_record_by_record():
    """B4: lists that are not lists are a malformed state (nothing applied);
    a bad record is refused alone, in one line that cannot be split."""
    for field in ("peers", "cidrs", "deleted"):
        for value in (5, float("inf"), "x", {"a": 1}):
            with pytest.raises(InnernetError, match="malformed state"):
                innernet.parse_state({field: value})
    good = Peer(7, "dave", "10.80.64.7", 4, key(), is_redeemed=True).to_json()
    bads = [dict(good, routes=["10.99.1.3/24"]), dict(good, routes=["10.99.1.2"]),
            dict(good, name="Bob"), dict(good, name="a" * 300), dict(good, name="mällory"),
            dict(good, persistent_keepalive_interval=70000), dict(good, ip="10.99.1.64/32"),
            dict(good, public_key="A" * 43 + "="), dict(good, name="x\n6.6.6.6 github.com"), 7]
    huge = {"ip": "10.80.64.9", "public_key": key(), "reuse_after": 10 ** 30}
    peers, cidrs, deleted, refused = innernet.parse_state(
        {"peers": bads + [good], "cidrs": [7], "deleted": [{"ip": "10.80.64.9"}, huge]})
    assert [p.name for p in peers] == ["dave"] and cidrs == [] and deleted == []
    assert len(refused) == len(bads) + 3 and all("\n" not in ln for ln in refused)


def test_ipv4_mapped_addresses_are_checked_as_ipv4():
    """B3: [::ffff:a.b.c.d] is a.b.c.d to every check of endpoints and
    candidates; IPv4-mapped routes are refused."""
    assert innernet.parse_endpoint("[::ffff:10.99.1.2]:51820") == ("10.99.1.2", 51820)
    assert innernet.normalize_endpoint("[::FFFF:10.99.1.2]:51820") == "10.99.1.2:51820"
    assert innernet.parse_endpoint("[fd00::1]:51820") == ("fd00::1", 51820)
    net = ipaddress.ip_network("10.99.0.0/16")
    own, srv = ("10.99.1.9", key()), ("10.99.0.1", key())
    bad = Peer(7, "m", "10.99.1.7", 4, key(), endpoint="[::ffff:10.99.1.2]:51820",
               candidates=["[::ffff:10.99.1.3]:51820", "[::ffff:198.18.0.9]:51820"])
    bad = Peer.from_json(bad.to_json())
    (p,), said = innernet.refuse_misrouted([bad], [], net, own, srv)
    assert p.endpoint is None and "inside the network" in said[0]
    assert p.candidates == ["198.18.0.9:51820"]
    with pytest.raises(InnernetError, match="not routable"):
        innernet.parse_route("::ffff:10.99.1.0/120")


def test_bare_names_never_shadow_local_ones():
    """With --host-suffix '' a peer named localhost (or another local name)
    gets no hosts line; with a suffix its name is as good as any."""
    peers = [Peer(n, name, f"10.80.64.{n}", 4, key(), is_redeemed=True)
             for n, name in enumerate(("localhost", "broadcasthost", "ip6-localhost", "ok"), 1)]
    assert innernet.hosts_lines(peers, "evil", "") == ["10.80.64.4 ok"]
    assert len(innernet.hosts_lines(peers, "evil")) == 4


def test_serve_and_clients_write_etc_hosts_by_default_and_the_readme_says_so():
    """The hosts file is written unless --no-write-hosts: said in the quick start."""
    args = type("A", (), {})()
    assert innernet.HostsOptions.from_args(args).resolve() == ("/etc/hosts", None)
    args.no_write_hosts = True
    assert innernet.HostsOptions.from_args(args).resolve() == (None, None)
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "README.md")).read()
    quick = readme.split("\n## Quick start\n", 1)[1].split("\n### ", 1)[0]
    assert "`serve` writes the network's peers into `/etc/hosts` by default" in \
        " ".join(quick.split())


def test_a_local_user_can_neither_hold_back_nor_plant_late_rotation_proofs(co):
    """Review 3d: a local user of a peer's host may spend the peer's endpoint and
    candidate budget (any process there speaks as the peer); the late proofs of
    the peer's rotation do not draw on it. They are bounded another way: kept
    only for peers that may see the caller, each once. And they are made with
    the peer's private key: a local user cannot plant proofs of its own."""
    me = co.store.peer_by_ip(IPS["developer1"])
    other = co.store.peer_by_ip(IPS["developer2"])
    old = me.public_key
    new_private = innernet.generate_private_key()
    new = innernet.public_key(new_private)
    co.store.rotate_key(me.id, new, {})
    mac = innernet.admin_proof_key(innernet.shared_secret(new_private, co.public_key))

    def proved(body):
        return {innernet.ADMIN_PROOF_HEADER: innernet.admin_proof(
            mac, "POST", "/v1/user/rotation-proofs", json.dumps(body).encode())}
    statuses = [call(co, "PUT", "/v1/user/candidates", "developer1", [f"1.2.3.{i}:51820"])[0]
                for i in range(innernet.PEER_UPDATE_BURST + 3)]
    assert statuses[-1] == 429                              # the budget is spent
    status, wanted = call(co, "GET", "/v1/user/rotation-proofs", "developer1")
    assert status == 200 and other.public_key in wanted[0]["peers"]
    stranger = key()
    body = {"old_key": old, "new_key": new,
            "proofs": {other.public_key: "A" * 43 + "=", stranger: "B" * 43 + "="}}
    # a local user of the host speaks as the peer, but cannot make the proof
    assert call(co, "POST", "/v1/user/rotation-proofs", "developer1", body)[0] == 403
    forged = {innernet.ADMIN_PROOF_HEADER: innernet.admin_proof(
        innernet.admin_proof_key(os.urandom(32)), "POST", "/v1/user/rotation-proofs",
        json.dumps(body).encode())}
    assert call(co, "POST", "/v1/user/rotation-proofs", "developer1", body,
                headers=forged)[0] == 403
    [(_, _, proofs)] = co.store.rotations(IPS["developer1"])
    assert proofs == {}
    assert call(co, "POST", "/v1/user/rotation-proofs", "developer1", body,
                headers=proved(body))[0] == 204
    [(_, _, proofs)] = co.store.rotations(IPS["developer1"])
    assert proofs == {other.public_key: "A" * 43 + "="}      # the stranger's is not kept
    rev = co.store.revision
    assert call(co, "POST", "/v1/user/rotation-proofs", "developer1", body,
                headers=proved(body))[0] == 204
    assert co.store.revision == rev                         # nothing new: nothing written


# -- the second outside review (root's files, the API's bounds, endpoints) -------------

def test_atomic_writes_set_the_mode_on_the_descriptor_never_by_path(tmp_path, monkeypatch):
    """Review 2, item 1: chmod by name follows a symlink swapped in for the
    temporary file (/etc/shadow made 0644); the mode is set with fchmod."""
    def no_chmod(path, *a, **kw):
        raise AssertionError(f"chmod by path: {path}")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    hosts.chmod(0o644)
    monkeypatch.setattr(os, "chmod", no_chmod)
    made = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: made.append((p, flags))
                        or real_open(p, flags, *a))
    old = os.umask(0o077)
    try:
        assert innernet.write_hosts_file(str(hosts), "innernet x", ["10.0.0.1 a.x.wg"])
        assert stat.S_IMODE(hosts.stat().st_mode) == 0o644     # despite umask 077
        innernet.atomic_write(str(tmp_path / "n.toml"), "x", 0o600, exclusive=True)
        assert stat.S_IMODE((tmp_path / "n.toml").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    temps = [f for p, f in made if ".tmp" in os.path.basename(p)]
    assert len(temps) == 2
    assert all(f & os.O_EXCL and f & os.O_NOFOLLOW and f & os.O_CREAT for f in temps)


def test_a_hosts_path_in_a_directory_another_user_owns_is_refused(tmp_path, capsys):
    """Review 2, item 1: whoever owns the hosts file's directory could swap
    root's temporary file; such a path (or one under such a directory) is
    refused with one line, and nothing is written."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    os.chown(theirs, 65534, 65534)
    for hosts in (theirs / "hosts", theirs / "sub" / "hosts"):
        with pytest.raises(InnernetError, match="owned by user 65534") as e:
            innernet.HostsOptions(str(hosts)).resolve()
        assert "--hosts-path" in e.value.hint
        assert not innernet.write_hosts_file(str(hosts), "innernet x", ["10.0.0.1 a.x.wg"])
        assert not hosts.exists()
    assert "owned by user 65534" in capsys.readouterr().err
    group = tmp_path / "group"
    group.mkdir()
    group.chmod(0o775)
    with pytest.raises(InnernetError, match="others may write"):
        innernet.HostsOptions(str(group / "hosts")).resolve()


def test_a_hosts_path_in_a_directory_of_someone_else_is_refused_unprivileged(tmp_path):
    """The same check as seen by a user who is not root: a directory of
    root's that others may write to without the sticky bit is refused, ours
    and a sticky one are fine."""
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    assert innernet.safe_hosts_path(str(mine / "hosts")) == str(mine / "hosts")
    mine.chmod(0o1777)
    assert innernet.safe_hosts_path(str(mine / "hosts")) == str(mine / "hosts")
    mine.chmod(0o757)
    with pytest.raises(InnernetError, match="others may write"):
        innernet.safe_hosts_path(str(mine / "hosts"))
    mine.chmod(0o755)


def test_a_fifo_at_the_hosts_path_is_refused_without_hanging(tmp_path, capsys):
    """Review 2, item 2: `mkfifo -m 666 /tmp/x-hosts` hung root's cron fetch
    in open(); a hosts path must be a regular file, checked on the descriptor
    too (O_NONBLOCK|O_NOFOLLOW, fstat), so a FIFO swapped in later is refused."""
    fifo = tmp_path / "hosts"
    os.mkfifo(fifo, 0o666)
    done = {}

    def write():
        done["changed"] = innernet.write_hosts_file(str(fifo), "innernet x", ["10.0.0.1 a"])
    t = threading.Thread(target=write, daemon=True)
    t.start()
    t.join(120)                          # bounded: a hang fails, not blocks the suite
    assert done == {"changed": False}
    assert "not a regular file" in capsys.readouterr().err
    with pytest.raises(InnernetError, match="not a regular file") as e:
        innernet.HostsOptions(str(fifo)).resolve()
    assert "\n" not in e.value.message
    for flags in (os.O_RDONLY, os.O_WRONLY):     # past the path check: the descriptor's
        with pytest.raises(InnernetError, match="not a regular file"):
            innernet._open_regular(str(fifo), flags, "hosts file")


def test_half_sent_requests_from_one_source_cannot_starve_a_full_one(tmp_path):
    """Review 2, item 3: every user of a host shares its source address, so
    MAX_CONNECTIONS_PER_PEER half-sent heads from one local user refused
    root's fetch. A new connection now evicts that source's oldest one still
    waiting for its head: a request sent at once gets through."""
    co = make_coordinator(tmp_path)
    held = []
    with serve_on_loopback(co) as port:
        try:
            for _ in range(innernet.MAX_CONNECTIONS_PER_PEER + 8):
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                s.sendall(b"GET /v1/user/state HTTP/1.1\r\nHost: x\r\n")   # never ends
                held.append(s)
            for _ in range(3):
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                s.sendall(f"GET /v1/user/state HTTP/1.1\r\nHost: x\r\n"
                          f"{innernet.SERVER_KEY_HEADER}: {co.public_key}\r\n"
                          "Connection: close\r\n\r\n".encode())
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
                s.close()
                assert answer.startswith(b"HTTP/1.1 "), answer[:200]
                assert int(answer.split()[1]) < 500, answer[:300]
        finally:
            for s in held:
                s.close()


def test_a_connection_busy_with_its_request_is_never_evicted(tmp_path):
    """Only connections still waiting for a head give way: at the cap with
    none of those, a new connection is refused as before."""
    server = innernet.ApiServer.__new__(innernet.ApiServer)
    server._slots = threading.BoundedSemaphore(1000)
    server._per_source, server._per_source_lock = {}, threading.Lock()
    started = []
    server._work = lambda *a: started.append(a)
    pairs = [socket.socketpair() for _ in range(innernet.MAX_CONNECTIONS_PER_PEER + 1)]
    try:
        for a, _ in pairs[:-1]:
            server._start(a, ("10.80.64.2", 1))
        for *_, slot in started:
            assert server._busy(slot)
        server._start(pairs[-1][0], ("10.80.64.2", 1))
        assert len(started) == innernet.MAX_CONNECTIONS_PER_PEER       # refused
        started[0][2].heading = True                                     # idle again
        a, b = socket.socketpair()
        pairs.append((a, b))
        server._start(a, ("10.80.64.2", 1))
        assert len(started) == innernet.MAX_CONNECTIONS_PER_PEER + 1
        assert started[0][2].evicted and not server._busy(started[0][2])
        assert len(server._per_source["10.80.64.2"]) == innernet.MAX_CONNECTIONS_PER_PEER
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.parametrize("endpoint", [
    "10.80.64.9:51820", "[::ffff:10.80.64.9]:51820", "127.0.0.1:51820", "[::1]:51820",
    "[::ffff:127.0.0.1]:51820", "224.0.0.5:51820", "[ff02::1]:51820"])
def test_the_server_refuses_an_endpoint_inside_the_network_or_loopback(tmp_path, endpoint):
    """Review 2, item 4: a peer (or a local user with the server key header)
    set its own endpoint inside the network, and every client then refused
    its whole record. Refused with a 4xx and a JSON reason; nothing stored."""
    co = make_coordinator(tmp_path)
    status, body = call(co, "PUT", "/v1/user/endpoint", "developer1",
                        body={"option": "Set", "content": endpoint})
    assert status == 400 and "endpoint" in body["error"], body
    dev1 = next(p for p in co.store.peers() if p.name == "developer1")
    assert dev1.endpoint is None
    # an address outside, and innernet's 0.0.0.0:PORT (the address the server sees), still do
    for ok in ("198.18.0.7:51820", "0.0.0.0:51820", "[2001:db8::7]:51820"):
        assert call(co, "PUT", "/v1/user/endpoint", "developer1",
                    body={"option": "Set", "content": ok})[0] == 204


@pytest.mark.parametrize("endpoint", [
    "10.99.1.2:51820", "[::ffff:10.99.1.2]:51820", "127.0.0.1:51820", "[::1]:51820",
    "0.0.0.0:51820", "224.0.0.5:51820"])
def test_a_lying_servers_endpoint_costs_the_peer_its_direct_path_not_its_record(endpoint):
    """Review 2, item 4: a client keeps a peer whose endpoint is inside the
    network (loopback, unspecified, multicast, IPv4-mapped), without it."""
    net = ipaddress.ip_network("10.99.0.0/16")
    own, srv = ("10.99.1.9", key()), ("10.99.0.1", key())
    bad = Peer.from_json(Peer(7, "m", "10.99.1.7", 4, key(), endpoint=endpoint).to_json())
    (p,), said = innernet.refuse_misrouted([bad], [], net, own, srv)
    assert p.endpoint is None and p.public_key == bad.public_key and p.ip == "10.99.1.7"
    assert len(said) == 1 and "without its endpoint" in said[0] and "\n" not in said[0]
    good = innernet.replaced(bad, endpoint="198.18.0.9:51820")
    assert innernet.refuse_misrouted([good], [], net, own, srv) == ([good], [])


@pytest.mark.parametrize("resolved", ["10.99.1.2:51820", "127.0.0.1:51820", "[::1]:51820",
                                      "0.0.0.0:51820", "224.0.0.5:51820"])
def test_a_host_name_endpoint_is_judged_by_what_it_resolves_to(resolved, capsys):
    """Review: a host name passed the endpoint rule (only literals were
    judged). It is judged where it is resolved, each time: a name that
    resolves inside the network, to loopback, unspecified or multicast gives
    the peer no endpoint (said once), as a literal there would; the same name
    resolving outside later is used; literals pass through (refuse_misrouted
    judged them with the record)."""
    net = ipaddress.ip_network("10.99.0.0/16")
    answers = {"evil.example:51820": resolved, "fine.example:51820": "198.18.0.9:51820",
               "10.99.1.2:51820": "10.99.1.2:51820"}
    placed = innernet.placed_resolver(net, resolve=answers.get)
    innernet._misplaced_said.clear()
    assert placed("evil.example:51820") is None
    assert placed("evil.example:51820") is None
    err = capsys.readouterr().err
    assert err.count("endpoint evil.example:51820 not used") == 1 and "\n" == err[-1], err
    assert placed("fine.example:51820") == "198.18.0.9:51820"
    assert placed("10.99.1.2:51820") == "10.99.1.2:51820"     # a literal: not judged here
    answers["evil.example:51820"] = "198.18.0.7:51820"       # DNS moved it outside
    assert placed("evil.example:51820") == "198.18.0.7:51820"


def test_every_place_that_resolves_a_peers_endpoint_judges_it(tmp_path, monkeypatch):
    """The device diff (client and server) and the NAT candidates take the
    placed resolver: a name resolving inside the network reaches no device."""
    net = ipaddress.ip_network("10.99.0.0/16")
    monkeypatch.setattr(innernet, "resolve_endpoint", lambda text: "10.99.1.2:51820")
    innernet._misplaced_said.clear()
    p = Peer(7, "m", "10.99.1.7", 4, key(), endpoint="evil.example:51820",
             candidates=["evil.example:51820"])
    (u,) = innernet.diff_peers([], [p], key(), 0, resolve=innernet.placed_resolver(net))
    assert u.endpoint is None and u.action == "added"
    assert innernet.traversal_candidates(p, [], resolve=innernet.placed_resolver(net)) == []
    co = make_coordinator(tmp_path)
    assert co.device.network == co.config.interface.network


def test_a_server_cannot_end_a_pin_by_sending_its_quarantine():
    """Outside round 25, Y25-2: the client parsed the server's records as its
    own data store, so a record with `deleted_until: 1` (a quarantine over)
    was stored, and at the next sync the pin went: another key took the
    address with exit 0. A received record never carries a quarantine."""
    bob = Peer(11, "bob", "10.66.1.3", 3, key(), is_redeemed=True)
    lie = dict(bob.to_json(), deleted_until=1)
    received = innernet.parse_state({"peers": [lie], "cidrs": []})[0]
    assert received[0].deleted_until is None
    stored = innernet.merge_pinned([bob], received, now=10 ** 10)
    swapped = innernet.replaced(bob, public_key=key())
    with pytest.raises(InnernetError, match="PINNING ERROR"):
        innernet.merge_pinned(stored, [swapped], now=10 ** 10)

