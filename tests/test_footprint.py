"""What the server and a fetch load: the modules that cost memory stay out.

bench/footprint.py measures the resident memory; these guard its causes,
in a fresh interpreter: http.server (with http.client, email, ssl),
hashlib/hmac (OpenSSL), PyNaCl, pyroute2 and shutil (bz2, lzma) are not
imported by serving state requests or by the argument parser.
"""
import json
import os
import subprocess
import sys

import innernet
from helpers import HEAVY, ROOT


SERVE = r"""
import json, sys, threading
sys.path.insert(0, sys.argv[1])
import innernet
heavy = json.loads(sys.argv[2])
key = innernet.generate_private_key()
store = innernet.Store(sys.argv[3], create=True)
store.create_network("lo", innernet.parse_network("127.0.0.0/8"), innernet.parse_ip("127.0.0.1"),
                     innernet.public_key(key), "127.0.0.1:1")
store.add_cidr(innernet.Cidr(None, "humans", "127.1.0.0/16", 1))
store.add_peer(innernet.Peer(None, "me", "127.1.0.1", 3, innernet.public_key(
    innernet.generate_private_key()), is_admin=True, is_redeemed=True))
co = innernet.Coordinator(store, innernet.ServerConfig(key, 0, "127.0.0.1", 8), "lo",
                          local_callers=True)
httpd = innernet.make_api_server(co, "127.0.0.1", 0)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
api = innernet.ApiClient(f"127.0.0.1:{httpd.server_address[1]}", co.public_key,
                         source_address=("127.1.0.1", 0))
for path in ("/user/state", "/user/state", "/admin/peers"):
    api.call("GET", path)
innernet.build_parser(True)
innernet.build_parser(False)
httpd.shutdown()
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def test_serving_and_parsing_load_none_of_the_heavy_modules(tmp_path):
    r = subprocess.run([sys.executable, "-S", "-c", SERVE, ROOT, json.dumps(HEAVY),
                        str(tmp_path / "t.db")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_which_finds_programs_as_shutil_does(tmp_path, monkeypatch):
    prog = tmp_path / "tool"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    (tmp_path / "dir").mkdir()
    (tmp_path / "plain").write_text("")
    monkeypatch.setenv("PATH", f"/nonexistent:{tmp_path}")
    assert innernet.which("tool") == str(prog)
    assert innernet.which(str(prog)) == str(prog)
    assert innernet.which("dir") is None and innernet.which("plain") is None
    assert innernet.which("no-such-tool-here") is None


def test_public_keys_are_cached_per_private_key():
    k = innernet.generate_private_key()
    assert innernet.public_key(k) == innernet.public_key(k)
    assert innernet.parse_key(k) in innernet._PUBLIC_KEYS


def test_observe_streams_the_same_answer_get_parses(monkeypatch):
    """The server's per-second read of endpoints and handshakes, fed a UAPI
    answer in 7-byte pieces, agrees with the full parse of the same text."""
    import socket
    import threading
    keys = [innernet.public_key(innernet.generate_private_key()) for _ in range(3)]
    text = ("private_key=" + "11" * 32 + "\nlisten_port=51820\n"
            f"public_key={innernet.key_to_hex(keys[0])}\nendpoint=198.18.0.5:51820\n"
            "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\n"
            "allowed_ip=10.0.0.2/32\nrx_bytes=10\n"
            f"public_key={innernet.key_to_hex(keys[1])}\nlast_handshake_time_sec=0\n"
            "last_handshake_time_nsec=0\n"
            f"public_key={innernet.key_to_hex(keys[2])}\nendpoint=[fd00::2]:4000\n"
            "errno=0\n\n").encode()

    def connect(self, ifname):
        ours, theirs = socket.socketpair()

        def answer():
            theirs.recv(100)
            for i in range(0, len(text), 7):
                theirs.sendall(text[i:i + 7])
            theirs.close()
        threading.Thread(target=answer, daemon=True).start()
        return ours
    monkeypatch.setattr(innernet.UserspaceBackend, "_connect", connect)
    backend = innernet.UserspaceBackend()
    seen = backend.observe("wg0")
    full = {p.public_key: (p.endpoint, p.last_handshake) for p in backend.get("wg0").peers}
    assert seen == full == {keys[0]: ("198.18.0.5:51820", 1700000000.5),
                            keys[1]: (None, 0.0), keys[2]: ("[fd00::2]:4000", 0.0)}


def test_serve_starts_again_once_with_a_fixed_mmap_threshold():
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import innernet; "
            "print('start', flush=True); innernet._fixed_mmap_threshold(); "
            "print(os.environ['MALLOC_MMAP_THRESHOLD_'], sys.argv[2])")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    r = subprocess.run([sys.executable, "-c", code, ROOT, "kept"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n") == ["start", "start", "131072 kept", ""]   # once, same argv
    r = subprocess.run([sys.executable, "-c", code, ROOT, "mine"], capture_output=True,
                       text=True, timeout=60, env=dict(env, MALLOC_MMAP_THRESHOLD_="65536"))
    assert r.stdout.split("\n") == ["start", "65536 mine", ""]             # the user's own
