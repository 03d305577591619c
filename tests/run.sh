#!/usr/bin/env bash
# Install what the test suite needs and run all of it:  sudo tests/run.sh
# As root the end-to-end tests (network namespaces, wireguard-go) must run;
# without root only the unit tests run. Extra arguments go to pytest.
source "$(dirname "$0")/setup.sh"
if [ "$(id -u)" = 0 ]; then export INNERNET_E2E_REQUIRED=1; fi
# The compatibility lane (tests/e2e/test_compat.py) runs innernet 1.5.5's own
# binaries; where they are found, as root, it must run rather than skip.
REF=${INNERNET_REFERENCE_DIR:-../shared/reference/innernet-1.5.5}
if [ "$(id -u)" = 0 ] && [ -x "$REF/innernet" ] && [ -x "$REF/innernet-server" ]; then
  export INNERNET_COMPAT_REQUIRED=1 INNERNET_REFERENCE_DIR="$(cd "$REF" && pwd)"
fi
exec "$PY" -m pytest tests "$@"
