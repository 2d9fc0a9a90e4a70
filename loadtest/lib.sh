# Shell helpers of the load scripts (soak.sh, compare.sh): source it.
#
# start_relay BASE OUT [EDGE_PREFIX...] starts a fresh control node and an
# edge, each its own process (so the edge's /metrics are the edge's
# alone), with ports from BASE, logs in OUT, state in a temporary
# directory; EDGE_PREFIX (e.g. taskset -c 0) runs the edge under it (which
# must exec it). It sets API, EDGE, EDGE_ADMIN, EDGE_PID and
# RELAYCTL_TOKEN, and stop_relay (run on exit) stops both and removes the
# state.
#
# cap_cpu PID PCT moves PID (every thread) into a cgroup of its own that
# may use PCT% of one CPU (cgroup v2 cpu.max, else v1 cpu.cfs_quota_us; a
# 10 ms period; PCT at least 10), so that a load driver on the other core
# can saturate it; without root or a cpu controller it fails (having at
# most enabled the cpu controller of cgroup v2's root). cap_stats prints
# the cgroup's throttling counters (periods, throttled periods) and
# uncap_cpu PID moves PID back to the cgroup it came from and removes the
# one it made, failing if PID would stay capped.
#
# start_edge2 BASE OUT [EDGE_PREFIX...], after start_relay, starts a
# second edge (ports from BASE + 45) on the same control node, for runs
# across the mesh; it sets EDGE2 and EDGE2_ADMIN.

relay_pids=()
relay_data=""

stop_relay() {
	for p in "${relay_pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${relay_pids[@]}"; do wait "$p" 2>/dev/null || true; done
	[ -z "$relay_cgroup" ] || rmdir "$relay_cgroup" 2>/dev/null || true
	[ -z "$relay_data" ] || rm -rf "$relay_data"
}

relay_cgroup=""
relay_cgroup_from=""

cap_cpu() { # PID PCT
	local pid=$1 pct=$2 root from
	[ "$pct" -ge 10 ] || { echo "cap_cpu: at least 10% (the kernel's smallest quota is 1 ms a period)" >&2; return 1; }
	if grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
		root=/sys/fs/cgroup
		from=$(awk -F: '$1 == "0" { print $3 }' "/proc/$pid/cgroup")
		grep -qw cpu "$root/cgroup.subtree_control" || echo +cpu >"$root/cgroup.subtree_control" || return 1
		mkdir "$root/relay-cap-$$" || return 1
		echo "$((pct * 100)) 10000" >"$root/relay-cap-$$/cpu.max" || { rmdir "$root/relay-cap-$$"; return 1; }
	elif [ -w /sys/fs/cgroup/cpu/cgroup.procs ]; then
		root=/sys/fs/cgroup/cpu
		from=$(awk -F: '$2 ~ /(^|,)cpu(,|$)/ { print $3 }' "/proc/$pid/cgroup")
		mkdir "$root/relay-cap-$$" || return 1
		echo 10000 >"$root/relay-cap-$$/cpu.cfs_period_us" && echo $((pct * 100)) >"$root/relay-cap-$$/cpu.cfs_quota_us" ||
			{ rmdir "$root/relay-cap-$$"; return 1; }
	else
		return 1
	fi
	relay_cgroup=$root/relay-cap-$$
	relay_cgroup_from=$root${from%/}
	echo "$pid" >"$relay_cgroup/cgroup.procs" || { uncap_cpu "$pid"; return 1; }
}

cap_stats() {
	awk '$1 == "nr_periods" || $1 == "nr_throttled" { printf "%s %s ", $1, $2 } END { print "" }' "$relay_cgroup/cpu.stat"
}

uncap_cpu() { # PID
	[ -n "$relay_cgroup" ] || return 0
	if kill -0 "$1" 2>/dev/null && ! echo "$1" >"$relay_cgroup_from/cgroup.procs"; then
		echo "uncap_cpu: cannot move $1 back to $relay_cgroup_from: it stays capped" >&2
		return 1
	fi
	rmdir "$relay_cgroup" || return 1
	relay_cgroup=""
}

wait_ready() { # URL
	for _ in $(seq 150); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
	echo "not ready: $1" >&2
	return 1
}

start_relay() { # BASE OUT [EDGE_PREFIX...]
	local base=$1 out=$2
	shift 2
	relay_data=$(mktemp -d)
	API=http://127.0.0.1:$base
	EDGE=127.0.0.1:$((base + 43))
	EDGE_ADMIN=http://127.0.0.1:$((base + 44))
	head -c 18 /dev/urandom | base64 >"$relay_data/admin-password"
	head -c 18 /dev/urandom | base64 >"$relay_data/edge-password"
	RELAY_ADMIN_PASSWORD=$(cat "$relay_data/admin-password") bin/relayd control --node-id load --bootstrap \
		--data-dir "$relay_data/control" --api-addr 127.0.0.1:$base --raft-addr 127.0.0.1:$((base + 1)) \
		--admin-addr 127.0.0.1:$((base + 2)) --log-level warn >"$out/control.log" 2>&1 &
	relay_pids+=($!)
	wait_ready "http://127.0.0.1:$((base + 2))/readyz"
	export HOME=$relay_data # relayctl caches its tokens there
	# The first admin is created just after the node becomes ready: retry.
	for i in $(seq 50); do
		bin/relayctl --server "$API" login --password-stdin admin <"$relay_data/admin-password" >/dev/null 2>&1 && break
		[ "$i" -lt 50 ] || { echo "cannot log in as admin" >&2; return 1; }
		sleep 0.2
	done
	bin/relayctl --server "$API" user create --login edges --role edge --password-stdin <"$relay_data/edge-password" >/dev/null
	RELAY_EDGE_PASSWORD=$(cat "$relay_data/edge-password") "$@" bin/relayd edge --edge-id load-edge --control "$API" --edge-login edges \
		--addr "$EDGE" --admin-addr "${EDGE_ADMIN#http://}" \
		--handshakes-per-second 100000 --events-per-second 1000000 --bytes-per-second 1000000000 \
		--frames-per-second 10000000 --queue-len 4096 --cluster-tls-tickets --log-level warn >"$out/edge.log" 2>&1 &
	EDGE_PID=$!
	relay_pids+=($!)
	wait_ready "$EDGE_ADMIN/readyz"
	RELAYCTL_TOKEN=$(bin/relayctl --server "$API" token)
	export RELAYCTL_TOKEN
}

start_edge2() { # BASE OUT [EDGE_PREFIX...]
	local base=$1 out=$2
	shift 2
	EDGE2=127.0.0.1:$((base + 45))
	EDGE2_ADMIN=http://127.0.0.1:$((base + 46))
	RELAY_EDGE_PASSWORD=$(cat "$relay_data/edge-password") "$@" bin/relayd edge --edge-id load-edge-2 --control "$API" --edge-login edges \
		--addr "$EDGE2" --admin-addr "${EDGE2_ADMIN#http://}" \
		--handshakes-per-second 100000 --events-per-second 1000000 --bytes-per-second 1000000000 \
		--frames-per-second 10000000 --queue-len 4096 --cluster-tls-tickets --log-level warn >"$out/edge2.log" 2>&1 &
	relay_pids+=($!)
	wait_ready "$EDGE2_ADMIN/readyz"
}
