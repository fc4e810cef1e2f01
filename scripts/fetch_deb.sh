#!/bin/sh
# Fetch pinned Debian packages into OUTDIR, each checked against its pinned sha256:
#   scripts/fetch_deb.sh SUITE OUTDIR NAME VERSION SHA256 POOL_PATH [NAME VERSION SHA256 POOL_PATH]...
# Each comes from its pool path on deb.debian.org, where a version stays until the point release that replaces it
# removes it. A download whose sha256 differs from the pin is refused (exit 1). A pinned version that is gone is
# replaced by the version SUITE's index lists now, fetched with `apt-get download` under a private APT_CONFIG
# (the system's sources and state untouched), which checks it against Debian's signed index: a WARNING names it and
# the pin to update. Where neither can be had (no network, no apt), the last line on stderr says why (exit 3).
set -eu

[ $# -ge 6 ] && [ $(( ($# - 2) % 4 )) -eq 0 ] || { echo "usage: $0 SUITE OUTDIR (NAME VERSION SHA256 POOL_PATH)..." >&2; exit 2; }
SUITE=$1
OUT=$2
shift 2
MIRROR=${DEBIAN_MIRROR:-https://deb.debian.org/debian}  # another only for tests
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"

unavailable() {
  echo "$1" >&2
  exit 3
}

gone=""
while [ $# -gt 0 ]; do
  name=$1 version=$2 sha256=$3 path=$4
  shift 4
  file="$OUT/$(basename "$path")"
  # 0: fetched; 4: not there (404 or 410: gone from the pool); anything else: the mirror cannot be reached.
  status=0
  "$PYTHON" - "$MIRROR/$path" "$file" <<'PY' || status=$?
import shutil, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=60) as answer, open(sys.argv[2], "wb") as out:
        shutil.copyfileobj(answer, out)
except urllib.error.HTTPError as exc:
    sys.exit(4 if exc.code in (404, 410) else 5)
except OSError:
    sys.exit(5)
PY
  case $status in
    0)
      echo "$sha256  $file" | sha256sum -c --quiet - >/dev/null 2>&1 || {
        rm -f "$file"
        echo "$name $version: sha256 mismatch for $MIRROR/$path (pinned $sha256): refused" >&2
        exit 1
      } ;;
    4) gone="$gone $name"; echo "WARNING: $name $version is gone from $MIRROR/$path (a Debian point release replaced it)" >&2 ;;
    *) unavailable "$MIRROR/$path could not be downloaded (no network?)" ;;
  esac
done
[ -z "$gone" ] && exit 0

command -v apt-get >/dev/null || unavailable "pinned$gone gone from Debian's pool and apt-get is absent"
[ -r "$KEYRING" ] || unavailable "pinned$gone gone from Debian's pool and $KEYRING is missing"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
: > "$work/status"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" > "$work/sources.list"
cat > "$work/apt.conf" <<EOF
Dir::State "$work";
Dir::State::Lists "$work/lists";
Dir::State::status "$work/status";
Dir::Cache "$work/cache";
Dir::Etc::SourceList "$work/sources.list";
Dir::Etc::SourceParts "/dev/null";
APT::Architecture "amd64";
EOF
export APT_CONFIG="$work/apt.conf"
apt-get -qq update >"$work/apt.log" 2>&1 || unavailable "apt-get update of $SUITE failed ($(tail -n 1 "$work/apt.log"))"
for name in $gone; do
  (cd "$OUT" && apt-get -qq download "$name:amd64" >"$work/apt.log" 2>&1) ||
    unavailable "cannot download $name from $SUITE ($(tail -n 1 "$work/apt.log"))"
  echo "WARNING: $name $(apt-cache show "$name:amd64" | sed -n 's/^Version: //p' | head -n 1) fetched instead, as" \
    "$SUITE's signed index lists it: update the pin (version, sha256, pool path) in the calling script" >&2
done
