"""A network in namespaces over real wireguard-go tunnels, driven by innernet.pyz.

Hosts: a server, an admin peer, p1 and p2 in CIDR 'humans', and p3 in CIDR
'robots' that the admin creates over the API. p2 runs innernet.py with
Debian's Python (python3-nacl, pyroute2 0.7.2) where that is installed; the
others run the built .pyz with a bare Python (pure-Python keys, vendored
pyroute2 0.9). Issue 2, acceptance item 2.
"""
import os
import sqlite3
import time

import pytest

from lab import (ROOT, Lab, invite, link_bytes, start_echo, start_network, start_serve, tcp_reach,
                 wait_for)

from .conftest import BARE, debian_python_with_deps

pytestmark = pytest.mark.netns


class Mesh:
    pass


def commands(pyz):
    """The .pyz by default; INNERNET_E2E_CMD/INNERNET_E2E_SERVER_CMD run the
    same test with installed commands (tests/e2e/test_package.py: the .deb)."""
    if os.environ.get("INNERNET_E2E_CMD"):
        return (os.environ["INNERNET_E2E_CMD"].split(),
                os.environ.get("INNERNET_E2E_SERVER_CMD", "").split() or None)
    return BARE + [pyz], None


@pytest.fixture(scope="module")
def mesh(pyz):
    client_cmd, server_cmd = commands(pyz)
    lab = Lab(innernet_cmd=client_cmd, server_cmd=server_cmd)
    m = Mesh()
    m.lab = lab
    try:
        debian = debian_python_with_deps() if server_cmd is None else None
        m.srv, m.net, _ = start_network(lab, {"humans": "10.66.1.0/24"}, serve=False)
        m.admin = lab.add_host("admin")
        m.p1 = lab.add_host("p1")
        m.p2 = lab.add_host("p2", innernet_cmd=[debian, os.path.join(ROOT, "innernet.py")]
                            if debian else None)
        m.p3 = lab.add_host("p3")
        srv, net = m.srv, m.net
        for name, admin in (("admin", "true"), ("p1", "false"), ("p2", "false")):
            invite(srv, net, name, "humans", admin=admin, expires="30d")
        m.serve = start_serve(srv, net, "--hosts-path", srv.hosts_path)
        m.join_seconds = {}
        for host in (m.admin, m.p1, m.p2):
            m.join_seconds[host.name] = join(m, host, srv.path(f"{host.name}.toml"))
        # The admin, over the API: a CIDR and a peer in it; p3 joins with that invitation.
        m.admin.innernet("add-cidr", m.ifname(m.admin), "--name", "robots", "--cidr",
                         "10.66.2.0/24", "--parent", net, "--yes")
        m.admin.innernet("add-peer", m.ifname(m.admin), "--name", "p3", "--cidr", "robots",
                         "--admin", "false", "--auto-ip", "--save-config", m.admin.path("p3.toml"),
                         "--invite-expires", "30s", "--yes")
        m.join_seconds["p3"] = join(m, m.p3, m.admin.path("p3.toml"), delete=True)
        for host in (m.p1, m.p2, m.p3):
            start_echo(host, ip(m, host))
        yield m
    finally:
        lab.close()


def join(m, host, invite, delete=False):
    start = time.monotonic()
    host.innernet("install", "--name", m.ifname(host), "--hosts-path", host.hosts_path,
                  *(["--delete-invite"] if delete else []), invite)
    return time.monotonic() - start


Mesh.ifname = lambda self, host: self.lab.ifname(host.name)


def ip(m, host):
    cfg = open(host.path("client", "etc", f"{m.ifname(host)}.conf")).read()
    return cfg.split('address = "')[1].split("/")[0]


def fetch(m, *hosts):
    for h in hosts:
        h.innernet("fetch", m.ifname(h), "--hosts-path", h.hosts_path)


def test_everyone_joined_with_distinct_addresses(mesh):
    ips = {h.name: ip(mesh, h) for h in (mesh.admin, mesh.p1, mesh.p2, mesh.p3)}
    assert ips == {"admin": "10.66.1.1", "p1": "10.66.1.2", "p2": "10.66.1.3", "p3": "10.66.2.1"}
    print("join seconds:", {k: round(v, 2) for k, v in mesh.join_seconds.items()})
    assert not os.path.exists(mesh.admin.path("p3.toml"))        # --delete-invite


def test_peers_in_one_cidr_reach_each_other(mesh):
    fetch(mesh, mesh.p1, mesh.p2)
    assert wait_for(lambda: tcp_reach(mesh.p1, ip(mesh, mesh.p2)), 20, "p1 -> p2")
    assert wait_for(lambda: tcp_reach(mesh.p2, ip(mesh, mesh.p1)), 20, "p2 -> p1")


