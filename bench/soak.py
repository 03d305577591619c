"""The long chaos soak (issue 29): `sudo .venv/bin/python bench/soak.py --minutes 60
[--seed N] [--json FILE]`. Builds innernet.pyz, runs tests/e2e/soak.py's fleet for
that long, prints the counts (operations, faults, convergence p50/p99, stuck peers),
every violation with its evidence, and on any violation outside soak.KNOWN the
whole history; exits 1 then."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from e2e import soak  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--json", help="write the summary and violations here")
    ap.add_argument("--history", help="write the operation history here")
    ap.add_argument("--keep", help="copy every host's logs to this directory")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="soak-build-")
    pyz = os.path.join(tmp, "innernet.pyz")
    subprocess.run([sys.executable, os.path.join(ROOT, "build_zipapp.py"), "-o", pyz],
                   check=True, capture_output=True)
    s = soak.run_soak(pyz, seed=args.seed, minutes=args.minutes,
                      say=lambda m: print(m, flush=True), keep=args.keep)
    print(s.report(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": s.summary(), "violations": s.violations}, f, indent=1,
                      default=str)
    if args.history:
        with open(args.history, "w") as f:
            f.write(s.history_text() + "\n")
    if s.unknown():
        print("history:\n" + s.history_text())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
