"""Mixed networks with the real innernet 1.5.5 (issue 27, part A).

innernet's docker scenario (docker-tests/run-docker-tests.sh in innernet's
repository) as 25 named checks, run
both ways: innernet-server 1.5.5 with our clients (our admin peer doing the
admin steps over the API), and our server with innernet 1.5.5 clients (an
innernet admin peer doing them). Then every verb of our client against
innernet-server, the requests our daemon keeps sending it, and our features
in use on our server with innernet clients present. Needs the binaries (see
compat.py); skipped without them, failed without them under
INNERNET_COMPAT_REQUIRED.
"""
import json
import os
import re
import subprocess
import time

import pytest

from lab import device_peer_ips, start_echo, tcp_reach, wait_for

from .compat import (CompatLab, add_peer_args, cli, fetch, install, new_network, server_cli,
                     start_serve)
from .conftest import BARE

pytestmark = pytest.mark.netns

SERVER_LOG_ENV = {"RUST_LOG": "warn,innernet_server=debug"}   # one line per request


class Scenario:
    """innernet's docker test as named checks; a failed check is recorded and
    the rest still run (those that need it fail in their turn)."""

    def __init__(self, lab):
        self.lab, self.results = lab, []
        self.net = lab.ifname("n")
        self.ifaces = {}

    def check(self, name, fn):
        try:
            ok = fn()
            self.results.append((name, ok is not False, "" if ok is not False else "false"))
        except Exception as e:              # recorded, reported at the end
            self.results.append((name, False, str(e)[-800:]))

    def failed(self):
        return [(n, why) for n, ok, why in self.results if not ok]

    def iface(self, host):
        return self.ifaces.setdefault(host.name, self.lab.ifname(host.name[-2:]))


def run_scenario(lab, *, innernet_clients):
    """Run the 25 checks; clients are innernet's when ``innernet_clients``,
    else ours (and the server the other kind). Returns the Scenario."""
    s = Scenario(lab)
    add = lab.add_innernet_host if innernet_clients else lab.add_host
    srv = s.srv = lab.add_host("srv")
    net = s.net
    s.check("server: new", lambda: new_network(srv, net))
    s.check("server: add-cidr humans", lambda: server_cli(
        srv, "add-cidr", net, "--name", "humans", "--cidr", "10.66.1.0/24", "--parent", net,
        "--yes"))
    s.check("server: add-peer admin --auto-ip", lambda: server_cli(
        srv, *add_peer_args(net, "admin", "humans", srv.path("admin.toml"), admin="true")))
    s.check("server: serve", lambda: setattr(s, "serve", start_serve(srv, net,
                                                                     env=SERVER_LOG_ENV)))
    p1 = s.p1 = add("p1")
    a = s.iface(p1)
    s.check("peer 1: install --delete-invite", lambda: install(
        p1, srv.path("admin.toml"), a, "--delete-invite"))
    s.check("peer 1: the invitation is deleted", lambda: not os.path.exists(
        srv.path("admin.toml")))
    s.check("peer 1: up", lambda: up(p1, a))
    s.check("peer 1: add-cidr robots", lambda: cli(
        p1, "add-cidr", a, "--name", "robots", "--cidr", "10.66.2.0/24", "--parent", net,
        "--yes"))
    s.check("peer 1: add-association humans robots", lambda: cli(
        p1, "add-association", a, "humans", "robots", "--yes"))
    s.check("peer 1: add-peer peer2 --auto-ip", lambda: cli(
        p1, *add_peer_args(a, "peer2", "robots", p1.path("peer2.toml"), expires="30s")))
    p2 = s.p2 = add("p2")
    s.check("peer 2: install", lambda: install(p2, p1.path("peer2.toml"), s.iface(p2),
                                                 "--delete-invite"))
    s.check("peer 2: up", lambda: up(p2, s.iface(p2)))
    _rename_checks(s, innernet_clients)
    _short_lived_checks(s)
    _simultaneous_checks(s, add)
    return s


def up(host, iface):
    if host.is_reference:
        host.lab.mark_up(iface)
    return cli(host, "up", iface, "--no-write-hosts")