def test_unassociated_cidrs_cannot_reach_each_other(mesh):
    fetch(mesh, mesh.p1, mesh.p3)
    assert not tcp_reach(mesh.p1, ip(mesh, mesh.p3), timeout=2)
    assert not tcp_reach(mesh.p3, ip(mesh, mesh.p1), timeout=2)
    tree = mesh.p3.innernet("show", "--tree").stdout
    assert "robots" in tree and "p3 (you)" in tree and "p1" not in tree


def test_association_opens_the_path_after_fetch(mesh):
    mesh.admin.innernet("add-association", mesh.ifname(mesh.admin), "humans", "robots")
    listed = mesh.admin.innernet("list-associations", mesh.ifname(mesh.admin)).stdout
    assert listed.strip() == "1: humans <=> robots"
    fetch(mesh, mesh.p1, mesh.p3)
    assert wait_for(lambda: tcp_reach(mesh.p1, ip(mesh, mesh.p3)), 20, "p1 -> p3")
    assert wait_for(lambda: tcp_reach(mesh.p3, ip(mesh, mesh.p1)), 20, "p3 -> p1")
    hosts = open(mesh.p3.hosts_path).read()
    assert f"10.66.1.2 p1.{mesh.ifname(mesh.p3)}.wg" in hosts


def test_traffic_between_peers_goes_direct(mesh):
    fetch(mesh, mesh.p1, mesh.p2)
    wait_for(lambda: tcp_reach(mesh.p1, ip(mesh, mesh.p2)), 20, "p1 -> p2")
    before = link_bytes(mesh.srv)
    payload = 2_000_000
    out = mesh.p1.python(
        "import socket,sys; s=socket.create_connection((sys.argv[1],7000),timeout=20); "
        "s.sendall(b'x'*int(sys.argv[2])+b'\\n'); print(s.recv(100).decode())",
        ip(mesh, mesh.p2), payload, timeout=60).stdout
    assert out.startswith(f"pong {payload + 1}")
    after = link_bytes(mesh.srv)
    through_server = (after[0] - before[0]) + (after[1] - before[1])
    print(f"{payload} bytes p1 -> p2; the server's link saw {through_server} bytes")
    assert through_server < payload // 20
    show = mesh.p1.innernet("show", "--json").stdout
    assert mesh.p2.underlay + ":" in show        # p1's device talks to p2's own address


def test_invitation_cannot_be_redeemed_twice(mesh):
    again = mesh.lab.add_host("dup")
    r = again.innernet("install", "--name", mesh.lab.ifname("dup"), "--no-write-hosts",
                       mesh.srv.path("p1.toml"), check=False, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "innernet: error:" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(again.path("client", "etc", f"{mesh.lab.ifname('dup')}.conf"))
    assert not os.path.exists(f"/var/run/wireguard/{mesh.lab.ifname('dup')}.sock")


def test_expired_invitation_is_refused(mesh):
    mesh.srv.server("add-peer", mesh.net, "--name", "late", "--cidr", "humans", "--admin",
                    "false", "--ip", "10.66.1.200", "--save-config", mesh.srv.path("late.toml"),
                    "--invite-expires", "1s", "--yes")
    (expires,), = sqlite3.connect(mesh.srv.path("server", "lib", f"{mesh.net}.db")).execute(
        "SELECT invite_expires FROM peers WHERE name = 'late'").fetchall()
    wait_for(lambda: time.time() > expires + 0.5, 5, "the invitation to expire")
    late = mesh.lab.add_host("late")
    r = late.innernet("install", "--name", mesh.lab.ifname("late"), "--no-write-hosts",
                      mesh.srv.path("late.toml"), check=False, timeout=60)
    assert r.returncode == 1 and "innernet: error:" in r.stderr, r.stderr
    assert "expired" in r.stderr


def test_admin_made_cidr_and_peer_are_in_the_server_database(mesh):
    out = mesh.srv.server("list-cidrs", mesh.net).stdout
    assert "10.66.2.0/24 robots" in out
    peers = mesh.admin.innernet("show", mesh.ifname(mesh.admin), "--json").stdout
    assert '"name": "admin"' in peers


def test_down_removes_the_interface(mesh):
    host = mesh.lab.add_host("downer")            # its own host: runs alone too
    name = mesh.lab.ifname("downer")
    host.innernet("install", "--name", name, "--no-write-hosts",
                  invite(mesh.srv, mesh.net, "downer", "humans"))
    # wireguard-go's socket, or a kernel device (the VM lane runs this on the kernel)
    assert os.path.exists(f"/var/run/wireguard/{name}.sock") or \
        " wireguard " in host.exec(["ip", "-d", "link", "show", name]).stdout
    host.innernet("down", name)
    assert not os.path.exists(f"/var/run/wireguard/{name}.sock")
    assert host.exec(["ip", "link", "show", name], check=False).returncode != 0
    r = host.innernet("down", name, check=False)          # a second `down` (issue 29)
    assert r.returncode == 0 and "already down" in r.stderr
