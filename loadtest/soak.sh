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
data=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$data"
}
trap cleanup EXIT
wait_ready() { # URL
	for _ in $(seq 150); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
	echo "not ready: $1" >&2
	return 1
}
api=http://127.0.0.1:$base
head -c 18 /dev/urandom | base64 >"$data/admin-password"
head -c 18 /dev/urandom | base64 >"$data/edge-password"
RELAY_ADMIN_PASSWORD=$(cat "$data/admin-password") bin/relayd control --node-id soak --bootstrap \
	--data-dir "$data/control" --api-addr 127.0.0.1:$base --raft-addr 127.0.0.1:$((base + 1)) \
	--admin-addr 127.0.0.1:$((base + 2)) --log-level warn >"$out/control.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$((base + 2))/readyz"
export HOME=$data # relayctl caches its tokens there
# The first admin is created just after the node becomes ready: retry.
for i in $(seq 50); do
	bin/relayctl -server "$api" login --password-stdin admin <"$data/admin-password" >/dev/null 2>&1 && break
	[ "$i" -lt 50 ] || { echo "cannot log in as admin" >&2; exit 1; }
	sleep 0.2
done
bin/relayctl -server "$api" user create --login edges --role edge --password-stdin <"$data/edge-password" >/dev/null
RELAY_EDGE_PASSWORD=$(cat "$data/edge-password") bin/relayd edge --edge-id soak-edge --control "$api" --edge-login edges \
	--addr 127.0.0.1:$((base + 43)) --admin-addr 127.0.0.1:$((base + 44)) \
	--handshakes-per-second 100000 --events-per-second 100000 --log-level warn >"$out/edge.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$((base + 44))/readyz"
RELAYCTL_TOKEN=$(bin/relayctl -server "$api" token) bin/relayload \
	--control "$api" --edge 127.0.0.1:$((base + 43)) --edge-admin http://127.0.0.1:$((base + 44)) \
	--json --progress "${PROGRESS:-60s}" soak --csv "$out/soak.csv" --png "$out/soak.png" "$@" >"$out/result.json"
echo "soak done: $out/soak.png, $out/soak.csv, $out/result.json"
