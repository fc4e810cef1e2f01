#!/usr/bin/env bash
# Makes the gateway's PKI and token keys with openssl: a CA, a server certificate, one client certificate
# per name, a CRL, the JWT signing key pair with its JWKS, and the audit HMAC key.
#
#   scripts/gen_certs.sh [--force] [OUTDIR (default certs)] [CLIENT... (default alice bob)]
#   scripts/gen_certs.sh --client NAME [OUTDIR]    one more client certificate from the existing CA
#   scripts/gen_certs.sh --server [OUTDIR]         a new server certificate (rotation) from the existing CA
#   scripts/gen_certs.sh --revoke NAME [OUTDIR]    revoke NAME.crt and rewrite crl.pem
#
# Writes: ca.crt ca.key server.crt server.key NAME.crt NAME.key crl.pem jwt-signing.key jwt-signing.pub
# jwks.json audit-hmac.key (private keys mode 0600). Certificates and TLS keys are ECDSA P-256 (small, fast
# handshakes); the JWT key is RSA 3072 for RS256, which every JWT library verifies. Client certificates carry
# the SPIFFE URI SAN spiffe://gateway.local/client/NAME and EKU clientAuth; the server certificate the SANs
# localhost, 127.0.0.1 and ::1 and EKU serverAuth. JWKS members are computed by $PYTHON (default python3)
# with the `cryptography` package; the Makefile passes the project's virtualenv interpreter.
set -euo pipefail

PYTHON=${PYTHON:-python3}
DAYS=825
SPIFFE_PREFIX="spiffe://gateway.local/client"

die() { echo "gen_certs.sh: $*" >&2; exit 1; }

mode=all force=0 name=""
case "${1:-}" in
    --client|--revoke) mode=${1#--}; name=${2:?"$1 needs a NAME"}; shift 2 ;;
    --server) mode=server; shift ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
esac
out=${1:-certs}
[ $# -gt 0 ] && shift
clients=("$@")
[ ${#clients[@]} -eq 0 ] && clients=(alice bob)
for client in "${clients[@]}" "$name"; do
    [[ -z "$client" || "$client" =~ ^[a-z0-9][a-z0-9_-]{0,62}$ ]] || die "bad client name '$client' (use [a-z0-9_-])"
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
umask 077  # every file starts private; certificates are opened up below

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }
serial() { echo "0x1$(openssl rand -hex 15)"; }  # 124 random bits, positive (RFC 5280 4.1.2.2)

sign() {  # sign CSR_KEY NAME SUBJECT EXTENSIONS: issue $out/NAME.crt for $out/NAME.key
    local key=$1 crt=$2 subject=$3 extensions=$4
    openssl req -new -key "$key" -subj "$subject" -out "$out/.ca/req.csr" 2>/dev/null
    printf '%s\n' "$extensions" >"$out/.ca/ext.cnf"
    openssl x509 -req -in "$out/.ca/req.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -set_serial "$(serial)" \
        -days "$DAYS" -sha256 -extfile "$out/.ca/ext.cnf" -out "$crt" 2>/dev/null
    chmod 644 "$crt"
    rm -f "$out/.ca/req.csr" "$out/.ca/ext.cnf"
}

make_client() {
    local client=$1
    new_key "$out/$client.key"
    sign "$out/$client.key" "$out/$client.crt" "/CN=$client" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectAltName=URI:$SPIFFE_PREFIX/$client
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid"
}

make_server() {
    new_key "$out/server.key.new"
    sign "$out/server.key.new" "$out/server.crt.new" "/CN=localhost" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid"
    # Key first, then certificate, each by rename: a watcher never sees a half-written file.
    mv "$out/server.key.new" "$out/server.key"
    mv "$out/server.crt.new" "$out/server.crt"
}

ca_config() {
    cat >"$out/.ca/openssl.cnf" <<CNF
[ ca ]
default_ca = gateway_ca
[ gateway_ca ]
database = $out/.ca/index.txt
crlnumber = $out/.ca/crlnumber
certificate = $out/ca.crt
private_key = $out/ca.key
default_md = sha256
default_crl_days = 30
CNF
}

write_crl() {
    openssl ca -config "$out/.ca/openssl.cnf" -gencrl -out "$out/crl.pem.new" 2>/dev/null
    chmod 644 "$out/crl.pem.new"
    mv "$out/crl.pem.new" "$out/crl.pem"
}

need_ca() { [ -f "$out/ca.key" ] && [ -f "$out/.ca/openssl.cnf" ] || die "no CA in $out: run without --$mode first"; }

case $mode in
    client) need_ca; make_client "$name"; echo "gen_certs.sh: client $name in $out"; exit 0 ;;
    server) need_ca; make_server; echo "gen_certs.sh: new server certificate in $out"; exit 0 ;;
    revoke)
        need_ca
        [ -f "$out/$name.crt" ] || die "no certificate $out/$name.crt"
        openssl ca -config "$out/.ca/openssl.cnf" -revoke "$out/$name.crt" -crl_reason keyCompromise 2>/dev/null
        write_crl
        echo "gen_certs.sh: revoked $name; crl.pem rewritten"
        exit 0 ;;
esac

if [ -f "$out/ca.key" ] && [ $force -eq 0 ]; then
    die "$out/ca.key exists; refusing to overwrite a CA (use --force)"
fi
rm -rf "$out/.ca"
mkdir -p "$out/.ca"
: >"$out/.ca/index.txt"
echo 1000 >"$out/.ca/crlnumber"

new_key "$out/ca.key"
openssl req -x509 -new -key "$out/ca.key" -subj "/CN=gateway demo CA" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" -out "$out/ca.crt" 2>/dev/null
chmod 644 "$out/ca.crt"
ca_config
make_server
for client in "${clients[@]}"; do make_client "$client"; done
write_crl

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out "$out/jwt-signing.key" 2>/dev/null
chmod 600 "$out/jwt-signing.key"
openssl pkey -in "$out/jwt-signing.key" -pubout -out "$out/jwt-signing.pub" 2>/dev/null
chmod 644 "$out/jwt-signing.pub"
# jwks.json: the public key as a JWK (RFC 7517) with kid = its RFC 7638 thumbprint.
"$PYTHON" - "$out/jwt-signing.pub" "$out/jwks.json" <<'PY'
import base64, hashlib, json, sys
from cryptography.hazmat.primitives import serialization

def b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()

numbers = serialization.load_pem_public_key(open(sys.argv[1], "rb").read()).public_numbers()
members = {"e": b64(numbers.e), "kty": "RSA", "n": b64(numbers.n)}
canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
kid = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
with open(sys.argv[2], "w") as f:
    json.dump({"keys": [{**members, "kid": kid, "use": "sig", "alg": "RS256"}]}, f, indent=2)
PY
chmod 644 "$out/jwks.json"
openssl rand -hex 32 >"$out/audit-hmac.key"
chmod 600 "$out/audit-hmac.key"
echo "gen_certs.sh: CA, server, clients (${clients[*]}), crl.pem, JWT keys, jwks.json, audit-hmac.key in $out"
