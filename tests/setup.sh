# Sourced by tests/run.sh and tests/demo.sh: install what they need (Debian,
# as root) and make a virtual environment with the Python packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-pip wireguard-go wireguard-tools iproute2 nftables \
    python3-nacl python3-pyroute2 time util-linux libzbar0 \
    bind9-dnsutils debootstrap qemu-system-x86 dpkg-dev debhelper dh-python bash-completion lintian fakeroot \
    build-essential man-db >/dev/null
fi
# INNERNET_PYTHON runs the suite on another interpreter (in its own INNERNET_VENV).
VENV=${INNERNET_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${INNERNET_PYTHON:-/usr/bin/python3}" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r tests/requirements.txt 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
PY="$VENV/bin/python"
