"""The command line: non-interactive verbs, errors as one line plus a hint."""
import os
import sqlite3
import stat

import pytest

import innernet


@pytest.fixture
def srv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["-c", str(tmp_path / "etc"), "-d", str(tmp_path / "lib"), "server"]

    def run(*args):
        return innernet.main(base + list(args))
    assert run("new", "--network-name", "evil", "--network-cidr", "10.66.0.0/16",
               "--external-endpoint", "198.18.0.1:51820", "--listen-port", "51820") == 0
    run.db = str(tmp_path / "lib" / "evil.db")
    run.tmp = tmp_path
    return run


def rows(db, sql):
    return sqlite3.connect(db).execute(sql).fetchall()


def test_new_creates_private_files(srv):
    conf = srv.tmp / "etc" / "evil.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert stat.S_IMODE((srv.tmp / "etc").stat().st_mode) == 0o700
    assert stat.S_IMODE(os.stat(srv.db).st_mode) == 0o600
    assert "network-cidr-prefix = 16" in conf.read_text()
    assert rows(srv.db, "PRAGMA user_version") == [(2,)]


def test_new_twice_is_refused(srv, capsys):
    assert srv("new", "--network-name", "evil", "--network-cidr", "10.66.0.0/16",
               "--external-endpoint", "198.18.0.1:51820", "--listen-port", "51820") == 1
    assert "innernet: error: network evil already exists" in capsys.readouterr().err


def test_docker_scenario_setup(srv, capsys):
    # innernet's docker-tests start-server.sh, verbatim apart from paths
    assert srv("add-cidr", "evil", "--name", "humans", "--cidr", "10.66.1.0/24", "--parent",
               "evil", "--yes") == 0
    assert srv("add-peer", "evil", "--name", "admin", "--cidr", "humans", "--admin", "true",
               "--auto-ip", "--save-config", "peer1.toml", "--invite-expires", "30d", "--yes") == 0
    inv = srv.tmp / "peer1.toml"
    assert stat.S_IMODE(inv.stat().st_mode) == 0o600        # innernet: umask-dependent
    cfg = innernet.InterfaceConfig.from_toml(inv.read_text(), "peer1.toml")
    assert str(cfg.address) == "10.66.1.1/16" and cfg.network_name == "evil"
    assert cfg.server_internal_endpoint == "10.66.0.1:51820"
    assert cfg.server_external_endpoint == "198.18.0.1:51820"
    (row,) = rows(srv.db, "SELECT name, ip, is_admin, is_redeemed, public_key FROM peers WHERE id=2")
    assert row[:4] == ("admin", "10.66.1.1", 1, 0)
    assert row[4] == innernet.public_key(cfg.private_key)
    assert cfg.private_key not in capsys.readouterr().err


def test_add_peer_refusals_leave_nothing(srv, capsys):
    srv("add-cidr", "evil", "--name", "humans", "--cidr", "10.66.1.0/24", "--parent", "evil",
        "--yes")
    cases = [
        (["--name", "x", "--cidr", "nope", "--auto-ip"], "--cidr 'nope' does not exist"),
        (["--name", "Bad Name", "--cidr", "humans", "--auto-ip"], "invalid peer name"),
        (["--name", "x", "--cidr", "humans", "--ip", "10.66.2.1"], "10.66.2.1 is not an assignable"),
        (["--name", "x", "--cidr", "humans", "--auto-ip", "--admin", "false",
          "--invite-expires", "7y"], "invalid duration"),
        (["--name", "x", "--cidr", "humans", "--auto-ip", "--admin", "maybe"],
         "expected true or false"),
        (["--name", "x", "--cidr", "humans"], "missing --ip or --auto-ip"),
        (["--name", "x", "--cidr", "humans", "--auto-ip", "--admin", "false",
          "--invite-expires", "1d", "--save-config", "x.toml"], "missing --yes"),
    ]
    for extra, message in cases:
        assert srv("add-peer", "evil", *extra) == 1
        err = capsys.readouterr().err
        assert f"innernet: error: {message}" in err, (extra, err)
        assert "Traceback" not in err
    assert rows(srv.db, "SELECT count(*) FROM peers") == [(1,)]
    assert not os.path.exists(srv.tmp / "x.toml")


