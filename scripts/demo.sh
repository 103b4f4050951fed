#!/usr/bin/env bash
# The README's main job: set up, make this machine the head node of a cluster, run the
# example driver on it, and show the node in raytop (the cluster's terminal UI).
#
# A head node this script starts is stopped again when raytop exits (DEMO_KEEP=1 keeps
# it running); a node that was already running is used and left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN=.venv/bin

role=$("$BIN/agentctl" status --json 2>/dev/null |
       "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin).get("role", ""))' 2>/dev/null ||
       true)
started=""
if [ "$role" = "head" ] || [ "$role" = "worker" ]; then
    echo "== using the node that already runs here ($role)"
else
    echo "== starting a head node on this machine (agentctl start --head)"
    "$BIN/agentctl" start --head --node-ip 127.0.0.1
    started=1
fi
stop_started() {
    if [ -n "$started" ] && [ -z "${DEMO_KEEP:-}" ]; then
        echo "== stopping the head node this demo started (DEMO_KEEP=1 keeps it)"
        "$BIN/agentctl" stop >/dev/null || true
    fi
}
trap stop_started EXIT

echo "== the example driver, attached to it (init(address=\"auto\"))"
RUNTIME_ADDRESS=auto "$BIN/python" examples/hello_cluster.py

if [ -t 0 ] && [ -t 1 ]; then
    echo "== raytop: the nodes view; press ? for the keys, q to quit"
    "$BIN/raytop"
else
    "$BIN/raytop" --once
fi
cat <<'NEXT'

Next: add machines with `agentctl join HEAD_IP:6379 --token-file FILE` (the token:
`agentctl token` on the head), then watch them in `raytop` (docs/raytop.md). Installing on
Debian 12 with the .deb and systemd: docs/install.md.
NEXT
