"""Every command, non-interactively, checked in the server database and on devices.

Issue 3, acceptance items 1 and 4, and the device-facing verbs of issue 2:
up --daemon, down, uninstall, set-listen-port, override-endpoint,
override-peer-endpoint, enable/disable-peer (API and server CLI), renames,
short-lived invitations, simultaneous redemption, a disabled peer staying out
of a client's cache while the server is down, serve honouring global flags.
"""
import json
import os
import signal
import sqlite3
import subprocess

import pytest

from lab import (Lab, device, device_peer_ips, link_mtu, start_network, start_serve, tcp_reach,
                 wait_for)

from .conftest import BARE

pytestmark = pytest.mark.netns


class Net:
    pass


@pytest.fixture(scope="module")
def net(pyz):
    lab = Lab(innernet_cmd=BARE + [pyz])
    n = Net()
    n.lab = lab
    try:
        n.srv, n.name, _ = start_network(lab, {"humans": "10.66.1.0/24",
                                                "robots": "10.66.2.0/24"}, serve=False)
        srv = n.srv
        n.db = srv.path("server", "lib", f"{n.name}.db")
        start_server(n)
        n.hosts = {}
        for name, cidr, admin in (("admin", "humans", "true"), ("p1", "humans", "false"),
                                  ("p2", "humans", "false"), ("p3", "robots", "false")):
            invite(n, name, cidr, admin)
            join(n, name)
        yield n
    finally:
        lab.close()


def start_server(n):
    # Global flags before the verb: innernet's serve ignores them, ours honours them.
    n.serve = start_serve(n.srv, n.name, "--hosts-path", n.srv.hosts_path,
                          globals=["--mtu", "1380"])


def invite(n, name, cidr, admin="false", expires="30d", via=None, ip=None):
    where = (via or n.srv).path(f"{name}.toml")
    args = [n.name if via is None else n.lab.ifname(via.name), "--name", name, "--cidr", cidr,
            "--admin", admin, *(["--ip", ip] if ip else ["--auto-ip"]), "--save-config", where,
            "--invite-expires", expires, "--yes"]
    if via is None:
        return n.srv.server("add-peer", *args)
    return via.innernet("add-peer", *args)


def join(n, name, invitation=None, check=True):
    host = n.lab.add_host(name)
    n.hosts[name] = host
    return host.innernet("install", "--name", n.lab.ifname(name), "--hosts-path",
                         host.hosts_path, invitation or n.srv.path(f"{name}.toml"), check=check)


def h(n, name):
    return n.hosts[name]


def iface(n, name):
    return n.lab.ifname(name)


def fetch(n, *names, check=True):
    return [h(n, x).innernet("fetch", iface(n, x), "--hosts-path", h(n, x).hosts_path,
                             check=check) for x in names]


def db(n, sql, args=()):
    return sqlite3.connect(n.db).execute(sql, args).fetchall()


def server_device_ips(n):
    return device_peer_ips(n.srv, n.name)


def test_serve_honours_global_flags_and_clients_use_mtu(net):
    assert link_mtu(net.srv, net.name) == 1380
    assert link_mtu(h(net, "p1"), iface(net, "p1")) == 1280     # innernet's default


def test_admin_disables_peer_over_api_and_server_device_drops_it_at_once(net):
    fetch(net, "p1")
    assert "10.66.1.3" in device_peer_ips(h(net, "p1"), iface(net, "p1"))
    h(net, "admin").innernet("disable-peer", iface(net, "admin"), "--name", "p2", "--yes")
    assert db(net, "SELECT is_disabled FROM peers WHERE name = 'p2'") == [(1,)]
    assert "10.66.1.3" not in server_device_ips(net)             # no restart needed
    # Cut off at once: the server no longer even answers p2's packets.
    assert not tcp_reach(h(net, "p2"), "10.66.0.1", 51820, timeout=2)
    fetch(net, "p1")
    assert "10.66.1.3" not in device_peer_ips(h(net, "p1"), iface(net, "p1"))
    h(net, "admin").innernet("enable-peer", iface(net, "admin"), "--name", "p2", "--yes")
    assert "10.66.1.3" in server_device_ips(net)
    fetch(net, "p1", "p2")
    assert "10.66.1.3" in device_peer_ips(h(net, "p1"), iface(net, "p1"))


def test_server_cli_disable_reaches_the_running_server_within_seconds(net):
    net.srv.server("disable-peer", net.name, "--name", "p3", "--yes")
    wait_for(lambda: "10.66.2.1" not in server_device_ips(net), 10, "serve to apply the edit")
    net.srv.server("enable-peer", net.name, "--name", "p3", "--yes")
    wait_for(lambda: "10.66.2.1" in server_device_ips(net), 10, "serve to apply the edit")