def test_existing_invitation_path_is_not_overwritten(srv, capsys):
    srv("add-cidr", "evil", "--name", "humans", "--cidr", "10.66.1.0/24", "--parent", "evil",
        "--yes")
    (srv.tmp / "taken.toml").write_text("mine")
    assert srv("add-peer", "evil", "--name", "x", "--cidr", "humans", "--auto-ip", "--admin",
               "false", "--invite-expires", "1d", "--save-config", "taken.toml", "--yes") == 1
    assert (srv.tmp / "taken.toml").read_text() == "mine"
    assert rows(srv.db, "SELECT count(*) FROM peers") == [(1,)]


def test_lists_and_associations(srv, capsys):
    srv("add-cidr", "evil", "--name", "humans", "--cidr", "10.66.1.0/24", "--parent", "evil", "--yes")
    srv("add-cidr", "evil", "--name", "robots", "--cidr", "10.66.2.0/24", "--parent", "evil", "--yes")
    capsys.readouterr()
    assert srv("add-association", "evil", "humans", "robots") == 0
    assert srv("add-association", "evil", "robots", "humans") == 1
    capsys.readouterr()
    assert srv("list-associations", "evil") == 0
    assert capsys.readouterr().out == "1: humans <=> robots\n"
    assert srv("list-cidrs", "evil", "--tree") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "10.66.0.0/16 evil" and "  10.66.2.0/24 robots" in out
    assert srv("list-cidrs", "evil", "--json") == 0
    assert '"name": "robots"' in capsys.readouterr().out
    # delete-association by the number list-associations shows, or says what it looked for
    assert srv("delete-association", "evil", "7", "--yes") == 1
    err = capsys.readouterr().err
    assert err.startswith("innernet: error: no association names CIDR or number '7'\n") \
        and "list-associations evil" in err
    assert srv("delete-association", "evil", "1", "--yes") == 0
    assert rows(srv.db, "SELECT count(*) FROM associations") == [(0,)]


def test_invoked_as_innernet_server(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(innernet.sys, "argv", ["/usr/bin/innernet-server"])
    assert innernet.main(["-c", str(tmp_path / "e"), "-d", str(tmp_path / "l"), "new",
                          "--network-name", "n1", "--network-cidr", "10.9.0.0/16",
                          "--external-endpoint", "198.18.0.1:1", "--listen-port", "1"]) == 0
    assert (tmp_path / "e" / "n1.conf").exists()
    with pytest.raises(SystemExit):
        innernet.main(["install", "x"])                     # not a server verb
    assert "innernet-server" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["server", "new"], "missing --network-name"),
    (["server", "new", "--network-name", "Bad"], "invalid interface name"),
    (["server", "new", "--network-name", "ok", "--network-cidr", "10.0.0.0/33"], "invalid CIDR"),
    (["server", "serve", "missing"], "no network named missing"),
    (["fetch"], "no networks are installed"),
    (["fetch", "nope"], "no network named nope is installed"),
    (["install", "/nonexistent.toml"], "invitation /nonexistent.toml does not exist"),
])
def test_errors_are_one_line_with_exit_1(tmp_path, capsys, argv, message):
    base = ["-c", str(tmp_path / "c"), "-d", str(tmp_path / "d")]
    assert innernet.main(base + argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"innernet: error: {message}"), err
    assert "Traceback" not in err


