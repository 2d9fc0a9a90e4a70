#!/usr/bin/env bash
# relay-certs.sh DIR NAME... -- a private CA and one certificate for the
# control plane's nodes, with openssl.
#
# Writes DIR/ca.crt, DIR/ca.key (keep it offline: it mints node
# identities), DIR/tls.crt and DIR/tls.key: an ECDSA P-256 certificate for
# every NAME (DNS names, "*.wildcards" and IP addresses), valid for server
# and client authentication, signed by the CA. Every control node may use
# the same certificate: it authorizes a node's join and its calls to its
# peers, so give it to control nodes only (edges get ca.crt alone). The same
# layout as cert-manager's Secrets, so on Kubernetes:
#   kubectl create secret generic relay-control-tls --from-file=DIR/tls.crt \
#     --from-file=DIR/tls.key --from-file=DIR/ca.crt
# An existing DIR/ca.key is reused, so running it again with more names
# issues a new node certificate from the same CA.
#
# Environment: DAYS (node certificate lifetime, default 365),
# CA_DAYS (default 3650).
set -euo pipefail

if [ $# -lt 2 ]; then
	echo "usage: $0 DIR NAME..." >&2
	exit 2
fi
dir=$1
shift
days=${DAYS:-365}
ca_days=${CA_DAYS:-3650}
mkdir -p "$dir"
umask 077

if [ ! -f "$dir/ca.key" ]; then
	openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key"
	openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$ca_days" \
		-subj "/CN=relay control-plane CA" \
		-addext "basicConstraints=critical,CA:TRUE" \
		-addext "keyUsage=critical,keyCertSign,cRLSign" \
		-out "$dir/ca.crt"
fi

san=""
for n in "$@"; do
	if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then
		san="$san,IP:$n"
	else
		san="$san,DNS:$n"
	fi
done
san=${san#,}

openssl ecparam -name prime256v1 -genkey -noout -out "$dir/tls.key"
openssl req -new -key "$dir/tls.key" -subj "/CN=relay-control" -out "$dir/tls.csr"
ext=$(mktemp)
trap 'rm -f "$ext" "$dir/tls.csr"' EXIT
cat >"$ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
EXT
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
	-days "$days" -sha256 -extfile "$ext" -out "$dir/tls.crt" 2>/dev/null
chmod 0644 "$dir/ca.crt" "$dir/tls.crt"
echo "wrote $dir/tls.crt for $san (CA $dir/ca.crt)"
