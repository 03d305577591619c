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
