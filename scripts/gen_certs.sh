#!/usr/bin/env bash
# Makes the gateway's PKI and token keys with the openssl CLI alone (OpenSSL 1.1.1 or 3.x; OPENSSL=path picks
# the binary): a CA, a server certificate, one client certificate per name, a CRL, the JWT signing pair with its
# JWKS, the audit-chain HMAC key, and the model-signing pair (docs/model-signing.md). Python is not needed.
#
#   scripts/gen_certs.sh [--force] [OUTDIR (default certs)] [CLIENT... (default alice bob)]
#   scripts/gen_certs.sh [--force] --client NAME [OUTDIR]   one more client certificate from the existing CA
#   scripts/gen_certs.sh --server [OUTDIR]                  a fresh server key and certificate (rotation)
#   scripts/gen_certs.sh --revoke NAME [OUTDIR]             revoke client NAME and re-sign the server's crl.pem
#
# OUTDIR holds one folder per party, each with only what that party needs (least privilege):
#   server/        what `gateway serve --certs OUTDIR/server` reads, and nothing else: server.crt server.key,
#                  ca.crt (the client CA), crl.pem, jwks.json (public keys only), audit-hmac.key,
#                  model-signing.pub (models.signature_trust.public_key). Mount this one.
#   clients/NAME/  what client NAME needs: NAME.crt NAME.key, and ca.crt to check the server.
#   signing/       stays with whoever issues certificates and tokens, never on the server: ca.key ca.crt,
#                  jwt-signing.key jwt-signing.pub jwks.json, model-signing.key model-signing.pub (`gateway model
#                  sign` signs model versions with it), and .ca/ (the CA database behind crl.pem).
# Private keys are mode 0600, every folder 0700, certificates and public files 0644.
#   - CA, server and client keys: ECDSA P-256. 128-bit security, small certificates and fast TLS handshakes; every
#     TLS stack grpc uses supports it. The CA is pathlen:0 (no intermediates) and valid 10 years; leaves 825 days.
#   - Client certificates: CN=NAME, SAN URI spiffe://gateway.local/client/NAME, EKU clientAuth only.
#     Server: CN=localhost, SANs localhost, 127.0.0.1, ::1, EKU serverAuth only. keyUsage digitalSignature only:
#     ECDSA keys never encipher (keyEncipherment is for RSA key transport, absent from TLS 1.3).
#   - JWT key: RSA 3072, e=65537, RS256: the one JWS algorithm every JWT library verifies, a deterministic signature
#     (no per-signature nonce to get wrong), cheap verification; 3072 bits per NIST SP 800-57 beyond 2030.
#     jwks.json holds its public key with kid = RFC 7638 thumbprint, computed here with openssl; the copy in
#     signing/ lets `gateway token issue` find the kid beside the key.
#   - Model-signing key: ECDSA P-256 (PKCS#8 PEM), what OpenSSF model signing's key signer takes; its own pair, so
#     that neither the CA key nor the token key is ever needed where models are published.
#   - Serial numbers: 124 random bits (RFC 5280 4.1.2.2 allows 20 octets; CA/B Forum asks for 64+ random bits).
#   - crl.pem: signed by the CA, nextUpdate 30 days; --revoke re-signs it and the gateway reloads it on change.
# Files are written in a staging folder and renamed into place (key before certificate), so a reloading gateway
# never reads half a file, and a failed run leaves the previous set untouched.
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true # bash 4.4+: set -e holds inside $(...) too

OPENSSL=${OPENSSL:-openssl}
CA_DAYS=3650
CERT_DAYS=825
CRL_DAYS=30
SPIFFE_PREFIX="spiffe://gateway.local/client"
NAME_RE='^[a-z0-9][a-z0-9_-]{0,62}$'
# A client's folder holds ca.crt beside NAME.crt; the other names would read as the set's own files.
RESERVED_NAMES=" ca server jwt-signing audit-hmac crl jwks model-signing "

die() {
    echo "gen_certs.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '6,9p' "$0" | sed 's/^# *//'
}

