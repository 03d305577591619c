#!/usr/bin/env bash
# Install what the test suite needs and run all of it:  sudo tests/run.sh
# As root the end-to-end tests (network namespaces, wireguard-go) must run;
# without root only the unit tests run. Extra arguments go to pytest.
source "$(dirname "$0")/setup.sh"
if [ "$(id -u)" = 0 ]; then export INNERNET_E2E_REQUIRED=1; fi
exec "$PY" -m pytest tests "$@"
