#!/usr/bin/env bash
# Install everything the test suite needs, check types and lint, then run all the tests. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
# Static checks first, configured in pyproject.toml: strict typing of dicomfs/, lint of everything.
.venv/bin/ruff check .
.venv/bin/mypy
status=0
.venv/bin/python -m pytest -ra "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here, the suite must never be empty" >&2
    exit 1
fi
exit "$status"
