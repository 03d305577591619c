"""Operating the network like infrastructure (issue 16), over real tunnels driven
by the built innernet.pyz: the network as code with a plan, the audit log with
its actors, Prometheus metrics that move with requests and relayed traffic."""
import json
import sqlite3
import urllib.request

import pytest

from lab import invite, start_echo, tcp_reach, wait_for

from .conftest import network_world

pytestmark = pytest.mark.netns

METRICS = "127.0.0.1:9586"
SCRAPE = r"""
import sys, urllib.request
print(urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=10).read().decode())
"""


@pytest.fixture(scope="module")
def w(pyz):
    cidrs = {"humans": "10.66.1.0/24", "robots": "10.66.2.0/24"}
    with network_world(pyz, cidrs, serve=False) as w:
        from lab import start_serve
        w.serve = start_serve(w.srv, w.net, "--metrics", METRICS)
        w.h = {}
        for name, admin in (("admin", "true"), ("p1", "false"), ("p2", "false")):
            host = w.h[name] = w.lab.add_host(name)
            host.innernet("install", "--name", w.lab.ifname(name), "--no-write-hosts",
                          invite(w.srv, w.net, name, "humans", admin=admin))
        yield w


def audit(w):
    with sqlite3.connect(w.db) as db:
        return db.execute("SELECT actor, action, object FROM audit_log ORDER BY id").fetchall()


def db_bytes(w):
    """The database's content, every row but the admin's proof stamp (which an
    admin call leaves, applied or not: the replay guard of issue 28)."""
    import sqlite3
    con = sqlite3.connect(w.db)
    try:
        return [line for line in con.iterdump() if "admin_proof_stamps" not in line]
    finally:
        con.close()


def scrape(w):
    from prometheus_client.parser import text_string_to_metric_families
    text = w.srv.python(SCRAPE, METRICS).stdout
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_round_trip_edits_are_a_four_line_plan_and_devices_follow(w):
    srv, net = w.srv, w.net
    doc = srv.server("export", net).stdout
    # An admin over the API sees the same document.
    assert w.h["admin"].innernet("export", w.lab.ifname("admin")).stdout == doc
    path = srv.path("net.toml")
    with open(path, "w") as f:
        f.write(doc)
    assert "No changes" in srv.server("apply", net, path, "--yes").stdout
    edited = doc.replace('name = "p1"', 'name = "p1-renamed"')
    edited = edited.replace('name = "p2"\nip = "10.66.1.3"\ncidr = "humans"\nadmin = false\n'
                            'disabled = false', 'name = "p2"\nip = "10.66.1.3"\n'
                            'cidr = "humans"\nadmin = false\ndisabled = true')
    assert edited.count("disabled = true") == 1, edited
    edited += ('\n[[cidrs]]\nname = "ops"\ncidr = "10.66.3.0/24"\nparent = "' + net + '"\n'
               '\n[[associations]]\ncidrs = ["humans", "robots"]\n')
    with open(path, "w") as f:
        f.write(edited)
    before = db_bytes(w)
    out = srv.server("apply", net, path, "--dry-run").stdout
    plan = [line for line in out.splitlines() if line[:2] in ("+ ", "~ ", "- ")]
    assert plan == ["+ cidr ops 10.66.3.0/24 in " + net,
                    "~ peer 10.66.1.2: name p1 -> p1-renamed",
                    "~ peer 10.66.1.3 (p2): disabled false -> true",
                    "+ association humans <-> robots"], out
    assert db_bytes(w) == before
    p1_ip_of_p2 = "10.66.1.3"
    from lab import device_peer_ips
    w.h["p1"].innernet("fetch", w.lab.ifname("p1"), "--no-write-hosts")
    assert p1_ip_of_p2 in device_peer_ips(w.h["p1"], w.lab.ifname("p1"))
    srv.server("apply", net, path, "--yes")
    assert "No changes" in srv.server("apply", net, path, "--dry-run").stdout
    # Peers' devices follow: p2, disabled, leaves p1's device at its next fetch.
    w.h["p1"].innernet("fetch", w.lab.ifname("p1"), "--no-write-hosts")
    assert p1_ip_of_p2 not in device_peer_ips(w.h["p1"], w.lab.ifname("p1"))
    # Put it back as it was, over the API this time.
    with open(w.h["admin"].path("net.toml"), "w") as f:
        f.write(doc)
    out = w.h["admin"].innernet("apply", w.lab.ifname("admin"), w.h["admin"].path("net.toml"),
                                "--yes")
    assert "- cidr ops (10.66.3.0/24)" in out.stdout
    w.h["p1"].innernet("fetch", w.lab.ifname("p1"), "--no-write-hosts")
    assert p1_ip_of_p2 in device_peer_ips(w.h["p1"], w.lab.ifname("p1"))