def test_rename_cidr_from_client_and_from_server(net):
    # innernet's docker test_rename_cidr, with fetch instead of an up loop
    h(net, "admin").innernet("rename-cidr", iface(net, "admin"), "--name", "robots",
                             "--new-name", "coolbeans", "--yes")
    fetch(net, "admin")
    assert "coolbeans" in h(net, "admin").innernet("list-cidrs", iface(net, "admin")).stdout
    net.srv.server("rename-cidr", net.name, "--name", "coolbeans", "--new-name", "robots",
                   "--yes")
    fetch(net, "admin")
    out = h(net, "admin").innernet("list-cidrs", iface(net, "admin"), "--json").stdout
    assert '"name": "robots"' in out and "coolbeans" not in out


def test_rename_peer_reaches_other_peers_hosts_files(net):
    net.srv.server("rename-peer", net.name, "--name", "p2", "--new-name", "p2b", "--yes")
    fetch(net, "p1")
    assert f"10.66.1.3 p2b.{iface(net, 'p1')}.wg" in open(h(net, "p1").hosts_path).read()
    h(net, "admin").innernet("rename-peer", iface(net, "admin"), "--name", "p2b",
                             "--new-name", "p2", "--yes")
    assert db(net, "SELECT name FROM peers WHERE ip = '10.66.1.3'") == [("p2",)]


def test_associations_and_cidr_deletion_from_a_client(net):
    a = h(net, "admin")
    a.innernet("add-cidr", iface(net, "admin"), "--name", "temp", "--cidr", "10.66.9.0/24",
               "--parent", net.name, "--yes")
    a.innernet("add-association", iface(net, "admin"), "humans", "temp")
    r = a.innernet("delete-cidr", iface(net, "admin"), "--name", "temp", "--yes", check=False)
    assert r.returncode == 1 and "associations" in r.stderr
    a.innernet("delete-association", iface(net, "admin"), "temp", "humans", "--yes")
    assert db(net, "SELECT count(*) FROM associations") == [(0,)]
    a.innernet("delete-cidr", iface(net, "admin"), "--name", "temp", "--yes")
    assert db(net, "SELECT count(*) FROM cidrs WHERE name = 'temp'") == [(0,)]


def test_set_listen_port_and_override_endpoint(net):
    p1 = h(net, "p1")
    p1.innernet("set-listen-port", iface(net, "p1"), "-l", "51999", "--yes")
    assert device(p1, iface(net, "p1"))["listen_port"] == 51999
    conf = p1.path("client", "etc", f"{iface(net, 'p1')}.conf")
    assert "listen-port = 51999" in open(conf).read()
    assert "No change" in p1.innernet("set-listen-port", iface(net, "p1"), "-l", "51999",
                                      "--yes").stderr
    p1.innernet("override-endpoint", iface(net, "p1"), "-e", "0.0.0.0:51999", "--yes")
    assert db(net, "SELECT endpoint FROM peers WHERE name = 'p1'") == [("0.0.0.0:51999",)]
    fetch(net, "p2")
    store = open(h(net, "p2").path("client", "lib", f"{iface(net, 'p2')}.json")).read()
    assert f'"endpoint": "{p1.underlay}:51999"' in store      # observed IP, our port
    p1.innernet("override-endpoint", iface(net, "p1"), "--unset", "--yes")
    assert db(net, "SELECT endpoint FROM peers WHERE name = 'p1'") == [(None,)]
    p1.innernet("set-listen-port", iface(net, "p1"), "--unset", "--yes")
    assert "listen-port" not in open(conf).read()


def test_override_peer_endpoint_is_local(net):
    p1 = h(net, "p1")
    fetch(net, "p1")
    p1.innernet("override-peer-endpoint", iface(net, "p1"), "--name", "p2", "-e",
                "198.18.0.250:4444", "--yes")
    conf = open(p1.path("client", "etc", f"{iface(net, 'p1')}.conf")).read()
    assert '[peer-endpoint-overrides]\n"10.66.1.3" = "198.18.0.250:4444"' in conf
    assert device_peer_ips(p1, iface(net, "p1"))["10.66.1.3"]["endpoint"] == "198.18.0.250:4444"
    show = p1.innernet("show", iface(net, "p1")).stdout
    assert "198.18.0.250:4444 (endpoint overridden locally)" in show
    p1.innernet("override-peer-endpoint", iface(net, "p1"), "--name", "p2", "--unset", "--yes")
    assert "peer-endpoint-overrides" not in open(
        p1.path("client", "etc", f"{iface(net, 'p1')}.conf")).read()
    out = p1.innernet("override-peer-endpoint", iface(net, "p1"), "--name", "p2", "--unset",
                      "--yes").stderr
    assert "no endpoint override" in out


