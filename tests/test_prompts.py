"""Interactive use: prompts answered through a pseudo-terminal, and completions."""
import os
import pty
import select
import shutil
import subprocess
import sys
import time

import pytest

import innernet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def converse(argv, dialog, timeout=20):
    """Run argv on a pty; for each (expected text, answer) wait, then type."""
    pid, fd = pty.fork()
    if pid == 0:                                            # child
        os.execv(sys.executable, [sys.executable, os.path.join(ROOT, "innernet.py")] + argv)
    seen = transcript = b""
    deadline = time.monotonic() + timeout
    try:
        for expected, answer in dialog:
            while expected.encode() not in seen:
                left = deadline - time.monotonic()
                assert left > 0, f"no prompt {expected!r}; got {seen.decode(errors='replace')}"
                ready, _, _ = select.select([fd], [], [], left)
                if ready:
                    try:
                        chunk = os.read(fd, 4096)
                    except OSError:
                        chunk = b""
                    assert chunk, f"exited before {expected!r}: {seen.decode(errors='replace')}"
                    seen += chunk
                    transcript += chunk
            seen = seen[seen.index(expected.encode()) + len(expected):]
            os.write(fd, answer.encode() + b"\n")
        while True:                                          # drain until exit
            ready, _, _ = select.select([fd], [], [], max(0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            transcript += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), transcript.decode(errors="replace")


def test_server_verbs_answered_at_their_prompts(tmp_path):
    base = ["-c", str(tmp_path / "etc"), "-d", str(tmp_path / "lib"), "server"]
    code, out = converse(base + ["new"], [
        ("network name", "evil"),
        ("network CIDR [10.42.0.0/16]", ""),
        ("listen port [51820]", "not-a-port"),             # a wrong answer is asked again
        ("listen port [51820]", ""),
        ("external endpoint", "198.18.0.1:51820"),
    ])
    assert code == 0, out
    assert "invalid port" in out
    conf = (tmp_path / "etc" / "evil.conf").read_text()
    assert 'address = "10.42.0.1"' in conf and "listen-port = 51820" in conf
    code, out = converse(base + ["add-cidr", "evil"], [
        ("CIDR name", "humans"), ("CIDR: ", "10.42.1.0/24"), ("parent CIDR", "1"),
        ("[Y/n]", "y")])
    assert code == 0, out
    save = tmp_path / "alice.toml"
    code, out = converse(base + ["add-peer", "evil"], [
        ("CIDR for the new peer", "humans"), ("IP address [10.42.1.1]", ""),
        ("peer name", "alice"), ("admin? (true/false) [false]", "true"),
        ("expires after [14d]", "2h"), ("save the invitation as [alice.toml]", str(save)),
        ("[Y/n]", "")])
    assert code == 0, out
    cfg = innernet.InterfaceConfig.from_toml(save.read_text(), "alice")
    assert str(cfg.address) == "10.42.1.1/16"
    store = innernet.Store(str(tmp_path / "lib" / "evil.db"))
    alice = store.peer_by_name("alice")
    assert alice.is_admin and 7000 < alice.invite_expires - time.time() <= 7200


def test_declining_the_confirmation_changes_nothing(tmp_path):
    base = ["-c", str(tmp_path / "etc"), "-d", str(tmp_path / "lib"), "server"]
    assert innernet.main(base + ["new", "--network-name", "evil", "--network-cidr",
                                 "10.42.0.0/16", "--external-endpoint", "198.18.0.1:1",
                                 "--listen-port", "1"]) == 0
    code, out = converse(base + ["add-cidr", "evil", "--name", "x", "--cidr", "10.42.5.0/24",
                                 "--parent", "evil"], [("[Y/n]", "n")])
    assert code == 1 and "cancelled" in out
    assert innernet.Store(str(tmp_path / "lib" / "evil.db")).cidr_by_name("x") is None


@pytest.mark.parametrize("server", [False, True])
def test_bash_completion_is_valid_and_complete(server):
    script = innernet.completion_script("bash", server)
    if shutil.which("bash"):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    verbs = ("new", "serve", "add-peer", "uninstall") if server else \
        ("install", "override-peer-endpoint", "set-listen-port", "server")
    for verb in verbs:
        assert f"{verb})" in script


def test_zsh_and_fish_completions_name_every_verb():
    fish = innernet.completion_script("fish", False)
    zsh = innernet.completion_script("zsh", False)
    assert zsh.startswith("#compdef innernet")
    for verb in ("install", "fetch", "rename-cidr", "completions"):
        assert f"-a {verb} " in fish and f"{verb})" in zsh
    assert "-l hosts-path" in fish


def test_wrong_answers_are_explained_and_asked_again(tmp_path):
    """A bad interface name at the install prompt, a bad CIDR menu choice (issue 19.10),
    and the invitation's lifetime said as a duration (19.8)."""
    base = ["-c", str(tmp_path / "etc"), "-d", str(tmp_path / "lib")]
    assert innernet.main(base + ["server", "new", "--network-name", "evil", "--network-cidr",
                                 "10.42.0.0/16", "--external-endpoint", "198.18.0.1:51820",
                                 "--listen-port", "51820"]) == 0
    assert innernet.main(base + ["server", "add-cidr", "evil", "--name", "humans", "--cidr",
                                 "10.42.1.0/24", "--parent", "evil", "--yes"]) == 0
    save = tmp_path / "bob.toml"
    code, out = converse(base + ["server", "add-peer", "evil"], [
        ("CIDR for the new peer", "7"),                     # not on the menu
        ("CIDR for the new peer", "nosuch"),
        ("CIDR for the new peer", "1"),
        ("IP address [10.42.1.1]", ""), ("peer name", "bob"),
        ("admin? (true/false) [false]", ""), ("expires after [14d]", "0s"),
        ("expires after [14d]", ""), ("save the invitation as [bob.toml]", str(save)),
        ("[Y/n]", "")])
    assert code == 0, out
    assert "'7' is not one of the choices" in out and "'nosuch' is not one of the choices" in out
    assert "at least 1 s" in out
    assert "(expires in 2w)" in out and "1209600" not in out
    # install: a wrong interface name is asked again (not an abort); the second,
    # valid one then stops at "already installed", before any device is made
    (tmp_path / "etc" / "good.conf").write_text("")
    client = ["-c", str(tmp_path / "etc"), "-d", str(tmp_path / "lib")]
    code, out = converse(client + ["install", str(save)], [
        ("interface name [evil]", "Bad Name!"), ("interface name [evil]", "good")])
    assert code == 1 and "invalid interface name 'Bad Name!'" in out
    assert "network good is already installed" in out