# --- arguments ---------------------------------------------------------------------------------------------------
mode=all force=0 name=""
while [ $# -gt 0 ]; do
    case $1 in
        --force) force=1; shift ;;
        --client | --revoke)
            [ "$mode" = all ] || die "$1: only one of --client, --server, --revoke at a time"
            [ $# -ge 2 ] || die "$1 needs a NAME"
            mode=${1#--} name=$2
            shift 2 ;;
        --server)
            [ "$mode" = all ] || die "$1: only one of --client, --server, --revoke at a time"
            mode=server
            shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
out=${1:-certs}
[ $# -gt 0 ] && shift
if [ "$mode" = all ]; then
    clients=("$@")
    [ ${#clients[@]} -gt 0 ] || clients=(alice bob)
else
    [ $# -eq 0 ] || die "--$mode takes one OUTDIR, got extra arguments: $*"
    clients=()
fi
[ "$mode" != server ] || [ $force -eq 0 ] || die "--force has no meaning with --server (it always replaces)"
[ "$mode" != revoke ] || [ $force -eq 0 ] || die "--force has no meaning with --revoke"

check_name() {
    [[ $1 =~ $NAME_RE ]] || die "bad client name '$1' (lowercase letters, digits, '_' and '-', at most 63)"
    [[ $RESERVED_NAMES != *" $1 "* ]] || die "client name '$1' is reserved (the name of one of the set's own files)"
}
case $mode in
    all) for client in "${clients[@]}"; do check_name "$client"; done ;;
    client | revoke) check_name "$name" ;;
esac

version=$("$OPENSSL" version 2>/dev/null) || die "cannot run '$OPENSSL' (install OpenSSL or set OPENSSL=/path/to/openssl)"
case $version in
    "OpenSSL 1.1.1"* | "OpenSSL "[3-9].*) ;;
    *) die "needs OpenSSL 1.1.1 or later (LibreSSL untested), found: $version (set OPENSSL=/path/to/openssl)" ;;
esac

umask 077 # every file and folder starts private; certificates and public files are opened up explicitly
mkdir -p -- "$out"
out=$(cd -- "$out" && pwd)
# The path is written into an openssl config file, where these characters have meaning.
case $out in *[\$\#\"\\]* | *$'\n'*) die "output folder path must not contain \$ # \" \\ or newlines: $out" ;; esac

server_dir=$out/server signing_dir=$out/signing clients_dir=$out/clients
stage=$(mktemp -d "$out/.gen_certs.XXXXXX")
trap 'rm -rf -- "$stage"' EXIT

ossl() { # openssl, quiet; its diagnostics are shown only when it fails
    if ! "$OPENSSL" "$@" 2>"$stage/openssl.err"; then
        cat "$stage/openssl.err" >&2
        die "openssl $1 failed"
    fi
}

b64url() { # stdin bytes -> base64url without padding (RFC 7515 section 2)
    "$OPENSSL" base64 -A | tr '+/' '-_' | tr -d '='
}

hex_to_b64url() { # big-endian hex -> the bytes, base64url (the JWK encoding of RSA n, RFC 7518 6.3.1)
    local hex=$1
    [ $((${#hex} % 2)) -eq 0 ] || hex=0$hex
    [[ $hex =~ ^[0-9A-Fa-f]+$ ]] || die "not hex: $hex"
    # bash's printf %b turns each \xHH into that byte (NUL included) on the pipe.
    printf '%b' "$(sed 's/../\\x&/g' <<<"$hex")" | b64url
}

new_key() { # FILE: a fresh ECDSA P-256 private key, mode 0600
    ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
    chmod 600 "$1"
}

serial() { # 0x1 + 15 random bytes: positive, 124 random bits, 16 octets
    local random
    random=$(ossl rand -hex 15)
    echo "0x1$random"
}

issue() { # KEY CERT SUBJECT EXTENSIONS CA_DIR: CERT for KEY, signed by the CA in CA_DIR
    local key=$1 crt=$2 subject=$3 extensions=$4 ca_dir=$5 sn
    sn=$(serial)
    ossl req -new -key "$key" -subj "$subject" -out "$stage/req.csr"
    printf '%s\n' "$extensions" >"$stage/ext.cnf"
    # x509 -req copies no extension from the request: the certificate carries exactly the ones listed here.
    ossl x509 -req -in "$stage/req.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" -set_serial "$sn" \
        -days "$CERT_DAYS" -sha256 -extfile "$stage/ext.cnf" -out "$crt"
    chmod 644 "$crt"
    rm -f "$stage/req.csr" "$stage/ext.cnf"
}

issue_client() { # NAME CA_DIR: $stage/clients/NAME/ with NAME.key, NAME.crt and a copy of the CA certificate
    local dir=$stage/clients/$1
    mkdir -p "$dir"
    new_key "$dir/$1.key"
    issue "$dir/$1.key" "$dir/$1.crt" "/CN=$1" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectAltName=URI:$SPIFFE_PREFIX/$1
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid" "$2"
    cp -- "$2/ca.crt" "$dir/ca.crt"
    chmod 644 "$dir/ca.crt"
}

issue_server() { # CA_DIR: $stage/server/server.key and $stage/server/server.crt
    mkdir -p "$stage/server"
    new_key "$stage/server/server.key"
    issue "$stage/server/server.key" "$stage/server/server.crt" "/CN=localhost" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid" "$1"
}

ca_config() { # CA_DIR DB_DIR: the openssl ca config, rewritten on every run so a copied folder uses its own files
    cat >"$stage/ca.cnf" <<CNF
[ ca ]
default_ca = gateway_ca
[ gateway_ca ]
database = $2/index.txt
crlnumber = $2/crlnumber
certificate = $1/ca.crt
private_key = $1/ca.key
default_md = sha256
default_crl_days = $CRL_DAYS
unique_subject = no
crl_extensions = crl_ext
[ crl_ext ]
# RFC 5280 5.2.1: a conforming CRL carries the authority key identifier (the CRL number is added from crlnumber).
authorityKeyIdentifier = keyid:always
CNF
}

sign_crl() { # CA_DIR DB_DIR: $stage/server/crl.pem listing the revoked entries of DB_DIR
    ca_config "$1" "$2"
    mkdir -p "$stage/server"
    ossl ca -config "$stage/ca.cnf" -gencrl -out "$stage/server/crl.pem"
    chmod 644 "$stage/server/crl.pem"
}

publish() { # PATH...: move staged files (paths below OUTDIR) into place; callers list a key before its certificate
    local file
    for file in "$@"; do
        mkdir -p -- "$out/$(dirname -- "$file")"
        mv -f -- "$stage/$file" "$out/$file"
    done
}

need_ca() {
    [ -f "$signing_dir/ca.key" ] && [ -f "$signing_dir/ca.crt" ] && [ -f "$signing_dir/.ca/index.txt" ] ||
        die "no CA in $signing_dir (run scripts/gen_certs.sh $out first)"
}

# --- one more client, a new server certificate, a revocation ---------------------------------------------------
case $mode in
    client)
        need_ca
        if [ -e "$clients_dir/$name/$name.key" ] && [ $force -eq 0 ]; then
            die "$clients_dir/$name/$name.key exists; refusing to replace it (use --force, and --revoke the old certificate)"
        fi
        issue_client "$name" "$signing_dir"
        publish "clients/$name/$name.key" "clients/$name/$name.crt" "clients/$name/ca.crt"
        echo "gen_certs.sh: client $name ($SPIFFE_PREFIX/$name) in $clients_dir/$name"
        exit 0 ;;
    server)
        need_ca
        issue_server "$signing_dir"
        publish server/server.key server/server.crt
        echo "gen_certs.sh: new server certificate in $server_dir"
        exit 0 ;;
    revoke)
        need_ca
        crt=$clients_dir/$name/$name.crt
        [ -f "$crt" ] || die "no certificate $crt"
        # Only a certificate this CA issued belongs on its CRL (serial numbers are unique per issuer only).
        ossl verify -no_check_time -CAfile "$signing_dir/ca.crt" "$crt" >/dev/null
        serial_hex=$(ossl x509 -in "$crt" -noout -serial)
        serial_hex=${serial_hex#serial=}
        ca_config "$signing_dir" "$signing_dir/.ca"
        if awk -F'\t' -v s="$serial_hex" '$1 == "R" && $4 == s { found = 1 } END { exit !found }' \
            "$signing_dir/.ca/index.txt"; then
            note="already revoked"  # idempotent: a rerun after a failed CRL write still re-signs it
        else
            ossl ca -config "$stage/ca.cnf" -revoke "$crt"
            note="revoked"
        fi
        sign_crl "$signing_dir" "$signing_dir/.ca"
        publish server/crl.pem
        echo "gen_certs.sh: $name (serial $serial_hex) $note; $server_dir/crl.pem re-signed"
        exit 0 ;;
esac

# --- a whole new set ---------------------------------------------------------------------------------------------
if [ -e "$signing_dir/ca.key" ] && [ $force -eq 0 ]; then
    die "$signing_dir/ca.key exists; refusing to replace the CA (use --force to make a new CA and everything it signed)"
fi

ca=$stage/signing
mkdir -p "$ca/.ca"
: >"$ca/.ca/index.txt"
echo 01 >"$ca/.ca/crlnumber"

new_key "$ca/ca.key"
# A random suffix tells CAs made by different runs apart in logs and error messages.
ca_tag=$(ossl rand -hex 4)
ca_serial=$(serial)
ossl req -x509 -new -key "$ca/ca.key" -subj "/CN=gateway CA $ca_tag" -days "$CA_DAYS" -sha256 \
    -set_serial "$ca_serial" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$ca/ca.crt"
chmod 644 "$ca/ca.crt"

issue_server "$ca"
cp -- "$ca/ca.crt" "$stage/server/ca.crt"  # the client CA the server verifies callers against
chmod 644 "$stage/server/ca.crt"
for client in "${clients[@]}"; do issue_client "$client" "$ca"; done
sign_crl "$ca" "$ca/.ca"

ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -pkeyopt rsa_keygen_pubexp:65537 \
    -out "$ca/jwt-signing.key"
chmod 600 "$ca/jwt-signing.key"
ossl pkey -in "$ca/jwt-signing.key" -pubout -out "$ca/jwt-signing.pub"
chmod 644 "$ca/jwt-signing.pub"

# jwks.json (RFC 7517): n is the modulus, e is fixed at generation; kid is the RFC 7638 thumbprint, the SHA-256
# of the required members in lexicographic order without whitespace.
modulus=$(ossl rsa -pubin -in "$ca/jwt-signing.pub" -noout -modulus)
n=$(hex_to_b64url "${modulus#Modulus=}")
e=AQAB
kid=$(printf '{"e":"%s","kty":"RSA","n":"%s"}' "$e" "$n" | "$OPENSSL" dgst -sha256 -binary | b64url)
cat >"$ca/jwks.json" <<JSON
{
  "keys": [
    {
      "kty": "RSA",
      "use": "sig",
      "alg": "RS256",
      "kid": "$kid",
      "n": "$n",
      "e": "$e"
    }
  ]
}
JSON
chmod 644 "$ca/jwks.json"
cp -- "$ca/jwks.json" "$stage/server/jwks.json"
chmod 644 "$stage/server/jwks.json"

ossl rand -hex 32 >"$stage/server/audit-hmac.key"
chmod 600 "$stage/server/audit-hmac.key"

new_key "$ca/model-signing.key"
ossl pkey -in "$ca/model-signing.key" -pubout -out "$ca/model-signing.pub"
chmod 644 "$ca/model-signing.pub"
cp -- "$ca/model-signing.pub" "$stage/server/model-signing.pub"  # what the server verifies model signatures with
chmod 644 "$stage/server/model-signing.pub"

mkdir -p -- "$signing_dir"
rm -rf -- "$signing_dir/.ca"
mv -- "$ca/.ca" "$signing_dir/.ca"
keys=(signing/ca.key signing/jwt-signing.key signing/model-signing.key server/server.key server/audit-hmac.key)
certs=(signing/ca.crt signing/jwt-signing.pub signing/jwks.json server/ca.crt server/server.crt server/crl.pem)
certs+=(server/jwks.json signing/model-signing.pub server/model-signing.pub)
for client in "${clients[@]}"; do
    keys+=("clients/$client/$client.key")
    certs+=("clients/$client/$client.crt" "clients/$client/ca.crt")
done
publish "${keys[@]}" "${certs[@]}"
echo "gen_certs.sh: serve with --certs $server_dir; clients (${clients[*]}) in $clients_dir; CA, JWT and model signing keys in $signing_dir"
