#!/usr/bin/env bash
# Make the certificates that compose-tls.yml mounts (self-signed CA; for trying it out
# and for small private deployments; use your organisation's CA where there is one).
#
#   docker/generate_certificates.sh [OUT_DIR] [NUM_SUPERNODES]
#
# OUT_DIR defaults to docker/certificates, NUM_SUPERNODES to 3. It writes:
#   ca.crt, ca.key                  the CA (ca.key signs; keep it out of every container)
#   superlink.crt, superlink.key    the SuperLink (Fleet, Control and Runtime API), valid
#                                   for "superlink" (the compose service), "localhost",
#                                   127.0.0.1 and the names in SUPERLINK_SAN
#   supernode-N.crt, supernode-N.key  SuperNode N's Runtime API, valid for "supernode-N"
#   superlink.secret, supernode-N.secret  random shared secrets with which each SuperExec
#                                   authenticates to the Runtime API it serves
#                                   (--superexec-auth-secret-file)
# SUPERLINK_SAN adds names that clients on other machines use to reach the SuperLink, in
# openssl's syntax: SUPERLINK_SAN="DNS:fl.example.org,IP:203.0.113.7" ./generate_...
# Keys are ECDSA P-256. Needs openssl 1.1.1+. What an earlier run left in OUT_DIR is
# replaced (a new CA invalidates all of it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/certificates}"
supernodes="${2:-3}"
days="${DAYS:-365}"

mkdir -p "$out"
cd "$out"
umask 077
# A new CA invalidates every certificate of an earlier run: remove them all.
rm -f ca.crt ca.key ca.srl superlink.crt superlink.key superlink.secret \
    supernode-*.crt supernode-*.key supernode-*.secret

# Run a command quietly; show its output only when it fails.
quiet() {
    local output
    if ! output="$("$@" 2>&1)"; then
        printf '%s\n' "$output" >&2
        return 1
    fi
}

# The CA: a self-signed certificate that may only sign certificates.
quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -days "$days" -subj "/CN=flwr-otfusion CA" -keyout ca.key -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash"

# leaf NAME SAN: a server certificate for NAME signed by the CA. The extensions are
# the ones strict verifiers (Python 3.13's default context) require.
leaf() {
    local name="$1" san="$2"
    quiet openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
        -subj "/CN=$name" -keyout "$name.key" -out "$name.csr"
    printf '%s\n' \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" \
        "subjectKeyIdentifier=hash" \
        "authorityKeyIdentifier=keyid,issuer" \
        "subjectAltName=$san" > "$name.ext"
    quiet openssl x509 -req -sha256 -days "$days" -in "$name.csr" -CA ca.crt -CAkey ca.key \
        -CAcreateserial -extfile "$name.ext" -out "$name.crt"
    rm -f "$name.csr" "$name.ext"
}

# Every server with a Runtime API: a certificate and a SuperExec secret each.
names=(superlink)
for i in $(seq 1 "$supernodes"); do
    names+=("supernode-$i")
done
san="DNS:superlink,DNS:localhost,IP:127.0.0.1"
if [ -n "${SUPERLINK_SAN:-}" ]; then
    san="$san,$SUPERLINK_SAN"
fi
for name in "${names[@]}"; do
    if [ "$name" != superlink ]; then
        san="DNS:$name,DNS:localhost,IP:127.0.0.1"
    fi
    leaf "$name" "$san"
    openssl rand -hex 32 > "$name.secret"
done
rm -f ca.srl

# Certificates are public; keys and secrets stay private (the containers must read the
# ones mounted into them: see README.md, "With TLS").
chmod 644 ca.crt
for name in "${names[@]}"; do
    chmod 644 "$name.crt"
    chmod 600 "$name.key" "$name.secret"
    quiet openssl verify -CAfile ca.crt "$name.crt"
done
echo "certificates, keys and secrets in $out:"
echo "  ca.crt ca.key"
for name in "${names[@]}"; do
    echo "  $name.crt $name.key $name.secret"
done
