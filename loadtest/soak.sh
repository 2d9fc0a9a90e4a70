#!/usr/bin/env bash
# Runs a soak on this machine: a fresh control node and edge, each its
# own process (so the edge's /metrics are the edge's alone), in a
# temporary directory, and `relayload soak` against the edge, which
# samples the edge's heap, RSS, goroutines and sessions and plots them.
#
#   loadtest/soak.sh OUT_DIR [relayload soak flags...]
#   loadtest/soak.sh /tmp/soak --duration 1h --pairs 20 --rate 500 --churn 2
#
# OUT_DIR gets soak.csv, soak.png, result.json and both processes' logs.
# PORT_BASE (default 17400) moves the ports, to run beside another relay.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: loadtest/soak.sh OUT_DIR [relayload soak flags...]}
shift
base=${PORT_BASE:-17400}
mkdir -p "$out"
go build -o bin/ ./cmd/relayd ./cmd/relayctl ./loadtest/relayload
. loadtest/lib.sh
trap stop_relay EXIT
start_relay "$base" "$out"
bin/relayload --control "$API" --edge "$EDGE" --edge-admin "$EDGE_ADMIN" \
	--json --progress "${PROGRESS:-60s}" soak --csv "$out/soak.csv" --png "$out/soak.png" "$@" >"$out/result.json"
echo "soak done: $out/soak.png, $out/soak.csv, $out/result.json"
