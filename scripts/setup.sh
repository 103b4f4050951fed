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
# Ray's own job client, for tests/test_jobs_ray_client.py: in a venv of its own, so Ray
# never mixes with our packages. The client side of `ray[default]` is enough: ray,
# aiohttp (log tailing) and pydantic (JobDetails). Installed once (a marker file holds
# the requirements); a failure is reported and those tests then skip, saying why.
RAY_CLIENT_REQS="ray==2.60.* aiohttp>=3.14.4 pydantic>=2.5,<3 numpy psutil"
if [ -z "${SKIP_RAY_CLIENT:-}" ] && [ "$(cat .venv-ray/.installed 2>/dev/null)" != "$RAY_CLIENT_REQS" ]; then
    if { [ -x .venv-ray/bin/python ] || "$PY" -m venv .venv-ray; } &&
       .venv-ray/bin/python -m pip install -q $RAY_CLIENT_REQS > .venv-ray/pip-install.log 2>&1; then
        echo "$RAY_CLIENT_REQS" > .venv-ray/.installed
    else
        echo "setup: could not install Ray's job client into .venv-ray (see .venv-ray/pip-install.log); tests/test_jobs_ray_client.py will be skipped" >&2
    fi
fi
