"""A "phone" running stock wg-quick with a file from `add-peer --static` (issue 15).

The phone's only WireGuard peer is the server; the server forwards its traffic
within the access rules, and the other peers route its address through the
server. A peer that joins later is reachable with no change to phone.conf.
"""
import os
import stat

import pytest

from lab import invite, start_echo, tcp_reach, wait_for

from .conftest import network_world

pytestmark = pytest.mark.netns



def join(w, name, cidr, admin="false", daemon=True):
    host = w.lab.add_host(name)
    host.innernet("install", "--name", w.lab.ifname(name), "--no-write-hosts",
                  invite(w.srv, w.net, name, cidr, admin=admin))
    conf = open(host.path("client", "etc", f"{w.lab.ifname(name)}.conf")).read()
    w.ips[name] = conf.split('address = "')[1].split("/")[0]
    if daemon:
        host.spawn_innernet("up.log", "up", w.lab.ifname(name), "--daemon", "--no-write-hosts")
        start_echo(host, w.ips[name])
    w.hosts[name] = host
    return host


@pytest.fixture(scope="module")
def world(pyz):
    with network_world(pyz, {"humans": "10.66.1.0/24", "phones": "10.66.9.0/24",
                             "robots": "10.66.2.0/24"}) as w:
        w.srv.server("add-association", w.net, "humans", "phones", "--yes")
        join(w, "admin", "humans", admin="true", daemon=False)
        join(w, "alice", "humans")
        join(w, "robo", "robots")
        yield w


def test_a_stock_wireguard_phone_reaches_what_it_may_and_nothing_else(world):
    lab, admin = world.lab, world.hosts["admin"]
    ifname = lab.ifname("ph")
    conf = admin.path(f"{ifname}.conf")           # wg-quick names the interface after the file
    # made by an admin over the API: the key pair is made on the admin's host
    out = admin.innernet("add-peer", lab.ifname("admin"), "--name", "phone", "--cidr", "phones",
                         "--auto-ip", "--static", "--save-wg-quick", conf, "--yes")
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
    text = open(conf).read()
    private = next(line.split(" = ", 1)[1] for line in text.splitlines()
                   if line.startswith("PrivateKey"))
    assert private not in out.stdout + out.stderr
    phone = lab.add_host("phone")
    phone_conf = phone.path(f"{ifname}.conf")
    with open(phone_conf, "w") as f:
        f.write(text)
    os.chmod(phone_conf, 0o600)
    phone.exec(["env", "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go", "wg-quick", "up",
                phone_conf], timeout=60)
    phone_ip = text.split("Address = ")[1].split("/")[0]
    start_echo(phone, phone_ip)
    # the phone reaches alice (associated) and alice the phone, through the server
    wait_for(lambda: tcp_reach(phone, world.ips["alice"], timeout=1), 30, "phone -> alice")
    assert tcp_reach(world.hosts["alice"], phone_ip)
    # and nobody in robots, in either direction
    assert not tcp_reach(phone, world.ips["robo"], timeout=2)
    assert not tcp_reach(world.hosts["robo"], phone_ip, timeout=2)
    # a peer that joins afterwards: reachable with the same phone.conf
    join(world, "bob", "humans")
    wait_for(lambda: tcp_reach(phone, world.ips["bob"], timeout=1), 30, "phone -> bob")
    assert open(phone_conf).read() == text
    # show says how the phone is reached
    show = world.hosts["alice"].innernet("show", lab.ifname("alice")).stdout
    assert "through the server (a static WireGuard device)" in show
    # the server never saw the private key: not in its database, config or logs
    for root, _, files in os.walk(world.srv.dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert private.encode() not in f.read(), name
    # export: the same file with a placeholder for the key
    exported = admin.innernet("export", lab.ifname("admin"), "--name", "phone", "--wg-quick")
    assert exported.stdout == text.replace(private, exported.stdout.split("PrivateKey = ")[1]
                                           .splitlines()[0])
    assert "template" in exported.stderr
