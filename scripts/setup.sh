#!/usr/bin/env bash
# Create .venv with the project and its test dependencies, and generate the protocol code.
# Works on a fresh Debian 12 (python3.11) and on machines with another CPython >= 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null
    else
        echo "python3-venv is missing: sudo apt-get install python3-venv" >&2
        exit 1
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# pip's own chatter goes to a log; it is shown only if the install fails.
if ! { .venv/bin/python -m pip install -q --upgrade pip &&
       .venv/bin/python -m pip install -q -e ".[test,tui]"; } > .venv/pip-install.log 2>&1; then
    cat .venv/pip-install.log >&2
    echo "setup: installing the project's dependencies failed (log above)" >&2
    exit 1
fi
.venv/bin/python runtime/_protocol_build.py
