"""Operating the network (issue 16): export and apply with a plan, the audit log,
on a real SQLite file through the server CLI and the admin API."""
import json
import os

import pytest

import innernet
from helpers import call, cli_network, make_coordinator


def run(base, capsys, *args):
    code = innernet.main(base + list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def net(tmp_path, capsys):
    base = cli_network(tmp_path, capsys)
    for args in (["add-cidr", "evil", "--name", "robots", "--cidr", "10.66.2.0/24", "--parent",
                  "evil", "--yes"],
                 ["add-peer", "evil", "--name", "alice", "--cidr", "h", "--ip", "10.66.1.1",
                  "--admin", "true", "--invite-expires", "1h", "--save-config",
                  str(tmp_path / "alice.toml"), "--yes"],
                 ["add-peer", "evil", "--name", "bob", "--cidr", "h", "--ip", "10.66.1.2",
                  "--admin", "false", "--invite-expires", "1h", "--routes", "192.168.10.0/24",
                  "--save-config", str(tmp_path / "bob.toml"), "--yes"],
                 ["add-association", "evil", "h", "robots", "--yes"]):
        assert innernet.main(base + args) == 0
    capsys.readouterr()
    return base, tmp_path


def db_bytes(tmp_path):
    with open(tmp_path / "lib" / "evil.db", "rb") as f:
        return f.read()


def test_export_then_apply_is_an_empty_plan(net, capsys):
    base, tmp = net
    code, doc, _ = run(base, capsys, "export", "evil")
    assert code == 0
    assert "[[cidrs]]\nname = \"robots\"" in doc and 'routes = ["192.168.10.0/24"]' in doc
    assert "private" not in doc.lower() and "key" not in doc.lower()      # no secrets
    (tmp / "net.toml").write_text(doc)
    before = db_bytes(tmp)
    code, out, _ = run(base, capsys, "apply", "evil", str(tmp / "net.toml"), "--yes")
    assert code == 0 and "No changes" in out
    assert db_bytes(tmp) == before
    # The export is stable: the same bytes twice.
    assert run(base, capsys, "export", "evil")[1] == doc


def test_four_edits_are_four_lines_and_dry_run_changes_nothing(net, capsys):
    base, tmp = net
    doc = run(base, capsys, "export", "evil")[1]
    doc = doc.replace('name = "alice"', 'name = "alicia"')
    doc = doc.replace('name = "bob"\nip = "10.66.1.2"\ncidr = "h"\nadmin = false\n'
                      'disabled = false', 'name = "bob"\nip = "10.66.1.2"\ncidr = "h"\n'
                      'admin = false\ndisabled = true')
    doc += ('\n[[cidrs]]\nname = "ops"\ncidr = "10.66.3.0/24"\nparent = "evil"\n'
            '\n[[associations]]\ncidrs = ["ops", "h"]\n')
    (tmp / "net.toml").write_text(doc)
    before = db_bytes(tmp)
    code, out, _ = run(base, capsys, "apply", "evil", str(tmp / "net.toml"), "--dry-run")
    assert code == 0
    plan = [line for line in out.splitlines() if line[:2] in ("+ ", "~ ", "- ")]
    assert plan == ["+ cidr ops 10.66.3.0/24 in evil",
                    "~ peer 10.66.1.1: name alice -> alicia",
                    "~ peer 10.66.1.2 (bob): disabled false -> true",
                    "+ association h <-> ops"]
    assert db_bytes(tmp) == before
    code, out, err = run(base, capsys, "apply", "evil", str(tmp / "net.toml"), "--yes")
    assert code == 0 and "applied 4 change(s)" in err
    store = innernet.Store(str(tmp / "lib" / "evil.db"))
    assert store.peer_by_name("alicia") and store.peer_by_name("bob").is_disabled
    assert store.cidr_by_name("ops")
    assert run(base, capsys, "apply", "evil", str(tmp / "net.toml"), "--yes")[1].startswith(
        "No changes")
    actions = [(e.actor, e.action) for e in store.audit()][-4:]
    assert actions == [("server-cli", "apply add-cidr"), ("server-cli", "apply update-peer"),
                       ("server-cli", "apply update-peer"),
                       ("server-cli", "apply add-association")]


def test_new_peers_only_as_invitations_and_removals(net, capsys):
    base, tmp = net
    doc = run(base, capsys, "export", "evil")[1]
    doc += '\n[[peers]]\nname = "carol"\nip = "10.66.2.5"\ncidr = "robots"\n'
    doc = doc.replace('\n[[associations]]\ncidrs = ["h", "robots"]\n', "\n")
    (tmp / "net.toml").write_text(doc)
    code, out, err = run(base, capsys, "apply", "evil", str(tmp / "net.toml"), "--yes")
    assert code == 1 and "pass --save-invites DIR" in err
    invites = tmp / "invites"
    code, out, err = run(base, capsys, "apply", "evil", str(tmp / "net.toml"), "--yes",
                         "--save-invites", str(invites))
    assert code == 0, err
    assert "+ peer carol 10.66.2.5 in robots (an invitation)" in out
    assert "- association h <-> robots" in out
    inv = invites / "carol.toml"
    assert oct(inv.stat().st_mode & 0o777) == "0o600"
    cfg = innernet.InterfaceConfig.from_toml(inv.read_text(), "inv")
    store = innernet.Store(str(tmp / "lib" / "evil.db"))
    carol = store.peer_by_name("carol")
    assert not carol.is_redeemed and carol.public_key == innernet.public_key(cfg.private_key)
    # Removing a peer from the file deletes it (its address is quarantined).
    doc = doc.replace('\n[[peers]]\nname = "carol"\nip = "10.66.2.5"\ncidr = "robots"\n', "")
    (tmp / "net.toml").write_text(doc)
    code, out, _ = run(base, capsys, "apply", "evil", str(tmp / "net.toml"), "--yes")
    assert code == 0 and "- peer 10.66.2.5 (carol)" in out
    assert store.peer_by_name("carol") is None


BAD = '''network = "evil"
cidr = "10.66.0.0/16"

[[cidrs]]
name = "h"
cidr = "10.66.1.0/24"
parent = "evil"

[[cidrs]]
name = "clash"
cidr = "10.66.1.128/25"
parent = "evil"

[[cidrs]]
name = "orphan"
cidr = "10.66.9.0/24"
parent = "nowhere"

[[peers]]
name = "alice"
ip = "10.66.1.1"
cidr = "h"

[[peers]]
name = "alice"
ip = "10.66.1.7"
cidr = "h"
'''


def test_an_invalid_file_lists_every_problem_with_its_line_and_applies_nothing(net, capsys):
    base, tmp = net
    (tmp / "bad.toml").write_text(BAD)
    before = db_bytes(tmp)
    code, out, err = run(base, capsys, "apply", "evil", str(tmp / "bad.toml"), "--yes",
                         "--save-invites", str(tmp / "inv"))
    assert code == 1
    lines = err.splitlines()
    f = str(tmp / "bad.toml")
    assert f"{f}, line 9: CIDR 'clash': 10.66.1.128/25 belongs under 'h' (10.66.1.0/24), " \
           "not under 'evil'" in lines
    assert f"{f}, line 17: CIDR 'orphan': parent 'nowhere' is not in the file" in lines
    assert f"{f}, line 25: peer name 'alice' is used twice" in lines
    assert lines[-1] == f"innernet: error: 3 problem(s) in {f}; nothing applied"
    assert db_bytes(tmp) == before and not (tmp / "inv").exists() or \
        not os.listdir(tmp / "inv")
    (tmp / "bad.toml").write_text('network = "evil"\ncidr = [\n')
    code, _, err = run(base, capsys, "apply", "evil", str(tmp / "bad.toml"))
    assert code == 1 and ", line 2: " in err
    (tmp / "bad.toml").write_text('network = "other"\ncidr = "10.66.0.0/16"\ncolour = 1\n')
    code, _, err = run(base, capsys, "apply", "evil", str(tmp / "bad.toml"))
    assert "line 1: this is network 'other', not 'evil'" in err
    assert "line 3: unknown key 'colour'" in err
    assert db_bytes(tmp) == before


def test_audit_rows_name_the_actor(tmp_path):
    co = make_coordinator(tmp_path)
    n = len(co.store.audit())
    assert call(co, "POST", "/v1/admin/cidrs", body={"name": "exp", "cidr": "10.81.0.0/16",
                                                      "parent": 1})[0] == 201
    status, rows = call(co, "GET", "/v1/admin/audit")
    assert status == 200 and len(rows) == n + 1
    assert (rows[-1]["actor"], rows[-1]["action"], rows[-1]["object"]) == \
        ("admin (10.80.1.1)", "add-cidr", "cidr exp")
    assert call(co, "GET", "/v1/admin/audit", "developer1")[0] == 401
    dev = co.store.peer_by_name("developer2")
    assert call(co, "DELETE", f"/v1/admin/peers/{dev.id}")[0] == 204
    assert [(r.action, r.object, json.loads(r.after)) for r in co.store.audit()][-1] == \
        ("disable-peer", "peer developer2", {"disabled": True})
    since = co.store.audit()[-1].at + 1
    assert call(co, "GET", f"/v1/admin/audit?since={since}")[1] == []
    assert call(co, "GET", "/v1/admin/audit?since=x")[0] == 400
    # The sweeper keeps the log for its retention only, and says what it swept.
    co.store.audit_keep = 0
    co.store.sweep_expired(since + 10)
    assert co.store.audit() == []


def test_since_takes_durations_dates_and_unix_seconds():
    assert innernet.parse_since("90m", now=10000) == 10000 - 5400
    assert innernet.parse_since("2026-12-01") == 1796083200
    assert innernet.parse_since("2026-12-01T10:00:00") == 1796083200 + 36000
    assert innernet.parse_since("12345") == 12345
    with pytest.raises(innernet.InnernetError):
        innernet.parse_since("yesterday")


def parse_metrics(text):
    parser = pytest.importorskip("prometheus_client.parser", reason="needs prometheus_client to "
                                 "read the metrics (tests/run.sh installs it)")
    text_string_to_metric_families = parser.text_string_to_metric_families
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families, name, **labels):
    for f in families.values():
        for s in f.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_metrics_parse_and_move(tmp_path):
    co = make_coordinator(tmp_path)
    co.metrics = innernet.Metrics()
    co.store.write_timer = co.metrics.db_write
    first = parse_metrics(co.metrics.render(co))
    assert first["innernet_peers"].type == "gauge"
    assert sample(first, "innernet_peers", state="enabled") == 5
    assert sample(first, "innernet_db_write_seconds_count") == 0
    for _ in range(3):
        call(co, "GET", "/v1/user/state", "developer1")
    call(co, "GET", "/v1/admin/peers", "developer1")
    call(co, "POST", "/v1/admin/cidrs", body={"name": "exp", "cidr": "10.81.0.0/16",
                                              "parent": 1})
    call(co, "GET", "/v1/no/such/7")
    m = parse_metrics(co.metrics.render(co))
    assert sample(m, "innernet_api_requests_total", route="GET /v1/user/state",
                  status="200") == 3
    assert sample(m, "innernet_api_requests_total", route="GET /v1/admin/peers",
                  status="401") == 1
    assert sample(m, "innernet_api_requests_total", route="other", status="404") == 1
    assert sample(m, "innernet_db_write_seconds_count") == 1
    assert sample(m, "innernet_db_write_seconds_bucket", le="+Inf") == 1
    assert m["innernet_peer_handshake_age_seconds"].type == "histogram"


def test_label_values_are_escaped():
    assert innernet._prom_labels([("route", 'a"b\\c\nd')]) == '{route="a\\"b\\\\c\\nd"}'
    assert innernet.route_label("PUT", "/v1/admin/peers/12?x=1") == "PUT /v1/admin/peers/{id}"
    assert innernet.route_label("GET", "/v1/admin/../../etc") == "other"


def test_status_on_one_screen(net, capsys):
    base, tmp = net
    code, out, _ = run(base, capsys, "status", "evil")
    assert code == 0
    assert "serve: not running; the interface is down" in out
    assert "invitations: 2 pending, 0 expired" in out
    code, out, _ = run(base, capsys, "status", "evil", "--json")
    st = json.loads(out)
    assert st["pending_invitations"] == 2 and st["peers"] == 0 and st["database_bytes"] > 0