def test_short_lived_invitation_frees_name_and_ip(net):
    # innernet's docker test_short_lived_invitation
    invite(net, "p9", "humans", expires="1s", via=h(net, "admin"), ip="10.66.1.100")
    os.unlink(h(net, "admin").path("p9.toml"))

    def again():
        r = h(net, "admin").innernet(
            "add-peer", iface(net, "admin"), "--name", "p9", "--cidr", "humans", "--admin",
            "false", "--ip", "10.66.1.100", "--save-config", h(net, "admin").path("p9.toml"),
            "--invite-expires", "30m", "--yes", check=False)
        return r.returncode == 0
    wait_for(again, 20, "the sweeper to free p9", interval=1)
    assert db(net, "SELECT name, is_redeemed FROM peers WHERE ip = '10.66.1.100'") == [("p9", 0)]


def test_simultaneous_redemption(net):
    # innernet's docker test_simultaneous_redemption
    for name in ("p4", "p5"):
        invite(net, name, "humans", expires="30s", via=h(net, "admin"))
        # the network's own name, not the admin's interface name (issue 19.11)
        text = open(h(net, "admin").path(f"{name}.toml")).read()
        assert f'network-name = "{net.name}"' in text and iface(net, "admin") != net.name
    hosts = {name: net.lab.add_host(name) for name in ("p4", "p5")}
    net.hosts.update(hosts)
    procs = {name: subprocess.Popen(
        ["ip", "netns", "exec", host.ns] + host.innernet_argv(
            "install", "--name", iface(net, name), "--no-write-hosts",
            h(net, "admin").path(f"{name}.toml")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name, host in hosts.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    ips = db(net, "SELECT ip FROM peers WHERE name IN ('p4', 'p5') AND is_redeemed = 1")
    assert len({ip for (ip,) in ips}) == 2
    fetch(net, "p2")
    for name in ("p4", "p5"):
        h(net, name).innernet("fetch", iface(net, name), "--no-write-hosts")
        peers = device_peer_ips(h(net, name), iface(net, name))
        assert "10.66.0.1" in peers and "10.66.1.1" in peers       # server and admin


def test_up_daemon_long_polls_new_and_disabled_peers(net):
    # --interval 60, yet changes arrive within seconds: the long poll.
    p1 = h(net, "p1")
    fetch(net, "p1")
    daemon = p1.spawn(p1.innernet_argv("up", iface(net, "p1"), "--daemon", "--interval", "60",
                                       "--no-write-hosts"), "up.log")
    try:
        # its connection to the server open: on it, the capabilities and then
        # the long poll (p1 is in sync already, so the poll waits)
        wait_for(lambda: "10.66.0.1:51820" in p1.exec(["ss", "-Htn", "state", "established"])
                 .stdout, 30, "the daemon's connection to the server")
        invite(net, "p6", "humans")
        join(net, "p6")
        (p6_ip,) = db(net, "SELECT ip FROM peers WHERE name = 'p6'")[0]
        wait_for(lambda: p6_ip in device_peer_ips(p1, iface(net, "p1")), 30,
                 "the daemon to add p6")
        net.srv.server("disable-peer", net.name, "--name", "p6", "--yes")
        wait_for(lambda: p6_ip not in device_peer_ips(p1, iface(net, "p1")), 30,
                 "the daemon to remove p6")
        net.srv.server("enable-peer", net.name, "--name", "p6", "--yes")
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=10)


def test_unchanged_fetch_writes_nothing(net):
    p1 = h(net, "p1")
    fetch(net, "p1")
    store = p1.path("client", "lib", f"{iface(net, 'p1')}.json")
    assert '"etag"' in open(store).read()
    before = (os.stat(store).st_mtime_ns, os.stat(p1.hosts_path).st_mtime_ns)
    r = p1.innernet("-vv", "fetch", iface(net, "p1"), "--hosts-path", p1.hosts_path)
    assert "UAPI set" not in r.stderr and "was added" not in r.stderr
    assert (os.stat(store).st_mtime_ns, os.stat(p1.hosts_path).st_mtime_ns) == before


def test_disabled_peer_stays_out_of_the_cache_while_the_server_is_down(net):
    h(net, "admin").innernet("disable-peer", iface(net, "admin"), "--name", "p2", "--yes")
    fetch(net, "p1")
    assert "10.66.1.3" not in device_peer_ips(h(net, "p1"), iface(net, "p1"))
    net.serve.send_signal(signal.SIGTERM)
    net.serve.wait(timeout=10)
    try:
        r = fetch(net, "p1", check=False)[0]
        assert r.returncode == 1
        assert "cannot reach the innernet server at 10.66.0.1:51820" in r.stderr
        assert "10.66.1.3" not in device_peer_ips(h(net, "p1"), iface(net, "p1"))
        assert "10.66.1.1" in device_peer_ips(h(net, "p1"), iface(net, "p1"))    # kept
    finally:
        start_server(net)
    h(net, "admin").innernet("enable-peer", iface(net, "admin"), "--name", "p2", "--yes")


def test_down_sticks_while_a_daemon_runs_until_up(net):
    """`innernet down` under a running `up --daemon` (in its long poll): the
    daemon idles (one line, no retries) and the device stays away until
    `innernet up`."""
    p2, name = h(net, "p2"), iface(net, "p2")
    fetch(net, "p2")
    daemon = p2.spawn(p2.innernet_argv("up", name, "--daemon", "--interval", "60",
                                       "--no-write-hosts"), "up-down.log")
    log = p2.path("up-down.log")
    status = p2.path("client", "lib", f"{name}.status.json")
    try:
        def first_round_done():     # a change p2 sees ends the daemon's long poll
            net.srv.server("disable-peer", net.name, "--name", "p1", "--yes")
            net.srv.server("enable-peer", net.name, "--name", "p1", "--yes")
            return json.load(open(status)).get("by") == "daemon"
        wait_for(first_round_done, 60, "the daemon's first round")
        p2.innernet("down", name)
        wait_for(lambda: "idle until" in open(log).read(), 30, "the daemon to idle")
        assert not os.path.exists(f"/var/run/wireguard/{name}.sock")
        assert open(log).read().count("idle until") == 1
        p2.innernet("up", name, "--no-write-hosts")
        wait_for(lambda: "syncing again" in open(log).read(), 30, "the daemon to resume")
        assert "10.66.0.1" in device_peer_ips(p2, name) and daemon.poll() is None
        assert "(retrying)" not in open(log).read(), open(log).read()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=10)


def test_down_up_and_uninstall(net):
    p3 = h(net, "p3")
    p3.innernet("down", iface(net, "p3"))
    assert not os.path.exists(f"/var/run/wireguard/{iface(net, 'p3')}.sock")
    r = p3.innernet("fetch", iface(net, "p3"), check=False)     # the operator's choice
    assert r.returncode == 0 and "taken down with 'innernet down" in r.stderr, r.stderr
    assert not os.path.exists(f"/var/run/wireguard/{iface(net, 'p3')}.sock")
    p3.innernet("up", iface(net, "p3"), "--hosts-path", p3.hosts_path)
    assert "10.66.0.1" in device_peer_ips(p3, iface(net, "p3"))
    assert "No innernet" not in p3.innernet("show").stdout
    r = p3.innernet("uninstall", iface(net, "p3"), check=False)
    assert r.returncode == 1 and "--yes" in r.stderr
    p3.innernet("uninstall", iface(net, "p3"), "--yes", "--hosts-path", p3.hosts_path)
    assert not os.path.exists(p3.path("client", "etc", f"{iface(net, 'p3')}.conf"))
    assert not os.path.exists(p3.path("client", "lib", f"{iface(net, 'p3')}.json"))
    assert not os.path.exists(f"/var/run/wireguard/{iface(net, 'p3')}.sock")
    assert "DO NOT EDIT" not in open(p3.hosts_path).read()
    assert "No innernet networks currently running." in p3.innernet("show").stdout


def test_server_uninstall(net):
    net.serve.send_signal(signal.SIGTERM)
    net.serve.wait(timeout=10)
    net.srv.server("uninstall", net.name, "--yes")
    assert not os.path.exists(net.db)
    assert not os.path.exists(f"/var/run/wireguard/{net.name}.sock")


def test_auto_external_endpoint_without_a_public_address(net):
    # The lab's hosts only have 198.18.0.0/15 (a benchmarking range, not global).
    r = net.srv.server("new", "--network-name", net.lab.ifname("x"), "--network-cidr",
                       "10.67.0.0/16", "--auto-external-endpoint", "--listen-port", "51821",
                       check=False)
    assert r.returncode == 1
    assert "could not find a public IP address" in r.stderr and "--external-endpoint" in r.stderr