BAD = """network = "{net}"
cidr = "10.66.0.0/16"

[[cidrs]]
name = "humans"
cidr = "10.66.1.0/24"
parent = "{net}"

[[cidrs]]
name = "wide"
cidr = "10.66.0.0/23"
parent = "{net}"

[[cidrs]]
name = "lost"
cidr = "10.66.8.0/24"
parent = "nowhere"

[[peers]]
name = "admin"
ip = "10.66.1.1"
cidr = "humans"

[[peers]]
name = "admin"
ip = "10.66.1.9"
cidr = "humans"
"""


def test_an_invalid_file_names_every_problem_and_applies_nothing(w):
    admin = w.h["admin"]
    path = admin.path("bad.toml")
    with open(path, "w") as f:
        f.write(BAD.format(net=w.net))
    before = db_bytes(w)
    out = admin.innernet("apply", w.lab.ifname("admin"), path, "--yes", check=False)
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert any(line.startswith(f"{path}, line 9: CIDR 'wide': 10.66.0.0/23 overlaps "
                               "sibling ") for line in lines), lines
    assert f"{path}, line 17: CIDR 'lost': parent 'nowhere' is not in the file" in lines
    assert f"{path}, line 25: peer name 'admin' is used twice" in lines
    assert lines[-1] == f"innernet: error: 3 problem(s) in {path}; nothing applied"
    with open(path, "w") as f:
        f.write('network = "x"\n[[cidrs]\n')
    out = admin.innernet("apply", w.lab.ifname("admin"), path, check=False)
    assert out.returncode == 1 and "line 2" in out.stderr
    assert db_bytes(w) == before


def test_every_admin_verb_leaves_one_audit_row_with_its_actor(w):
    admin, srv, net = w.h["admin"], w.srv, w.net
    a_if = w.lab.ifname("admin")
    me = "admin (10.66.1.1)"
    steps = [
        (admin, ["add-cidr", a_if, "--name", "lab", "--cidr", "10.66.4.0/24", "--parent", net,
                 "--yes"], me, "add-cidr"),
        (admin, ["add-peer", a_if, "--name", "bot", "--cidr", "lab", "--auto-ip", "--admin",
                 "false", "--invite-expires", "1h", "--save-config", admin.path("bot.toml"),
                 "--routes", "192.168.50.0/24", "--yes"], me, "add-peer"),
        (admin, ["reinvite", a_if, "--name", "bot", "--invite-expires", "2h", "--save-config",
                 admin.path("bot2.toml"), "--yes"], me, "reinvite"),
        (admin, ["approve-routes", a_if, "--name", "bot", "--revoke", "--yes"], me,
         "revoke-routes"),
        (admin, ["approve-routes", a_if, "--name", "bot", "--yes"], me, "approve-routes"),
        (admin, ["rename-peer", a_if, "--name", "bot", "--new-name", "robot", "--yes"], me,
         "rename-peer"),
        (admin, ["add-association", a_if, "lab", "humans", "--yes"], me, "add-association"),
        (admin, ["delete-association", a_if, "lab", "humans", "--yes"], me,
         "delete-association"),
        (admin, ["disable-peer", a_if, "--name", "p1", "--yes"], me,
         "disable-peer"),
        (admin, ["enable-peer", a_if, "--name", "p1", "--yes"], me, "enable-peer"),
        (admin, ["delete-peer", a_if, "--name", "robot", "--yes"], me, "delete-peer"),
        (srv, ["rename-cidr", net, "--name", "lab", "--new-name", "lab2", "--yes"],
         "server-cli", "rename-cidr"),
        (srv, ["delete-cidr", net, "--name", "lab2", "--yes"], "server-cli", "delete-cidr"),
    ]
    for host, argv, actor, action in steps:
        before = audit(w)
        if host is srv:
            srv.server(*argv)
        else:
            host.innernet(*argv)
        new = audit(w)[len(before):]
        assert [(a, b) for a, b, _ in new] == [(actor, action)], (argv, new)
    # Over the API: only admins read it.
    rows = json.loads(admin.innernet("audit", a_if, "--json").stdout)
    assert rows[-1]["action"] == "delete-cidr" and rows[-1]["actor"] == "server-cli"
    out = w.h["p1"].innernet("audit", w.lab.ifname("p1"), check=False)
    assert out.returncode == 1 and "admin rights required" in out.stderr
    text = srv.server("audit", net, "--since", "1h").stdout
    assert f"{me}  add-peer  peer bot" in text


