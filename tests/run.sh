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
if [ "$#" != 0 ] || [ "$(id -u)" != 0 ]; then
  exec "$PY" -m pytest tests "$@"
fi
# The whole suite as root: two pytest runs side by side. The end-to-end tests
# mostly wait (handshakes, timers, the VM lane's guest): one after the other,
# the suite took 27.5 minutes in CI with 14 of its 55 core-minutes busy
# (2026-12-07), the unit tests 4.5 of them, on one core, at the end. Side by
# side (2026-12-08): 24 minutes, the unit tests' 5.5 inside the end-to-end
# run's 23.8. The unit run's output follows the end-to-end run's; the exit
# status is the first failing run's.
UNIT_LOG=$(mktemp /tmp/innernet-unit-tests.XXXXXX)
"$PY" -m pytest tests --ignore=tests/e2e > "$UNIT_LOG" 2>&1 &
UNIT=$!
trap 'kill "$UNIT" 2>/dev/null; rm -f "$UNIT_LOG"' EXIT
set +e
"$PY" -m pytest tests/e2e
E2E_RC=$?
wait "$UNIT"
UNIT_RC=$?
cat "$UNIT_LOG"
echo "tests/run.sh: end-to-end tests exit status $E2E_RC, unit tests exit status $UNIT_RC"
[ "$E2E_RC" = 0 ] && exit "$UNIT_RC"
exit "$E2E_RC"
