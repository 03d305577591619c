"""Shared pieces of the benchmarks: a synthetic network, a server process, probes.

Loopback benchmarks put every peer at 127.1.x.y, so a client that binds that
source address is that peer (the server identifies callers by source IP).
"""
import base64
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import innernet  # noqa: E402


def synthetic_network(path, n, *, root="127.0.0.0/8", cidr="127.1.0.0/16", server_ip="127.0.0.1",
                      endpoint=None):
    """A database with ``n`` redeemed peers in one CIDR; returns (server key, peer IPs)."""
    key = innernet.generate_private_key()
    store = innernet.Store(path, create=True)
    store.create_network("bench", innernet.parse_network(root), innernet.parse_ip(server_ip),
                         innernet.public_key(key), endpoint or f"{server_ip}:51820")
    c = store.add_cidr(innernet.Cidr(None, "peers", cidr, 1))
    net = innernet.parse_network(cidr)
    ips = [str(net.network_address + 2 + i) for i in range(n)]
    rows = [(f"peer{i}", ip, c.id, base64.b64encode(os.urandom(32)).decode(),
             f"198.18.{(i >> 8) & 255}.{i & 255}:51820", 0, 0, 1, None,
             json.dumps([f"192.168.{(i >> 8) & 255}.{i & 255}:51820"]))
            for i, ip in enumerate(ips)]
    with store.write() as conn:
        conn.executemany("INSERT INTO peers (name, ip, cidr_id, public_key, endpoint, is_admin, "
                         "is_disabled, is_redeemed, invite_expires, candidates) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    store.close()
    return key, ips


def synthetic_server(lab, n):
    """A lab host 'srv' whose network (10.66.0.0/16) has ``n`` peers in CIDR
    'peers', and an invitation for one more, 'client', at srv.path("c.toml").
    Returns (srv, network name, server private key); `serve` is not started."""
    import innernet as I
    srv = lab.add_host("srv")
    net = lab.ifname("n")
    etc, lib = srv.path("server", "etc"), srv.path("server", "lib")
    os.makedirs(etc, mode=0o700)
    os.makedirs(lib, mode=0o700)
    key, _ = synthetic_network(os.path.join(lib, f"{net}.db"), n, root="10.66.0.0/16",
                               cidr="10.66.64.0/18", server_ip="10.66.0.1",
                               endpoint=f"{srv.underlay}:51820")
    I.atomic_write(os.path.join(etc, f"{net}.conf"),
                   I.ServerConfig(key, 51820, "10.66.0.1", 16).to_toml())
    srv.server("add-peer", net, "--name", "client", "--cidr", "peers", "--admin", "false",
               "--auto-ip", "--save-config", srv.path("c.toml"), "--invite-expires", "1h",
               "--yes")
    return srv, net, key


def timed(argv):
    """(wall ms, peak RSS MiB). GNU time forks from its own small image: a
    child of this (large) process would inherit its high-water mark."""
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss=%M"] + argv,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise AssertionError(f"{argv} failed: {proc.stderr}")
    rss = int(proc.stderr.strip().splitlines()[-1].split("=")[1])
    return wall * 1000, rss / 1024


SERVER = r"""
import sys, threading
sys.path.insert(0, sys.argv[1])
import innernet
db, key, cache = sys.argv[2], sys.argv[3], sys.argv[4] == "cache"
cfg = innernet.ServerConfig(key, 51820, "127.0.0.1", 8)
co = innernet.Coordinator(innernet.Store(db), cfg, "bench", local_callers=True)
co.views.cache_enabled = cache
httpd = innernet.make_api_server(co, "127.0.0.1", 0)
print(httpd.server_address[1], flush=True)
httpd.serve_forever()
"""


class ServerProcess:
    """innernet.py's API server in a child process, on loopback."""

    def __init__(self, db, key, cache=True):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, ROOT, db, key,
                                      "cache" if cache else "nocache"],
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        self.public_key = innernet.public_key(key)

    def cpu(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self, field="VmRSS"):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RawClient(innernet.ApiClient):
    """The module's API client as a peer at ``source_ip``, counting the bytes
    on the wire (``sent``, ``received``); without gzip unless asked, as
    innernet's client."""

    def __init__(self, port, source_ip, server_key):
        super().__init__(f"127.0.0.1:{port}", server_key, timeout=30,
                         source_address=(source_ip, 0))

    def get(self, path, headers=()):
        """(status, headers with lower-case names, body) of GET ``path``."""
        return self.request("GET", path[3:] if path.startswith("/v1/") else path,
                            headers=dict([("Accept-Encoding", "identity"), *headers]))


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def quick():
    return "--quick" in sys.argv


def table(title, header, rows):
    """Print a Markdown table (the format bench/README.md quotes)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    sys.stdout.flush()