def test_metrics_parse_and_move_with_requests_and_relayed_traffic(w):
    def state_requests(m):
        return sum(v for (name, labels), v in m.items()
                   if name == "innernet_api_requests_total"
                   and ("route", "GET /v1/user/state") in labels)
    first = scrape(w)
    n = state_requests(first)
    # p1 and p2 were disabled and enabled again above: the server's device lost
    # their sessions, and WireGuard starts a new one within 15 s of unanswered data.
    for name in ("p1", "p2"):
        wait_for(lambda: w.h[name].innernet("fetch", w.lab.ifname(name), "--no-write-hosts",
                                            check=False).returncode == 0, 40,
                 f"{name} to fetch again")
    assert state_requests(scrape(w)) >= n + 2          # 200s and 304s
    assert first[("innernet_peers", (("state", "enabled"),))] == 3
    assert first[("innernet_db_write_seconds_count", ())] >= 0
    # p3 and p4 cannot reach each other directly (p3 drops p4's underlay): they go
    # through the end-to-end relay, and its byte counter moves.
    p3, p4 = w.h["p3"], w.h["p4"] = w.lab.add_host("p3"), w.lab.add_host("p4")
    p3.exec(["nft", "-f", "-"], input=f"""table inet block {{
  chain input {{ type filter hook input priority 0; ip saddr {p4.underlay} drop; }}
  chain output {{ type filter hook output priority 0; ip daddr {p4.underlay} drop; }}
}}
""")
    for host in (p3, p4):
        host.innernet("install", "--name", w.lab.ifname(host.name), "--no-write-hosts",
                      invite(w.srv, w.net, host.name, "humans"))
    relayed = scrape(w)[("innernet_relay_bytes_total", ())]
    for host in (p3, p4):
        host.spawn(host.innernet_argv("up", w.lab.ifname(host.name), "--daemon",
                                      "--no-write-hosts"), f"up-{host.name}.log")
    p4_ip = peer_ip(w, "p4")
    start_echo(p4, p4_ip)
    wait_for(lambda: tcp_reach(p3, p4_ip), 40, "p3 to reach p4 through the relay")
    after = scrape(w)
    assert after[("innernet_relay_bytes_total", ())] > relayed
    assert after[("innernet_relay_pairs", ())] >= 1
    assert after[("innernet_peers_online", ())] >= 2
    assert after[("innernet_redemptions_total", ())] >= 2


def peer_ip(w, name):
    with sqlite3.connect(w.db) as db:
        return db.execute("SELECT ip FROM peers WHERE name = ?", (name,)).fetchone()[0]


def test_status_says_it_on_one_screen(w):
    out = w.srv.server("status", w.net).stdout
    assert "serve: running (pid" in out
    assert f"dns: {w.net}.wg" in out
    st = json.loads(w.srv.server("status", w.net, "--json").stdout)
    assert st["peers"] == 5 and st["online"] >= 2 and st["serving"] is True
    # serve says what it relays within a second of a change.
    wait_for(lambda: json.loads(w.srv.server("status", w.net, "--json").stdout)
             ["relayed_pairs"] >= 1, 10, "status to count the relayed pair")


def test_the_metrics_listener_answers_only_metrics(w):
    r = w.srv.python("import urllib.request, urllib.error, sys\ntry:\n"
                     "    urllib.request.urlopen('http://%s/v1/user/state' % sys.argv[1])\n"
                     "except urllib.error.HTTPError as e:\n    print(e.code)\n", METRICS)
    assert r.stdout.strip() == "404"
    assert urllib is not None
