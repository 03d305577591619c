#!/usr/bin/env python3
"""Run every benchmark and print their tables (Markdown, as bench/README.md quotes).

    sudo .venv/bin/python bench/run_all.py [--quick]

The namespace benchmarks need root and wireguard-go; all of them build on
innernet.pyz, which this script builds first.
"""
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCHES = ["join.py", "propagation.py", "unchanged_fetch.py", "throughput.py", "server_rss.py",
           "fetch_cost.py", "apply_one.py", "traversal.py", "relay.py", "footprint.py", "cron_path.py",
           "lock_cost.py", "replication_lag.py", "daemon_pace.py"]


def main():
    extra = [a for a in sys.argv[1:] if a == "--quick"]
    pyz = os.path.join(ROOT, "innernet.pyz")
    subprocess.run([sys.executable, os.path.join(ROOT, "build_zipapp.py"), "-o", pyz], check=True)
    env = dict(os.environ, INNERNET_PYZ=pyz)
    print(f"# innernet.py benchmarks, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs")
    failed = 0
    for bench in BENCHES:
        cmd = [sys.executable, os.path.join(HERE, bench)] + extra
        print(f"\n`{' '.join(['python3', 'bench/' + bench] + extra)}`", flush=True)
        if subprocess.run(cmd, env=env).returncode:
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
