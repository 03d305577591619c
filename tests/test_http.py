"""Our HTTP/1.1 server layer: what it takes, what it refuses, on a real socket.

innernet.py serves the API with its own small HTTP parser on a plain socket
(http.server costs the server 8 MB of memory). These tests hold it to what
http.server did for us: every refusal a JSON reason and a closed connection,
keep-alive by the HTTP version's rules, Expect: 100-continue.
"""
import json
import socket

import pytest

import innernet
from helpers import make_coordinator, serve_on_loopback


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    co = make_coordinator(tmp_path_factory.mktemp("http"))
    with serve_on_loopback(co) as p:
        yield co, p


def exchange(port, raw, *, source="127.1.0.3"):
    """Send raw bytes; every byte the server sends until it closes (or 10 s)."""
    co, p = port
    s = socket.create_connection(("127.0.0.1", p), timeout=10, source_address=(source, 0))
    try:
        s.sendall(raw.replace(b"KEY", co.public_key.encode()))
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
        return data
    finally:
        s.close()


def responses(data):
    """[(status, {header: value}, body)] of a byte stream of HTTP responses."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        out.append((status, headers, rest[:n]))
        data = rest[n:]
    return out


STATE = b"GET /v1/user/state HTTP/1.1\r\nHost: x\r\nX-Innernet-Server-Key: KEY\r\n"


def test_keep_alive_by_version(port):
    # HTTP/1.1 keeps the connection until "Connection: close"
    got = responses(exchange(port, STATE + b"\r\n" + STATE + b"Connection: close\r\n\r\n"))
    assert [r[0] for r in got] == [200, 200] and got[1][1]["connection"] == "close"
    assert json.loads(got[0][2])["peers"]
    # HTTP/1.0 closes after one, unless asked to keep alive
    one = STATE.replace(b"HTTP/1.1", b"HTTP/1.0") + b"\r\n"
    assert len(responses(exchange(port, one + one))) == 1
    kept = STATE.replace(b"HTTP/1.1", b"HTTP/1.0") + b"Connection: keep-alive\r\n\r\n"
    assert len(responses(exchange(port, kept + one))) == 2


def test_header_names_in_any_case(port):
    got = responses(exchange(port, STATE.replace(b"X-Innernet-Server-Key",
                                                 b"x-INNERNET-server-kEy") + b"\r\n"))
    assert got[0][0] == 200


@pytest.mark.parametrize("raw,status,reason", [
    (b"GET /v1/user/state\r\n\r\n", 400, "HTTP/1.0 or newer"),
    (b"GET /v1/user/state HTTP/2.0\r\n\r\n", 505, "not supported"),
    (b"GET /v1/user/state HTCPCP/1.0\r\n\r\n", 400, "bad request version"),
    (b"GET\r\n\r\n", 400, "bad request syntax"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n", 400, "bad"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, "too long"),
    (STATE + b"X-Long: " + b"b" * 70000 + b"\r\n\r\n", 431, "too long"),
    (STATE + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n", 431, "too many"),
    (STATE + b"no colon here\r\n\r\n", 400, "bad header line"),
    (STATE + b" folded: x\r\n\r\n", 400, "bad header line"),
    (b"PUT /v1/user/endpoint HTTP/1.1\r\nX-Innernet-Server-Key: KEY\r\nContent-Length: 2\r\n"
     b"Content-Length: 200\r\n\r\n{}", 400, "conflicting"),
    (b"PATCH /v1/user/state HTTP/1.1\r\n\r\n", 501, "unsupported method"),
    (b"HEAD /v1/user/state HTTP/1.1\r\n\r\n", 501, "unsupported method"),
    (STATE + b"Expect: tea\r\n\r\n", 417, "Expect"),
    (b"PUT /v1/user/endpoint HTTP/1.1\r\nX-Innernet-Server-Key: KEY\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400, "chunked"),
])
def test_refusals_are_json_and_close(port, raw, status, reason):
    got = responses(exchange(port, raw + STATE + b"\r\n"))   # nothing after a refusal is read
    assert len(got) == 1, got
    code, headers, body = got[0]
    assert code == status and headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    if raw.startswith(b"HEAD"):
        assert body == b""                  # a HEAD answer has no body
    else:
        assert reason in json.loads(body)["error"]


def test_expect_100_continue(port):
    co, p = port
    s = socket.create_connection(("127.0.0.1", p), timeout=10, source_address=("127.1.0.3", 0))
    try:
        s.sendall(b"PUT /v1/user/candidates HTTP/1.1\r\nX-Innernet-Server-Key: "
                  + co.public_key.encode() + b"\r\nContent-Length: 2\r\n"
                  b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"[]")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert responses(data)[0][0] == 204
    finally:
        s.close()


def test_heads_are_parsed_without_the_network():
    method, target, version, headers = innernet.parse_http_head(
        [b"GET /a?b=c HTTP/1.1", b"Host: x", b"A-B:  spaced  ", b"a-b: second"])
    assert (method, target, version) == ("GET", "/a?b=c", "HTTP/1.1")
    assert headers.get("a-B") == "spaced" and headers.get("missing", 7) == 7
    with pytest.raises(innernet._HttpRefusal):
        innernet.parse_http_head([b"GET / HTTP/1.1", b"Host: a", b"Host: b"])


def test_a_garbage_request_line_is_answered_before_any_header(port):
    co, p = port
    s = socket.create_connection(("127.0.0.1", p), timeout=5, source_address=("127.1.0.3", 0))
    try:
        s.sendall(b"ping\n")                  # and nothing more: no blank line follows
        data = s.recv(4096)
        assert data.startswith(b"HTTP/1.1 400 ") and b"bad request syntax" in data
    finally:
        s.close()
