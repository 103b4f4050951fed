#!/usr/bin/env bash
# The README's main job: set up, then run the example driver on a private local cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/hello_cluster.py