def _rename(s, old, new, innernet_clients):
    # innernet 1.5.5 has rename-cidr neither in its client nor in its server
    # (nor PUT /v1/admin/cidrs/{id}): on our server ours renames; on
    # innernet-server our admin's rename must be refused in one clear line.
    if innernet_clients:
        return server_cli(s.srv, "rename-cidr", s.net, "--name", old, "--new-name", new,
                          "--yes")
    r = cli(s.p1, "rename-cidr", s.iface(s.p1), "--name", "robots", "--new-name", new,
            "--yes", check=False)
    assert r.returncode == 1 and r.stderr.startswith(
        "innernet: error: the server is innernet 1.5.5 (or another innernet server) and has "
        "no CIDR renaming\nhint: "), r.stderr
    # asked once: the second time our client remembers
    puts = [q for q in server_requests(s) if q[1:] == ("PUT", "/v1/admin/cidrs/4")]
    assert len(puts) == 1, puts
    return True


def _lists(s, name):
    def listed():
        fetch(s.p1, s.iface(s.p1))
        return name in cli(s.p1, "list-cidrs", s.iface(s.p1)).stdout
    return wait_for(listed, 20, f"peer 1 to list {name}", interval=0.5)


def _rename_checks(s, innernet_clients):
    s.check("rename-cidr robots to coolbeans", lambda: _rename(s, "robots", "coolbeans",
                                                               innernet_clients))
    s.check("peer 1: list-cidrs shows coolbeans", lambda: _lists(
        s, "coolbeans" if innernet_clients else "robots"))
    s.check("rename-cidr coolbeans to robots", lambda: _rename(s, "coolbeans", "robots",
                                                               innernet_clients))
    s.check("peer 1: list-cidrs shows robots", lambda: _lists(s, "robots"))


def _short_lived_checks(s):
    a = s.iface(s.p1)
    s.check("peer 1: add-peer peer3 --ip 10.66.2.100 expiring in 1 s", lambda: cli(
        s.p1, *add_peer_args(a, "peer3", "robots", s.p1.path("peer3.toml"), ip="10.66.2.100",
                             expires="1s")))

    def again():
        os.path.exists(s.p1.path("peer3.toml")) and os.unlink(s.p1.path("peer3.toml"))
        return cli(s.p1, *add_peer_args(a, "peer3", "robots", s.p1.path("peer3.toml"),
                                        ip="10.66.2.100", expires="30m"),
                   check=False).returncode == 0
    s.check("peer 1: peer3 again once the invitation expired",
            lambda: wait_for(again, 25, "the sweeper to free peer3", interval=1))


