"""What an outside operator's review found (status, join, down, server new,
Ctrl-C, durations), each checked where it is pure or with its I/O faked."""
import ipaddress
import json
import types

import pytest

import innernet


def client_config(name, server_key=None):
    return innernet.InterfaceConfig(
        name, ipaddress.ip_interface("10.9.0.2/16"), innernet.generate_private_key(), None,
        server_key or innernet.public_key(innernet.generate_private_key()),
        "198.18.0.1:51820", "10.9.0.1:51820").to_toml()


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(innernet, "existing_backend", lambda choice, iface: None)
    (tmp_path / "etc").mkdir()
    (tmp_path / "lib").mkdir()
    return tmp_path, ["-c", str(tmp_path / "etc"), "-d", str(tmp_path / "lib")]


def test_elapsed_times_are_rounded_for_people():
    assert innernet.rough_duration(5.04505467414856) == "5s"
    assert innernet.rough_duration(180.63) == "3m 1s"
    assert innernet.rough_duration(93784.2) == "1d 2h"
    assert innernet.rough_duration(-3) == "0s"


def test_status_reports_a_broken_network_and_the_others(dirs, capsys):
    tmp, argv = dirs
    (tmp / "etc" / "good.conf").write_text(client_config("good"))
    (tmp / "etc" / "bad.conf").write_text("[interface\n")
    assert innernet.main(argv + ["status", "--json"]) == 1
    got = {h["interface"]: h for h in json.loads(capsys.readouterr().out)}
    assert got["bad"]["healthy"] is False and "bad.conf" in got["bad"]["error"]
    assert got["good"]["error"] is None and "interface_up" in got["good"]
    assert innernet.main(argv + ["status"]) == 1
    out = capsys.readouterr().out
    assert "network bad: NOT HEALTHY\n  error: " in out and "network good:" in out


def test_status_json_without_networks_is_an_empty_list(dirs, capsys):
    assert innernet.main(dirs[1] + ["status", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"


def test_status_names_the_verb_of_the_last_successful_sync(dirs, capsys):
    tmp, argv = dirs
    (tmp / "etc" / "net.conf").write_text(client_config("net"))
    ok = innernet.sync_status("net", 100.0, None, "10.9.0.1:51820", "daemon")
    failed = innernet.sync_status("net", 200.0, "boom", "10.9.0.1:51820", "fetch",
                                  ok["last_success"], success_by=ok["last_success_by"])
    innernet.write_status_file(str(tmp / "lib"), "net", failed)
    innernet.main(argv + ["status", "net"])
    out = capsys.readouterr().out
    assert "(by daemon)" in out and "(by fetch)" not in out


def test_a_join_stopped_after_its_redemption_is_finished_with_fetch(tmp_path):
    files = innernet.ClientFiles("net", str(tmp_path / "etc"), str(tmp_path / "lib"))
    (tmp_path / "etc").mkdir()
    server_key = innernet.public_key(innernet.generate_private_key())
    (tmp_path / "etc" / "net.conf").write_text(client_config("net", server_key))
    invite = types.SimpleNamespace(server_public_key=server_key)
    assert "innernet fetch net' to finish joining" in innernet._installed_hint(files, invite)
    other = types.SimpleNamespace(server_public_key="x")
    assert "uninstall" in innernet._installed_hint(files, other)


def test_down_of_a_network_not_installed_says_so(dirs, capsys, monkeypatch):
    monkeypatch.setattr(innernet, "bring_down", lambda choice, iface: False)
    monkeypatch.setattr(innernet, "leave_exit", lambda args, iface: None)
    assert innernet.main(dirs[1] + ["down", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert "no network named nosuch is installed" in err and "not up" not in err


def test_server_new_on_an_existing_network_does_not_hint_uninstall(dirs, capsys, monkeypatch):
    tmp, argv = dirs
    monkeypatch.chdir(tmp)
    new = argv + ["server", "new", "--network-name", "evil", "--network-cidr", "10.66.0.0/16",
                  "--external-endpoint", "198.18.0.1:51820", "--listen-port", "51820"]
    assert innernet.main(new) == 0
    capsys.readouterr()
    assert innernet.main(new) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "uninstall" not in err


def test_a_ctrl_c_while_starting_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(innernet, "build_parser", interrupted)
    assert innernet.main(["show"]) == innernet.EXIT_INTERRUPTED == 130
    monkeypatch.setattr(innernet, "fast_fetch", interrupted)
    with pytest.raises(SystemExit) as e:
        innernet.launch()
    assert e.value.code == 130
    assert "Traceback" not in capsys.readouterr().err
