#!/bin/sh
# Installs Prometheus' promtool into DEST (default .tools/prometheus) for the tests that check the metrics exposition
# and the alert rules (deploy/prometheus/). It comes from Debian's `prometheus` package, pinned by version and
# sha256: downloaded with `apt-get download` under a private APT_CONFIG (its own lists and cache in a temporary
# folder; the system's sources and state are untouched) and unpacked with `dpkg-deb -x`. Nothing is installed
# system-wide and no service starts. Where it cannot be had (no apt, another architecture, no network), it says so
# and exits 0: those tests then skip with the same message.
set -eu

VERSION=2.42.0+ds-5+deb12u1
ARCH=amd64
SHA256=81d59a24fce84f7fbe97a45a4f2914b6a5881b5cd1db2a6a0e129e515e1a5f55
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
DEST=${1:-.tools/prometheus}

skip() {
  echo "promtool not installed: $1 (the promtool checks of tests/ will be skipped)"
  exit 0
}

if [ -x "$DEST/promtool" ] && [ "$(cat "$DEST/version" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || skip "apt-get and dpkg-deb are needed"
[ "$(dpkg --print-architecture 2>/dev/null)" = "$ARCH" ] || skip "the pinned package is for $ARCH only"
[ -r "$KEYRING" ] || skip "$KEYRING (Debian's archive keys) is missing"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/unpacked"
: > "$work/status"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" > "$work/sources.list"
cat > "$work/apt.conf" <<EOF
Dir::State "$work";
Dir::State::Lists "$work/lists";
Dir::State::status "$work/status";
Dir::Cache "$work/cache";
Dir::Etc::SourceList "$work/sources.list";
Dir::Etc::SourceParts "/dev/null";
APT::Sandbox::User "root";
EOF
export APT_CONFIG="$work/apt.conf"
apt-get -qq update >"$work/apt.log" 2>&1 || skip "apt-get update failed ($(tail -n 1 "$work/apt.log"))"
(cd "$work" && apt-get -qq download "prometheus:$ARCH=$VERSION" >"$work/apt.log" 2>&1) ||
  skip "cannot download prometheus $VERSION ($(tail -n 1 "$work/apt.log"))"
deb="$work/prometheus_$(echo "$VERSION" | sed 's/:/%3a/')_$ARCH.deb"
echo "$SHA256  $deb" | sha256sum -c --quiet - || { echo "prometheus $VERSION: sha256 mismatch" >&2; exit 1; }
dpkg-deb -x "$deb" "$work/unpacked"
mkdir -p "$DEST"
install -m 0755 "$work/unpacked/usr/bin/promtool" "$DEST/promtool"
echo "$VERSION" > "$DEST/version"
echo "installed $("$DEST/promtool" --version 2>&1 | head -n 1) in $DEST"
