"""What an innernet server lacks: one line per feature, asked for once (issue 27)."""
import http.server
import os
import threading

import pytest

import innernet

KEY = "A" * 43 + "="
_BODY = []


@pytest.fixture
def innernet_like():
    """A server answering every route 404 with an empty body, as innernet's does;
    returns (endpoint, list of the paths it was asked for)."""
    asked, body = [], _BODY      # body: what to answer instead of nothing

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            asked.append((self.command, self.path))
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
            data = body[0] if body else b""
            self.send_response(404)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{srv.server_address[1]}", asked
    srv.shutdown()


def test_extension_routes_name_their_feature():
    assert innernet.extension_of("PUT", "/admin/cidrs/4")[0] == "CIDR renaming"
    assert innernet.extension_of("GET", "/admin/cidrs") is None          # innernet's own
    assert innernet.extension_of("GET", "/user/rotations?ip=10.0.0.1")[0] == "key rotation"
    assert innernet.extension_of("POST", "/user/relay")[0] == "end-to-end relay"
    assert innernet.extension_of("GET", "/user/state") is None


def test_a_missing_feature_is_one_line_asked_for_once(tmp_path, innernet_like):
    endpoint, asked = innernet_like
    path = str(tmp_path / "net.lacks.json")
    api = innernet.ApiClient(endpoint, KEY, lacks=innernet.ServerLacks(path, KEY))
    with pytest.raises(innernet.InnernetError) as e:
        api.call("POST", "/user/rotation", {})
    assert e.value.message == ("the server is innernet 1.5.5 (or another innernet server) "
                               "and has no key rotation")
    assert e.value.hint and e.value.learned
    assert os.stat(path).st_mode & 0o777 == 0o600
    api = innernet.ApiClient(endpoint, KEY, lacks=innernet.ServerLacks(path, KEY))
    with pytest.raises(innernet.InnernetError) as e:
        api.call("POST", "/user/rotation", {})
    assert not e.value.learned and asked == [("POST", "/v1/user/rotation")]
    # another server (another key) is asked again
    other = innernet.ServerLacks(path, "B" * 43 + "=")
    assert not other.lacks("key rotation")


def test_innernet_capabilities_are_remembered_and_forgotten(tmp_path, innernet_like):
    endpoint, asked = innernet_like
    lacks = innernet.ServerLacks(str(tmp_path / "net.lacks.json"), KEY)
    api = innernet.ApiClient(endpoint, KEY, lacks=lacks)
    assert innernet.server_caps(api) == {}                  # 1.5.5 has no such route
    assert innernet.is_innernet_server(innernet.server_caps(api))
    assert asked == [("GET", "/v1/user/capabilities")]
    lacks.forget()                                          # it turned out to be ours
    assert lacks.capabilities() is None and not os.path.exists(lacks.path)


def test_an_error_from_our_server_is_not_taken_for_a_missing_feature(tmp_path, innernet_like):
    # ours says why (e.g. serve --no-relay); only innernet answers an empty 404
    endpoint, asked = innernet_like
    lacks = innernet.ServerLacks(str(tmp_path / "net.lacks.json"), KEY)
    api = innernet.ApiClient(endpoint, KEY, lacks=lacks)
    _BODY.append(b'{"error": "this server does not relay"}')
    try:
        with pytest.raises(innernet.InnernetError) as e:
            api.call("POST", "/user/relay", {"peers": []})
    finally:
        _BODY.clear()
    assert "this server does not relay" in e.value.message
    assert not lacks.lacks("end-to-end relay") and asked == [("POST", "/v1/user/relay")]
