"""Hostile input: every API body and every file parser, fuzzed (hypothesis).

The server answers a 4xx and changes no row; the parsers raise InnernetError
(a one-line CLI error) and nothing else; slow and idle connections do not
block a legitimate fetch.
"""
import json
import re
import socket
import string
import time

import pytest

import innernet
from helpers import call, cli_network, hypothesis_or_skips, make_coordinator, serve_on_loopback

HealthCheck, given, settings, st = hypothesis_or_skips()

BODY_ROUTES = [("POST", "/v1/user/redeem", "unredeemed"), ("PUT", "/v1/user/endpoint", "developer1"),
               ("PUT", "/v1/user/candidates", "developer1"), ("POST", "/v1/admin/peers", "admin"),
               ("PUT", "/v1/admin/peers/3", "admin"), ("POST", "/v1/admin/cidrs", "admin"),
               ("PUT", "/v1/admin/cidrs/4", "admin"), ("POST", "/v1/admin/associations", "admin"),
               ("POST", "/v1/user/routes", "developer1"), ("PUT", "/v1/admin/routes/3", "admin"),
               ("POST", "/v1/admin/route-approvers", "admin"), ("POST", "/v1/admin/plan", "admin"),
               ("POST", "/v1/admin/apply", "admin")]

# Text that breaks parsers: Unicode digits (str.isdigit() says yes, int() says no),
# every kind of white space, control characters, and the punctuation of our formats.
NASTY = list("0123456789²³٣۴१𝟓①１߀ \t\r\n\x00\x0b\x0c\x1b\x1f\x7f\x85\xa0\u2028\u3000"
             ":.,[]{}/=#\"'-_+abcz")
nasty_text = st.text(alphabet=st.sampled_from(NASTY), max_size=30)
nasty_numbers = st.sampled_from(["²", "٣٣", "۴", "१०", "𝟓", "①", "１２", "7²", " 7", "7\n",
                                 "\t7", "+7", "1_0", "0x10", "-1", "99999999999999999999999"])
nasty_endpoints = st.builds(lambda h, p: f"{h}:{p}", st.sampled_from(
    ["1.2.3.4", "[fd00::1]", "host", "", "1.2.3.4\n", "１.2.3.4"]), nasty_numbers | nasty_text)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.floats(allow_nan=True) | st.text(max_size=30) | nasty_text | nasty_numbers
    | nasty_endpoints
    | st.sampled_from(["10.80.64.9", "10.81.0.0/16", "1.2.3.4:51820", "Set", "Unset",
                       "DD5yKRfzExcV5+kDnTroDgCU15latdMjiQ59j1hEuk8=", "developer1", "",
                       "dave\n6.6.6.6 github.com #", "developer1\n", "10.80.64.９",
                       "192.168.10.0/24", "0.0.0.0/0", "10.80.0.0/24", "192.168.10.1/24"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "ip", "cidr", "parent", "cidr_id", "public_key", "endpoint",
                         "option", "content", "is_admin", "is_disabled", "is_redeemed",
                         "invite_expires", "candidates", "cidr_id_1", "cidr_id_2",
                         "persistent_keepalive_interval", "secs_since_epoch", "routes",
                         "route", "exit_node", "approved", "document", "invites", "x"]),
        children, max_size=12), max_leaves=20)

raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    nasty_text.map(str.encode),
    nasty_endpoints.map(lambda e: json.dumps({"option": "Set", "content": e}).encode()),
    st.lists(nasty_endpoints, max_size=4).map(lambda c: json.dumps(c).encode()),
    st.integers(min_value=1, max_value=20000).map(lambda n: b"[" * n),
    st.integers(min_value=1, max_value=400).map(lambda n: b'{"name": 1' + b"0" * n + b"}"),
    st.sampled_from([b"", b"{", b'{"a":', b"\xff\xfe\x00", b'"\\ud800"', b"1e99999",
                     b'{"name":"x","cidr":"10.81.0.0/16","parent":1e999}',
                     b'{"name":"x","cidr":"10.81.0.0/16","parent":' + b"9" * 5000 + b"}"]))


def snapshot(co):
    c = co.store.conn
    return [c.execute(f"SELECT * FROM {t} ORDER BY id").fetchall()
            for t in ("peers", "cidrs", "associations", "peer_routes", "route_approvers")]


UNREDEEMED_IP = "10.80.64.50"


@pytest.fixture(scope="module")
def fuzz_co(tmp_path_factory):
    co = make_coordinator(tmp_path_factory.mktemp("fuzz"))
    future = {"secs_since_epoch": int(time.time()) + 3600, "nanos_since_epoch": 0}
    body = {"name": "invitee", "ip": UNREDEEMED_IP, "cidr_id": 4, "endpoint": None,
            "public_key": innernet.public_key(innernet.generate_private_key()),
            "persistent_keepalive_interval": None, "is_admin": False, "is_disabled": False,
            "is_redeemed": False, "invite_expires": future, "candidates": []}
    assert call(co, "POST", "/v1/admin/peers", body=body)[0] == 201
    return co


