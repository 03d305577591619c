#!/usr/bin/env bash
# Install what is needed and show a network working:  sudo tests/demo.sh
# A server and three peers in network namespaces on this machine, over
# wireguard-go, driven by the built innernet.pyz. Cleans up after itself.
source "$(dirname "$0")/setup.sh"
exec "$PY" tests/demo.py "$@"