def test_bad_invitation_file(tmp_path, capsys):
    bad = tmp_path / "invite.toml"
    bad.write_bytes(b"\xff\xfe garbage")
    assert innernet.main(["-c", str(tmp_path), "install", str(bad)]) == 1
    assert "not UTF-8" in capsys.readouterr().err
    bad.write_text("[interface]\nnetwork-name = 3\n")
    assert innernet.main(["-c", str(tmp_path), "install", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "innernet: error:" in err and "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        innernet.main(["--backend", "magic", "show"])
    assert e.value.code == 2


def _verb_names(server_mode):
    """Every verb and alias of the whole parser, with 'server X' for each server verb."""
    tree = innernet._command_tree(innernet.build_parser(server_mode))
    return [[v] for v in tree] + [["server", s] for s in tree.get("server", ((), (), {}))[2]]


def _run(capsys, argv, **kw):
    """(exit status, stdout, stderr) of main(argv)."""
    try:
        code = innernet.main(argv, **kw)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("server_mode", [False, True])
def test_only_the_verb_being_run_is_built_and_it_parses_as_with_all(server_mode):
    # main builds only the named verb's parser (and up's beside fetch's): the
    # others are named in the help, unbuilt; each verb parses as before.
    for words in _verb_names(server_mode):
        whole, lazy = innernet.build_parser(server_mode), innernet.build_parser(server_mode,
                                                                                 words)
        argv = words + (["IFACE"] if words[-1] not in ("server",) else [])
        try:
            expected = vars(whole.parse_known_args(argv)[0])
        except SystemExit:
            continue                          # its arguments are other ones: --help below
        got = vars(lazy.parse_known_args(argv)[0])
        assert {k: v for k, v in got.items() if k != "func"} == \
            {k: v for k, v in expected.items() if k != "func"}, words
        assert got.get("func") == expected.get("func"), words
    sub = next(a for a in innernet.build_parser(server_mode, ["status"])._actions
               if isinstance(a, innernet.argparse._SubParsersAction))
    built = {n for n, p in sub.choices.items() if not p.unbuilt}
    assert built == {"status"}
    sub = next(a for a in innernet.build_parser(False, ["fetch"])._actions
               if isinstance(a, innernet.argparse._SubParsersAction))
    assert {n for n, p in sub.choices.items() if not p.unbuilt} == {"fetch", "up"}


@pytest.mark.parametrize("server_mode", [False, True])
def test_help_and_usage_errors_are_the_same_as_with_every_verb_built(server_mode, capsys,
                                                                     monkeypatch):
    whole = innernet.build_parser
    cases = [[], ["--help"], ["-h", "fetch"], ["--version"], ["bogus"], ["fetch", "--bogus"],
             ["show", "--daemon"], ["server"], ["server", "bogus"], ["-c"],
             ["fetch", "--exit-node", "x"], ["--backend", "magic", "show"]]
    cases += [words + ["--help"] for words in _verb_names(server_mode)]
    for argv in cases:
        lazy = _run(capsys, argv, server_mode=server_mode)
        monkeypatch.setattr(innernet, "build_parser", lambda s, verbs=None: whole(s))
        assert _run(capsys, argv, server_mode=server_mode) == lazy, argv
        monkeypatch.setattr(innernet, "build_parser", whole)


def test_a_wrong_guess_of_the_verb_builds_them_all(tmp_path, capsys):
    # "--conf" (an abbreviated --config-dir) takes "show" as its value, so the
    # verb is "fetch", not the "show" _named_verbs saw: its parser was unbuilt.
    assert innernet._named_verbs(["--conf", "show", "fetch"]) == ["show"]
    code, out, err = _run(capsys, ["-d", str(tmp_path), "--conf", "show", "fetch"])
    assert code == 1 and "no networks are installed" in err, err


def test_named_verbs_skip_the_global_options():
    nv = innernet._named_verbs
    assert nv(["-c", "fetch", "-d", "up", "-v", "--backend", "kernel", "show", "x"]) == ["show"]
    assert nv(["server", "--config-dir", "new", "add-peer", "new"]) == ["server", "add-peer"]
    assert nv(["--mtu=1400", "up", "--daemon"]) == ["up"]
    assert nv(["--", "fetch"]) == [] and nv(["-v"]) == []