def check(co, counts, method, path, who, raw):
    before = snapshot(co)
    # the invitee made by fuzz_co (kept out of test_api.IPS, which other tests share)
    ip = UNREDEEMED_IP if who == "unredeemed" else None
    status, body = call(co, method, path, who, raw=raw, ip=ip)
    counts["api requests fuzzed"] = counts.get("api requests fuzzed", 0) + 1
    assert status < 500, (method, path, raw[:100], body)
    if status >= 400:
        assert isinstance(body, dict) and body.get("error")
        assert snapshot(co) == before, "a rejected request changed the database"
    else:
        counts["fuzzed requests accepted as valid"] = \
            counts.get("fuzzed requests accepted as valid", 0) + 1


@pytest.mark.parametrize("method,path,who", BODY_ROUTES)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=json_values)
def test_json_bodies(fuzz_co, counts, method, path, who, value):
    check(fuzz_co, counts, method, path, who, json.dumps(value).encode())


@pytest.mark.parametrize("method,path,who", BODY_ROUTES)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=raw_bodies)
def test_raw_bodies(fuzz_co, counts, method, path, who, raw):
    check(fuzz_co, counts, method, path, who, raw)


@settings(max_examples=200, deadline=None)
@given(path=st.text(alphabet=string.printable, max_size=60) | nasty_text
       | nasty_numbers.map(lambda n: f"user/state?wait={n}")
       | nasty_numbers.map(lambda n: f"admin/peers/{n}"),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
def test_paths_and_methods(fuzz_co, counts, path, method):
    before = snapshot(fuzz_co)
    status, _ = call(fuzz_co, method, "/v1/" + path, "user1", raw=b"{}")
    counts["api requests fuzzed"] = counts.get("api requests fuzzed", 0) + 1
    assert status < 500 and (status < 300 or snapshot(fuzz_co) == before)


# -- file parsers -------------------------------------------------------------------

def parsers():
    return [lambda t: innernet.InterfaceConfig.from_toml(t, "f"),
            lambda t: innernet.ServerConfig.from_toml(t, "f"),
            lambda t: innernet.parse_data_store(t, "f"),
            lambda t: innernet.update_hosts_text(t, "innernet x", ["1.1.1.1 a"]),
            lambda t: innernet.toml_loads(t, "f")]


toml_like = st.lists(st.one_of(
    nasty_endpoints.map(lambda e: f'external-endpoint = "{e}"'),
    nasty_numbers.map(lambda n: f"listen-port = {n}"),
    nasty_text.map(lambda t: f'network-name = "{t}"'),
    st.sampled_from(["[interface]", "[server]", "[peer-endpoint-overrides]", "[[x]]",
                     'network-name = "evilcorp"', 'address = "10.66.2.1/16"',
                     'private-key = "SGb+ojrRNDuMePufwtIYhXzA//k6wF3R21tEBgKlzlM="',
                     'public-key = "DD5yKRfzExcV5+kDnTroDgCU15latdMjiQ59j1hEuk8="',
                     'external-endpoint = "1.2.3.4:51820"', 'internal-endpoint = "10.66.0.1:1"',
                     "listen-port = 99999999999999999999", 'listen-port = "x"', "a = [1, [2]]",
                     '"10.66.2.7" = "1.2.3.4:5"', "key = 'lit", 'k = "\\u12"', "# DO NOT EDIT innernet x BEGIN",
                     "# DO NOT EDIT innernet x END", '{"version": "1", "peers": [{}]}']),
    st.text(max_size=40)), max_size=12).map("\n".join)


@pytest.mark.parametrize("index", range(5))
@settings(max_examples=300, deadline=None)
@given(text=st.one_of(toml_like, st.text(max_size=300), nasty_text,
                      st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_file_parsers_raise_only_innernet_errors(counts, index, text):
    counts["file contents fuzzed"] = counts.get("file contents fuzzed", 0) + 1
    try:
        parsers()[index](text)
    except innernet.InnernetError as e:
        assert e.message and "\n" not in e.message


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=300))
def test_install_with_garbage_invitation_is_one_clear_error(tmp_path_factory, capsys, counts,
                                                          data):
    d = tmp_path_factory.mktemp("inv")
    path = d / "invite.toml"
    path.write_bytes(data)
    assert innernet.main(["-c", str(d / "etc"), "-d", str(d / "lib"), "install",
                          str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("innernet: error:") and "Traceback" not in err
    counts["CLI runs with garbage files"] = counts.get("CLI runs with garbage files", 0) + 1


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(port=nasty_numbers | nasty_text, expires=nasty_numbers.map(lambda n: n + "d") | nasty_text)
def test_cli_numbers_are_one_clear_error(tmp_path_factory, capsys, counts, port, expires):
    d = tmp_path_factory.mktemp("cli")
    base = ["-c", str(d / "etc"), "-d", str(d / "lib"), "server"]
    code = innernet.main(base + ["new", "--network-name", "evil", "--network-cidr",
                                 "10.66.0.0/16", "--external-endpoint", "1.2.3.4:51820",
                                 f"--listen-port={port}"])
    err = capsys.readouterr().err
    if re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535:
        assert code == 0, err                         # a plain ASCII port is a port
        d = tmp_path_factory.mktemp("cli")
    else:
        assert code == 1 and err.startswith("innernet: error:") and "Traceback" not in err
    base = cli_network(d, capsys)     # (after a refusal: nothing was left half-made)
    code = innernet.main(base + ["add-peer", "evil", "--name", "p", "--cidr", "h", "--auto-ip",
                                 "--admin", "false", "--save-config", str(d / "p.toml"),
                                 f"--invite-expires={expires}", "--yes"])
    err = capsys.readouterr().err
    assert code == 1 and "invalid duration" in err and "Traceback" not in err
    assert not (d / "p.toml").exists()
    counts["CLI runs with hostile numbers"] = counts.get("CLI runs with hostile numbers", 0) + 2


@pytest.fixture(scope="module")
def http_co(tmp_path_factory):
    co = make_coordinator(tmp_path_factory.mktemp("http"))
    with serve_on_loopback(co) as port:
        yield co, port


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(length=nasty_numbers | nasty_text.map(lambda t: t.replace("\n", "").replace("\r", "")),
       wait=nasty_numbers | nasty_text.map(lambda t: t.replace("\n", "").replace("\r", "")
                                           .replace(" ", "")),
       latin1=st.booleans())
def test_http_headers_and_queries_always_get_an_answer(http_co, counts, length, wait, latin1):
    co, port = http_co
    enc = (lambda t: t.encode("latin-1", "replace")) if latin1 else str.encode
    for req in (b"PUT /v1/user/candidates HTTP/1.1\r\nHost: x\r\n"
                + f"{innernet.SERVER_KEY_HEADER}: {co.public_key}\r\n".encode()
                + b"Content-Length: " + enc(length) + b"\r\nConnection: close\r\n\r\n[]"
                + b" " * innernet.MAX_BODY,    # any length the server accepts is there
                b"GET /v1/user/state?wait=" + enc(wait).replace(b"#", b"") + b" HTTP/1.1\r\n"
                + f"Host: x\r\n{innernet.SERVER_KEY_HEADER}: {co.public_key}\r\n".encode()
                + b"If-None-Match: \"x\"\r\nConnection: close\r\n\r\n"):
        s = socket.create_connection(("127.0.0.1", port), timeout=10,
                                     source_address=("127.1.0.3", 0))
        s.sendall(req)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
        s.close()
        assert data.startswith(b"HTTP/1."), (req, data)
        status = int(data.split()[1])
        assert status < 500, (req, data[:200])
        counts["hostile HTTP headers and queries answered"] = \
            counts.get("hostile HTTP headers and queries answered", 0) + 1


# -- slow and idle clients ------------------------------------------------------------

def test_idle_and_slow_connections_do_not_block_a_fetch(tmp_path, counts):
    co = make_coordinator(tmp_path)
    socks = []
    with serve_on_loopback(co) as port:
        try:
            for i in range(600):                   # idle: more than any bound, from one peer
                try:
                    socks.append(socket.create_connection(("127.0.0.1", port), timeout=2,
                                                          source_address=("127.1.0.4", 0)))
                except OSError:
                    pass
            for i in range(50):                                    # slow: one byte at a time
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=2,
                                                 source_address=("127.1.0.5", 0))
                    s.sendall(b"GET /v1/user/st")
                    socks.append(s)
                except OSError:
                    pass
            start = time.monotonic()
            api = innernet.ApiClient(f"127.0.0.1:{port}", co.public_key, timeout=5,
                                     source_address=("127.1.0.3", 0))
            state = api.call("GET", "/user/state")
            assert {p["name"] for p in state["peers"]} >= {"developer1"}
            counts["idle/slow connections held open during a successful fetch"] = len(socks)
            print(f"fetch succeeded in {time.monotonic() - start:.3f} s with {len(socks)} "
                  "idle/slow connections open")
        finally:
            for s in socks:
                s.close()
