"""README.md for its readers (issue 31): a table of contents that matches its
headings, commands a fresh root Debian can run (no sudo there), and no
pointer into a place a user of the project does not have."""
import os
import re

from helpers import ROOT


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def anchor(title):
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def test_the_contents_list_every_heading_in_order_with_working_anchors():
    text = readme()
    toc = text.split("\n## Contents\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^ *\* \[(.+?)\]\(#(.+?)\)$", toc, re.M)
    headings = [t for t in re.findall(r"^#{2,3} (.+)$", text, re.M) if t != "Contents"]
    assert [t for t, _ in listed] == headings
    assert all(a == anchor(t) for t, a in listed)


def test_the_order_an_operator_reads_in():
    tops = re.findall(r"^## (.+)$", readme(), re.M)
    order = ["Contents", "Requirements", "Install", "Quick start", "Operating it", "The manual",
             "Security", "Performance", "Hacking"]
    assert [t for t in tops if t in order] == order and tops[-1] == "Hacking"
    ops = readme().split("\n## Operating it\n", 1)[1].split("\n## ", 1)[0]
    for sub in ("Upgrade", "Backup and restore", "Logs", "Troubleshooting",
                "Version compatibility"):
        assert f"\n### {sub}\n" in ops, sub


def test_the_quick_start_is_five_commands():
    quick = readme().split("\n## Quick start\n", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", quick, re.S)
    commands = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()
                if line.strip()]
    assert len(commands) == 5, commands


def test_no_command_says_sudo_and_no_link_leaves_the_project():
    text = readme()
    blocks = "\n".join(re.findall(r"```\w*\n(.*?)```", text, re.S))
    inline = re.findall(r"`([^`\n]+)`", text)
    assert not [c for c in blocks.splitlines() + inline if re.match(r"\s*sudo\s+\S", c)]
    assert "/work/" not in text and "../shared" not in text and "spec §" not in text
    for target in re.findall(r"\]\((?!https?:|#)([^)]+)\)", text):
        assert os.path.exists(os.path.join(ROOT, target)), target


def test_the_backup_command_copies_a_database_the_server_then_reads(tmp_path, capsys):
    """"Backup and restore", as printed, on a network the server CLI made."""
    import shlex
    import subprocess
    import sys

    import innernet
    from helpers import cli_network
    cli_network(tmp_path, capsys)
    ops = readme().split("\n### Backup and restore\n", 1)[1].split("\n### ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", ops, re.S).group(1).replace("\\\n", " ")
    (line,) = [x for x in block.splitlines() if x.startswith("python3 -c")]
    argv = shlex.split(line)
    assert argv[-2:] == ["/var/lib/innernet-server/evilcorp.db", "/root/backup/evilcorp.db"]
    (tmp_path / "restored").mkdir()
    argv[-2:] = [str(tmp_path / "lib" / "evil.db"), str(tmp_path / "restored" / "evil.db")]
    subprocess.run([sys.executable] + argv[1:], check=True)
    assert innernet.main(["-c", str(tmp_path / "etc"), "-d", str(tmp_path / "restored"),
                          "server", "list-cidrs", "evil"]) == 0
    assert "10.66.1.0/24 h" in capsys.readouterr().out


def test_the_quick_starts_server_commands_run_as_printed(tmp_path, capsys, monkeypatch):
    """The first three commands of "Quick start" (serve and join need a device:
    tests/e2e runs those), with this test's directories."""
    import shlex

    import innernet
    monkeypatch.chdir(tmp_path)
    quick = readme().split("\n## Quick start\n", 1)[1].split("\n### ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", quick, re.S).group(1).replace("\\\n", " ")
    lines = [shlex.split(x) for x in block.splitlines() if x.strip()]
    assert [x[:3] for x in lines] == [["./innernet.pyz", "server", v]
                                      for v in ("new", "add-cidr", "add-peer", "serve")]
    for argv in lines[:3]:
        assert innernet.main(["-c", str(tmp_path / "etc"), "-d", str(tmp_path / "lib")]
                             + argv[1:]) == 0, capsys.readouterr().err
    assert (tmp_path / "alice.toml").exists()
