"""The artifact: innernet.pyz as users run it, with a bare Python."""
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BARE = ["/usr/bin/python3", "-S", "-I"] if os.path.exists("/usr/bin/python3") \
    else [sys.executable, "-S", "-I"]


def run(pyz, *args, **kw):
    return subprocess.run(BARE + [pyz] + list(args), capture_output=True, text=True,
                          timeout=60, **kw)


def test_help_and_version_with_bare_python(pyz):
    r = run(pyz, "--help")
    assert r.returncode == 0 and "install (join, redeem)" in r.stdout
    r = run(pyz, "--version")
    assert r.returncode == 0 and r.stdout.startswith("innernet.py ")
    r = run(pyz, "server", "--help")
    assert r.returncode == 0 and "serve" in r.stdout


def test_exit_code_of_failing_command_propagates(pyz, tmp_path):
    r = run(pyz, "-c", str(tmp_path), "fetch")
    assert r.returncode == 1 and r.stderr.startswith("innernet: error: no networks")
    r = run(pyz, "--no-such-flag")
    assert r.returncode == 2


def test_output_into_a_closed_pipe_exits_0_quietly(pyz, tmp_path):
    """`innernet.pyz list | head -1`: a reader that has what it wanted (or
    is gone before the first write) is no error, and nothing is printed."""
    base = BARE + [pyz, "-c", str(tmp_path / "etc"), "-d", str(tmp_path / "lib")]
    for argv in (["list"], ["--help"]):
        read, write = os.pipe()
        os.close(read)                                  # gone before the first write
        r = subprocess.run(base + argv, stdout=write, stderr=subprocess.PIPE, timeout=60)
        os.close(write)
        assert (r.returncode, r.stderr) == (0, b""), (argv, r.stderr)
        p = subprocess.Popen(base + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = p.stdout.readline()                     # head -1
        p.stdout.close()
        err = p.stderr.read()
        assert (p.wait(timeout=60), err) == (0, b"") and first, (argv, err)


def test_server_verbs_without_pynacl_or_pyroute2_installed(pyz, tmp_path):
    base = ["-c", str(tmp_path / "etc"), "-d", str(tmp_path / "lib"), "server"]
    assert run(pyz, *base, "new", "--network-name", "n", "--network-cidr", "10.7.0.0/16",
               "--external-endpoint", "198.18.0.1:51820", "--listen-port", "51820").returncode == 0
    assert run(pyz, *base, "add-cidr", "n", "--name", "c", "--cidr", "10.7.1.0/24",
               "--parent", "n", "--yes").returncode == 0
    r = run(pyz, *base, "add-peer", "n", "--name", "p", "--cidr", "c", "--auto-ip", "--admin",
            "false", "--invite-expires", "1d", "--save-config", str(tmp_path / "p.toml"), "--yes")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.toml").exists()


def test_invoked_through_a_symlink_named_innernet_server(pyz, tmp_path):
    link = tmp_path / "innernet-server"
    link.symlink_to(pyz)
    r = subprocess.run(BARE + [str(link), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("usage: innernet-server")


def test_archive_contents(pyz):
    with zipfile.ZipFile(pyz) as z:
        names = set(z.namelist())
    assert {"__main__.py", "innernet.py", "innernet.pyc", "pyroute2/__init__.py",
            "pyroute2/iproute/linux.py"} <= names
    assert not any(n.endswith((".so", ".pyd")) for n in names)
    assert not any("__pycache__" in n for n in names)
    with open(pyz, "rb") as f:
        assert f.readline() == b"#!/bin/sh\n"
    assert os.access(pyz, os.X_OK)


def test_started_as_a_program_it_runs_from_its_preamble(pyz, tmp_path):
    """./innernet.pyz: the shell preamble starts python3 -S -I on the
    bytecode it carries; through a symlink named innernet-server too."""
    r = subprocess.run([pyz, "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("innernet.py "), r.stderr
    r = subprocess.run([pyz, "-c", str(tmp_path), "fetch"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1 and r.stderr.startswith("innernet: error: no networks"), r.stderr
    link = tmp_path / "innernet-server"
    link.symlink_to(pyz)
    r = subprocess.run([str(link), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("usage: innernet-server")


def test_a_python_with_other_bytecode_imports_the_module_from_the_archive(pyz, tmp_path):
    """The preamble's bytecode is for the Python that built it; another
    (its magic number differs) imports innernet_fast from the archive."""
    data = open(pyz, "rb").read()
    text_end = data.index(b'"$0" "$@"\n') + len(b'"$0" "$@"\n')
    other = tmp_path / "other.pyz"
    other.write_bytes(data[:text_end] + b"\0\0\0\0" + data[text_end + 4:])
    os.chmod(other, 0o755)
    r = subprocess.run([str(other), "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("innernet.py "), r.stderr


def test_build_is_reproducible(pyz, tmp_path):
    other = tmp_path / "again.pyz"
    subprocess.run([sys.executable, os.path.join(ROOT, "build_zipapp.py"), "-o", str(other)],
                   check=True, capture_output=True)
    with open(pyz, "rb") as a, open(other, "rb") as b:
        assert a.read() == b.read()


def test_vendored_pyroute2_imports_from_the_archive(pyz):
    code = ("import sys; sys.path.insert(0, %r); from pyroute2.iproute import IPRoute; "
            "import pyroute2; print(pyroute2.__file__)" % pyz)
    r = subprocess.run(BARE + ["-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and pyz in r.stdout, r.stderr


def test_pip_install_gives_both_commands(tmp_path):
    """`pip install .` (from PyPI: setuptools, PyNaCl, pyroute2) makes innernet and
    innernet-server commands that work."""
    venv, src = tmp_path / "venv", tmp_path / "src"
    # from a copy: pip writes its egg-info into the source, which any user may run
    # the tests from without write access to (tests/test_suite.py runs them as nobody)
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".*", "tests", "bench", "debian", "__pycache__", "*.pyz", "*.egg-info", "build"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(venv / "bin" / "innernet"), "--version"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.startswith("innernet.py ")
    r = subprocess.run([str(venv / "bin" / "innernet-server"), "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: innernet-server")
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import nacl.bindings, pyroute2.iproute, innernet; "
                        "print(innernet.key_backend())"], capture_output=True, text=True)
    assert r.stdout.strip() == "pynacl", r.stderr


def test_the_man_pages_list_each_global_option_once_and_every_verb(tmp_path):
    """debian/gen-docs.py: the option reference the README leaves to the man
    pages, with the global options once rather than under every verb."""
    subprocess.run([sys.executable, os.path.join(ROOT, "debian", "gen-docs.py"), str(tmp_path)],
                   check=True, capture_output=True)
    for prog, verbs in (("innernet", ("install", "fetch", "add-peer", "rotate-key")),
                        ("innernet-server", ("new", "serve", "restore", "apply"))):
        page = (tmp_path / f"{prog}.8").read_text()
        for option in (r"\-\-config\-dir", r"\-\-data\-dir", r"\-\-backend", r"\-\-mtu"):
            assert page.count(f"\\fB{option}\\fR") == 1, (prog, option)
        for verb in verbs:
            assert f"\n.SS {verb.replace('-', chr(92) + '-')}" in page, (prog, verb)