def _simultaneous_checks(s, add):
    a = s.iface(s.p1)
    for name in ("peer4", "peer5"):
        s.check(f"peer 1: add-peer {name} --auto-ip", lambda name=name: cli(
            s.p1, *add_peer_args(a, name, "humans", s.p1.path(f"{name}.toml"),
                                 expires="30s")))

    def ips():
        found = [re.search(r'^address = "([^"/]+)', open(s.p1.path(f"{n}.toml")).read(), re.M)
                 for n in ("peer4", "peer5")]
        return found[0].group(1) != found[1].group(1)
    s.check("peer4 and peer5 have distinct IPs", ips)
    hosts = {n: add(n) for n in ("p4", "p5")}
    procs = {}
    for n, host in hosts.items():
        procs[n] = subprocess.Popen(
            ["ip", "netns", "exec", host.ns] + host.innernet_argv(
                "install", "--name", s.iface(host), "--no-write-hosts", "--delete-invite",
                s.p1.path(f"peer{n[1]}.toml"),
                globals=["--backend", "userspace"] if host.is_reference else []),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    s.hosts45 = hosts
    for n, proc in procs.items():
        def done(proc=proc, host=hosts[n]):
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            if host.is_reference:
                s.lab.mark_up(s.iface(host))
        s.check(f"{n}: install at the same time", done)
    s.check("peer 2 reaches the server", lambda: _reaches(s, s.srv, "10.66.0.1"))
    s.check("peer 2 reaches peer 1 (associated CIDR)", lambda: _reaches(s, s.p1, "10.66.1.1"))


def _reaches(s, target, ip):
    start_echo(target, ip)
    fetch(s.p1, s.iface(s.p1))
    fetch(s.p2, s.iface(s.p2))
    return wait_for(lambda: tcp_reach(s.p2, ip), 20, f"peer 2 to reach {ip}", interval=0.5)


def assert_all_passed(s):
    assert len(s.results) == 25, [n for n, _, _ in s.results]
    assert not s.failed(), "\n".join(f"FAILED {n}: {why}" for n, why in s.failed())


# -- innernet-server 1.5.5 with our clients -------------------------------------

@pytest.fixture(scope="module")
def theirs(pyz):
    lab = CompatLab(BARE + [pyz], innernet_server=True)
    try:
        s = run_scenario(lab, innernet_clients=False)
        yield s
    finally:
        lab.close()


def test_innernet_server_with_our_clients_passes_its_scenario(theirs):
    # Issue 27, item 1: add-peer died on `404 Not Found to GET /admin/deleted-peers`.
    assert_all_passed(theirs)


@pytest.fixture(scope="module")
def spare(theirs):
    """Peers made by innernet-server's own CLI (not by our admin, so that what
    the next tests show does not hang on the scenario): d1 and d2 joined with
    our client, d3 invited only."""
    s, srv = theirs, theirs.srv
    hosts = {}
    for name in ("d1", "d2", "d3"):
        server_cli(srv, *add_peer_args(s.net, name, "humans", srv.path(f"{name}.toml")))
        if name != "d3":
            hosts[name] = host = s.lab.add_host(name)
            install(host, srv.path(f"{name}.toml"), s.iface(host))
            host.ip = re.search(r'^address = "([^"/]+)', open(host.path(
                "client", "etc", f"{s.iface(host)}.conf")).read(), re.M).group(1)
    return hosts


def server_requests(s, since=0):
    """(source ip, method, path) of every request innernet-server logged."""
    text = s.srv.log(s.srv.serve_log)[since:]
    return [(m[1], m[2], m[3]) for m in re.finditer(
        r"(\d+\.\d+\.\d+\.\d+):\d+ - ([A-Z]+) (/\S*)", text)]


LACKS = "innernet: error: the server is innernet 1.5.5 (or another innernet server) and has no "


def test_every_verb_of_our_client_on_an_innernet_server(theirs, spare):
    """Issue 27, item 5: each works, or says in one line which feature the
    innernet server lacks, asked for once and then remembered."""
    p1, a = theirs.p1, theirs.iface(theirs.p1)
    works = [("show", a), ("list-cidrs", a), ("list-associations", a), ("fetch", a),
             ("up", a, "--no-write-hosts"),
             ("add-cidr", a, "--name", "temp", "--cidr", "10.66.9.0/24", "--parent",
              theirs.net, "--yes"),
             ("add-association", a, "humans", "temp", "--yes"),
             ("delete-association", a, "humans", "temp", "--yes"),
             ("delete-cidr", a, "--name", "temp", "--yes"),
             ("rename-peer", a, "--name", "d3", "--new-name", "peer3b", "--yes"),
             ("disable-peer", a, "--name", "peer3b", "--yes"),
             ("enable-peer", a, "--name", "peer3b", "--yes"),
             ("set-listen-port", a, "-l", "51999", "--yes"),
             ("override-endpoint", a, "-e", f"{p1.underlay}:51999", "--yes"),
             ("override-endpoint", a, "--unset", "--yes"),
             ("override-peer-endpoint", a, "--name", "d1", "-e", "198.18.0.250:4444",
              "--yes"),
             ("override-peer-endpoint", a, "--name", "d1", "--unset", "--yes"),
             ("export", a)]
    for argv in works:
        cli(p1, *argv)
    with open(p1.path("net.toml"), "w") as f:
        f.write(cli(p1, "export", a).stdout)
    lacking = [(("rotate-key", a, "--yes"), "key rotation"),
               (("delete-peer", a, "--name", "peer3b", "--yes"), "peer deletion"),
               (("reinvite", a, "--name", "peer3b", "--invite-expires", "1d", "--save-config",
                 p1.path("re.toml"), "--yes"), "re-invitations"),
               (("approve-routes", a, "--name", "d1", "--yes"),
                "subnet routes or exit nodes"),
               (("list-routes", a), "subnet routes or exit nodes"),
               (("advertise-routes", a, "192.168.50.0/24", "--yes"),
                "subnet routes or exit nodes"),
               (("advertise-exit-node", a, "--yes"), "subnet routes or exit nodes"),
               (("audit", a), "audit log"),
               (("override-endpoint", a, "-e", "0.0.0.0:51999", "--yes"),
                "unspecified IP in an endpoint (0.0.0.0:PORT)"),
               (("apply", a, p1.path("net.toml"), "--yes"), "network as code (export/apply)"),
               # innernet-server would take these peers and drop what makes them so
               (("add-peer", a, "--name", "rt2", "--cidr", "humans", "--auto-ip", "--admin",
                 "false", "--routes", "192.168.61.0/24", "--save-config", p1.path("rt2.toml"),
                 "--yes"), "subnet routes or exit nodes"),
               (("add-peer", a, "--name", "st1", "--cidr", "humans", "--auto-ip", "--static",
                 "--save-wg-quick", p1.path("st1.conf"), "--yes"),
                "static peers (stock WireGuard devices)"),
               (("forget-pins", a, "--name", "peer3b", "--yes"),
                "pin tracking for innernet clients"),
               (("lock", "init", a), "network lock")]
    for argv, feature in lacking:
        for _ in range(2):
            before = len(server_requests(theirs))
            r = cli(p1, *argv, check=False)
            lines = r.stderr.splitlines()
            assert r.returncode == 1 and lines[0] == LACKS + feature, (argv, r.stderr)
            assert len(lines) == 2 and lines[1].startswith("hint: "), r.stderr
            assert "404" not in r.stderr and "advertises no routes" not in r.stderr
        # the second time, nothing of ours was asked for
        assert all(q[2] in ("/v1/admin/peers", "/v1/admin/cidrs", "/v1/admin/associations")
                   for q in server_requests(theirs)[before:]), server_requests(theirs)[before:]
    for made in ("re.toml", "rt2.toml", "st1.conf", f"client/etc/{a}.lock-key"):
        assert not os.path.exists(p1.path(made)), made
    lacks = p1.path("client", "lib", f"{a}.lacks.json")
    assert os.stat(lacks).st_mode & 0o777 == 0o600
    cli(p1, "set-listen-port", a, "--unset", "--yes")


def test_our_daemon_on_an_innernet_server_sends_only_state_requests(theirs, spare):
    """Issue 27, item 5 and acceptance 3: past its first rounds, a daemon of ours
    on innernet-server sends nothing but GET /v1/user/state (no relay requests,
    no capabilities) and has said once what the server lacks. d2 is down,
    so there is a peer without a path, which a relay would be asked for."""
    p4, i4 = spare["d1"], theirs.iface(spare["d1"])
    cli(spare["d2"], "down", theirs.iface(spare["d2"]))
    ip4 = re.search(r'^address = "([^"/]+)', open(p4.path(
        "client", "etc", f"{i4}.conf")).read(), re.M).group(1)
    daemon = p4.spawn(p4.innernet_argv("up", i4, "--daemon", "--interval", "1",
                                       "--no-write-hosts"), "up.log")
    try:
        def states(since):
            return [q for q in server_requests(theirs, since) if q[0] == ip4
                    and q[1:] == ("GET", "/v1/user/state")]
        start = len(theirs.srv.log(theirs.srv.serve_log))
        wait_for(lambda: len(states(start)) >= 3, 30, "the daemon's first rounds")
        later = len(theirs.srv.log(theirs.srv.serve_log))
        # past the next slot at which a peer without a path is tried again (30 s)
        slot_end = (time.time() // 30 + 1) * 30 + 3
        wait_for(lambda: time.time() > slot_end and len(states(later)) >= 5, 40,
                 "the daemon to sync past a retry slot", interval=0.5)
        assert daemon.poll() is None, p4.log("up.log")
        sent = [q for q in server_requests(theirs, later) if q[0] == ip4]
        assert {q[1:] for q in sent} == {("GET", "/v1/user/state")}, sent
        log = p4.log("up.log")
        assert log.count("has no end-to-end relay") == 1, log
        assert log.count("has no long polls") == 1, log
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
    lacks = p4.path("client", "lib", f"{i4}.lacks.json")
    assert os.path.exists(lacks)
    cli(p4, "uninstall", i4, "--yes", "--no-write-hosts")
    assert not os.path.exists(lacks)


# -- our server with innernet 1.5.5 clients ------------------------------------

@pytest.fixture(scope="module")
def ours(pyz):
    lab = CompatLab(BARE + [pyz])
    try:
        s = run_scenario(lab, innernet_clients=True)
        yield s
    finally:
        lab.close()


def test_our_server_with_innernet_clients_passes_its_scenario(ours):
    assert_all_passed(ours)


def _innernet_clients(s):
    return [s.p1, s.p2] + list(s.hosts45.values())


def _all_sync(s):
    """Every innernet client syncs without an error (a PINNING ERROR or any
    other would fail `fetch` for good)."""
    for host in _innernet_clients(s):
        r = fetch(host, s.iface(host), check=False)
        assert r.returncode == 0 and "[E]" not in r.stdout + r.stderr, (host.name, r)


def _join_ours(s, name, cidr, *extra):
    host = s.lab.add_host(name)
    path = s.srv.path(f"{name}.toml")
    server_cli(s.srv, *add_peer_args(s.net, name, cidr, path), *extra)
    install(host, path, s.iface(host))
    host.ip = re.search(r'^address = "([^"/]+)', open(host.path(
        "client", "etc", f"{s.iface(host)}.conf")).read(), re.M).group(1)
    return host


def test_our_features_with_innernet_clients_present(ours):
    """Issue 27, part A item 3: on our server, with innernet 1.5.5 clients in the
    network, our features in use leave every innernet client syncing, and
    reaching what it should: what innernet's model gives it, no more."""
    s, srv, net = ours, ours.srv, ours.net
    p4 = s.hosts45["p4"]
    o1 = _join_ours(s, "o1", "humans")
    start_echo(o1, o1.ip)
    # routes and an exit node, approved: innernet clients ignore both
    cli(o1, "advertise-routes", s.iface(o1), "192.168.77.0/24", "--yes")
    cli(o1, "advertise-exit-node", s.iface(o1), "--yes")
    server_cli(srv, "approve-routes", net, "--name", "o1", "--yes")
    _all_sync(s)
    assert device_peer_ips(p4, s.iface(p4))[o1.ip]["allowed_ips"] == [f"{o1.ip}/32"]
    assert wait_for(lambda: tcp_reach(p4, o1.ip), 20, "p4 to reach o1", interval=0.5)
    # DNS: an innernet client asks the server's resolver by hand
    zone = f"{net}.wg"
    out = p4.exec(["dig", "+short", "+time=2", "+tries=2", "@10.66.0.1", f"o1.{zone}"]).stdout
    assert out.split() == [o1.ip]
    # a static peer (a stock WireGuard device)
    phone = s.lab.add_host("phone")
    conf = phone.path(f"{s.iface(phone)}.conf")        # wg-quick names the interface after it
    server_cli(srv, "add-peer", net, "--name", "phone", "--cidr", "humans", "--auto-ip",
               "--static", "--save-wg-quick", conf, "--yes")
    phone.exec(["env", "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go", "wg-quick", "up",
                conf], timeout=60)
    phone.ip = open(conf).read().split("Address = ")[1].split("/")[0]
    start_echo(phone, phone.ip)
    _all_sync(s)
    fetch(o1, s.iface(o1))
    assert wait_for(lambda: tcp_reach(o1, phone.ip), 20, "o1 to reach the phone", interval=0.5)
    # innernet has no way to route a peer's address through the server: it
    # lists the device as an ordinary peer, which answers only the server.
    assert phone.ip in device_peer_ips(p4, s.iface(p4))
    assert not tcp_reach(p4, phone.ip, timeout=2)
    # delete a peer of ours (quarantined address) and re-invite an unredeemed one
    o2 = _join_ours(s, "o2", "humans")
    _all_sync(s)
    assert o2.ip in device_peer_ips(p4, s.iface(p4))
    cli(o2, "down", s.iface(o2))
    server_cli(srv, "delete-peer", net, "--name", "o2", "--yes")
    _all_sync(s)
    assert o2.ip not in device_peer_ips(p4, s.iface(p4))
    server_cli(srv, *add_peer_args(net, "later", "humans", srv.path("later.toml")))
    server_cli(srv, "reinvite", net, "--name", "later", "--invite-expires", "1d",
               "--save-config", srv.path("later2.toml"), "--yes")
    _all_sync(s)
    # apply: a file's edit, in one transaction
    doc = server_cli(srv, "export", net).stdout
    with open(srv.path("net.toml"), "w") as f:
        f.write(doc + f'\n[[cidrs]]\nname = "ops"\ncidr = "10.66.3.0/24"\nparent = "{net}"\n')
    server_cli(srv, "apply", net, srv.path("net.toml"), "--yes")
    _all_sync(s)
    assert "ops" in cli(s.p1, "list-cidrs", s.iface(s.p1)).stdout
    # an invitation naming two server endpoints installs on innernet
    p6 = s.lab.add_innernet_host("p6")
    server_cli(srv, *add_peer_args(net, "p6", "humans", srv.path("p6.toml")),
               "--server-endpoints", f"{srv.underlay}:51820,198.18.0.250:51820")
    install(p6, srv.path("p6.toml"), s.iface(p6), "--delete-invite")
    fetch(o1, s.iface(o1))
    assert wait_for(lambda: tcp_reach(p6, o1.ip), 20, "p6 to reach o1", interval=0.5)
    s.hosts45["p6"] = p6
    _all_sync(s)
    s.features_used = True


def test_our_relay_with_innernet_clients_present(ours):
    """Two of our peers behind symmetric NATs reach each other through our
    end-to-end relay while innernet clients in the network keep syncing."""
    s = ours
    pair = []
    for i in (1, 2):
        nat = s.lab.add_nat(f"nat{i}", f"198.18.0.{230 + i}", f"198.19.{40 + i}",
                            symmetric=True)
        host = s.lab.add_behind(nat, f"r{i}")
        server_cli(s.srv, *add_peer_args(s.net, f"r{i}", "humans", s.srv.path(f"r{i}.toml")))
        install(host, s.srv.path(f"r{i}.toml"), s.iface(host))
        host.ip = re.search(r'^address = "([^"/]+)', open(host.path(
            "client", "etc", f"{s.iface(host)}.conf")).read(), re.M).group(1)
        start_echo(host, host.ip)
        pair.append(host)

    def relayed():
        for host in pair:               # as cron runs fetch: each asks for the relay
            fetch(host, s.iface(host))
        return tcp_reach(pair[0], pair[1].ip, timeout=2)
    wait_for(relayed, 60, "r1 to reach r2 through the relay", interval=1)
    show = json.loads(cli(pair[0], "show", s.iface(pair[0]), "--json").stdout)
    assert {p["name"]: p["path"] for p in show[0]["peers"]}["r2"] == \
        "relayed (end-to-end encrypted)"
    _all_sync(s)
    assert tcp_reach(pair[1], pair[0].ip, timeout=2)


def test_rollback_check_says_what_innernet_server_would_drop(ours):
    """Issue 27, item 6: rolling back dropped routes, quarantines and static-peer
    forwarding silently; `innernet server rollback-check` names each."""
    if not getattr(ours, "features_used", False):     # run alone (-k): the features first
        test_our_features_with_innernet_clients_present(ours)
    out = server_cli(ours.srv, "rollback-check", ours.net).stdout
    assert "subnet routes and exit nodes: approved o1: 192.168.77.0/24; exit nodes o1" in out
    assert re.search(r"address quarantine: 10\.66\.1\.\d+ \(deleted 'o2'", out), out
    assert "PINNING ERROR" in out
    assert re.search(r"static peers: phone \(10\.66\.1\.\d+\) -- innernet-server does not "
                     r"forward for them", out), out
    assert "audit log:" in out
