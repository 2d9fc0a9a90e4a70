#!/usr/bin/env bash
# up.sh -- start the compose cluster (compose.yaml) from nothing, or again.
#
# 1. passwords for the first admin and the edges' account, in .env (0600;
#    compose reads it), made once;
# 2. the control plane's CA and certificate in certs/ (deploy/scripts/
#    relay-certs.sh), made once;
# 3. the control nodes and the monitoring, then, once the cluster has a
#    leader, the edges' account (relayctl in control-1), then the edges.
#
# Needs docker compose (or COMPOSE="podman compose"), openssl and curl, and
# the image: `make image` builds localhost/relay:dev (RELAY_IMAGE picks
# another).
set -euo pipefail
cd "$(dirname "$0")"
read -r -a compose <<<"${COMPOSE:-docker compose}"

if [ ! -f .env ]; then
	(umask 077 && printf 'RELAY_ADMIN_PASSWORD=%s\nRELAY_EDGE_PASSWORD=%s\n' \
		"$(openssl rand -hex 16)" "$(openssl rand -hex 16)" >.env)
	echo "wrote .env: the admin's and the edges' passwords"
fi
set -a
# shellcheck source=/dev/null
. ./.env
set +a

if [ ! -f certs/tls.crt ]; then
	# The names the nodes advertise (their peers dial those and check the
	# certificate for them), and their fixed addresses.
	../scripts/relay-certs.sh certs control-1 control-2 control-3 \
		172.28.10.11 172.28.10.12 172.28.10.13 localhost 127.0.0.1
	# The containers run as uid 65532 and the key is bind-mounted as it is:
	# on a laptop, let them read it (it never leaves this directory).
	chmod 0644 certs/tls.key
fi

wait_ready() { # URL
	for _ in $(seq 120); do
		if curl -fsS -o /dev/null "$1"; then return 0; fi
		sleep 1
	done
	echo "$1 did not become ready in 2 minutes; see: ${compose[*]} logs" >&2
	return 1
}

"${compose[@]}" up -d control-1 control-2 control-3 prometheus alertmanager grafana jaeger
wait_ready http://127.0.0.1:7402/readyz

relayctl() { "${compose[@]}" exec -T control-1 relayctl "$@"; }
relayctl login --password-stdin admin <<<"$RELAY_ADMIN_PASSWORD" >/dev/null
if ! relayctl -o json user list | grep -q '"login": *"edges"'; then
	relayctl user create --login edges --role edge --password-stdin <<<"$RELAY_EDGE_PASSWORD"
fi

"${compose[@]}" up -d edge-1 edge-2
wait_ready http://127.0.0.1:7444/readyz
wait_ready http://127.0.0.1:8444/readyz
relayctl cluster status
cat <<MSG
relay is up:
  control API     https://127.0.0.1:7400 (CA: $PWD/certs/ca.crt; admin password in .env)
  edges           127.0.0.1:7443 and 127.0.0.1:8443 (UDP and TCP); consoles at
                  http://127.0.0.1:7444/ and http://127.0.0.1:8444/
  Prometheus      http://127.0.0.1:9090/   Alertmanager http://127.0.0.1:9093/
  Grafana         http://127.0.0.1:3000/   Jaeger       http://127.0.0.1:16686/
MSG
