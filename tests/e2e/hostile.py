"""A scripted hostile server: the server double our client talks to over the
real tunnel, answering each request with what a test scripts (issue 28).

A test sets up a network with the real server and joins its clients, then
takes the server over (``take_over``): the real `serve` stops, its WireGuard
device stays up with its peers (wireguard-go outlives it), and this double
listens where the API was, on the server's overlay address and API port, in
the server's namespace. The clients notice nothing: the same key answers
their handshakes, the same address their HTTP.

The script is a JSON file, read again at every request, so a test changes
the answers between two fetches without a restart:

    {"GET /v1/user/state": {"status": 200, "body": {...}},
     "GET /v1/user/rotations?ip=10.66.1.1": {"status": 200, "body": [...]},
     "GET /v1/user/capabilities": {"status": 200, "body": {"dns": "com"}}}

A key with a query string wins over the bare path. Unscripted requests get
404, as from innernet's server, except our client's candidate and endpoint
reports (204). A redeem the script answers with 2xx is also done on the
device, as the server does: the caller's address goes to the key it sent,
so a joining client's new key gets its handshake. Every request is logged,
one JSON line each (method, path, body), so a test can say what the client
asked. Run as a program it is the double itself:
``hostile.py ADDRESS PORT SCRIPT LOG DEVICE``.
"""
import hashlib
import json
import os
import sys

DEFAULTS = {"PUT /v1/user/candidates": {"status": 204},
            "PUT /v1/user/endpoint": {"status": 204}}


def answer(script, method, path):
    """(status, body or None) for one request, from the script."""
    bare = path.split("?", 1)[0]
    for key in (f"{method} {path}", f"{method} {bare}"):
        if key in script:
            a = script[key]
            return a.get("status", 200), a.get("body")
        if key in DEFAULTS:
            return DEFAULTS[key]["status"], None
    return 404, {"error": f"no route for {method} {bare}"}


def redeem_on_device(device, caller_ip, body):
    """What the server does at a redeem: the caller's /32 to its new key."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    import innernet
    key = json.loads(body)["public_key"]
    innernet.UserspaceBackend().apply(device, updates=[innernet.PeerUpdate(
        key, allowed_ips=[f"{caller_ip}/32"], keepalive=25)])


def serve(address, port, script_path, log_path, device):
    """The double: HTTP/1.1 on address:port, answers from the script file."""
    import http.server
    import socketserver

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def handle_one(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            with open(script_path) as f:
                script = json.load(f)
            status, out = answer(script, self.command, self.path)
            if self.path == "/v1/user/redeem" and 200 <= status < 300:
                redeem_on_device(device, self.client_address[0], body)
            with open(log_path, "a") as f:
                f.write(json.dumps({"method": self.command, "path": self.path,
                                    "body": body.decode(errors="replace")}) + "\n")
            data = b"" if out is None or status in (204, 304) else json.dumps(out).encode()
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest()[:16] + '"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = handle_one

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    httpd = Server((address, port), Handler)
    print("listening", flush=True)
    httpd.serve_forever()


# -- the test side -------------------------------------------------------------

class HostileServer:
    """The double running on a lab host; ``script`` sets its answers."""

    def __init__(self, host, address, port, device):
        self.host, self.address, self.port, self.device = host, address, port, device
        self.script_path = host.path("hostile-script.json")
        self.log_path = host.path("hostile-requests.log")
        self.proc = None

    def script(self, answers):
        """Replace the answers (atomically: a request reads old or new, whole)."""
        tmp = self.script_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(answers, f)
        os.replace(tmp, self.script_path)

    def start(self, answers):
        from lab import wait_for
        self.script(answers)
        open(self.log_path, "w").close()
        self.proc = self.host.spawn([sys.executable, os.path.abspath(__file__), self.address,
                                     str(self.port), self.script_path, self.log_path,
                                     self.device],
                                    "hostile.log")
        wait_for(lambda: "listening" in self.host.log("hostile.log"), 20, "the hostile server")
        return self

    def requests(self):
        """Every request so far: [(method, path)]."""
        with open(self.log_path) as f:
            return [(r["method"], r["path"]) for r in map(json.loads, f)]


STATE = r"""
import json, sys, urllib.request
req = urllib.request.Request(f"http://{sys.argv[1]}/v1/user/state",
                             headers={"X-Innernet-Server-Key": sys.argv[2]})
print(urllib.request.urlopen(req, timeout=10).read().decode())
"""


def honest_state(host, endpoint, server_key):
    """The state the real server sends ``host`` (through its own tunnel)."""
    return json.loads(host.python(STATE, endpoint, server_key).stdout)


def take_over(srv, serve_proc, address, port, device, answers):
    """Stop the real `serve` (its device stays up) and start the double there."""
    serve_proc.terminate()
    serve_proc.wait(timeout=20)
    return HostileServer(srv, address, port, device).start(answers)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
