"""The threat model in README "Security": every numbered promise names a test,
and every test it names exists (issue 28)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = {"threat_client": "e2e/test_threat_client.py"}


def promises():
    """{number: text} of the numbered promises in README's Security section."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    found = {}
    for m in re.finditer(r"^(\d+)\. (.*?)(?=^\d+\. |^\*|^\*\*|\Z)", section, re.M | re.S):
        assert int(m.group(1)) not in found, f"promise {m.group(1)} is numbered twice"
        found[int(m.group(1))] = m.group(2)
    return found


def named_tests(text):
    """(file under tests/, test name) for each `file::test` (or `::test`, same file)."""
    out, last = [], None
    for path, name in re.findall(r"`([\w/.]*)::(test_\w+)`", text.replace("\n   ", "")):
        path = SHORT.get(path, path) if path else last
        out.append((path, name))
        last = path
    return out


def test_every_promise_names_tests_that_exist():
    ps = promises()
    assert sorted(ps) == list(range(1, len(ps) + 1)) and len(ps) >= 20
    for n, text in ps.items():
        tests = named_tests(text)
        assert tests, f"promise {n} names no test"
        for path, name in tests:
            with open(os.path.join(ROOT, "tests", path)) as f:
                assert re.search(rf"^def {name}\(", f.read(), re.M), f"promise {n}: {path}::{name}"
