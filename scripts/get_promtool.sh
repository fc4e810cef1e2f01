#!/bin/sh
# Installs Prometheus' promtool into DEST (default .tools/prometheus) for the tests that check the metrics exposition
# and the alert rules (deploy/prometheus/). It comes from Debian's `prometheus` package, pinned by version and
# sha256, fetched by scripts/fetch_deb.sh (a sha256 mismatch fails: exit 1; a pinned version a point release
# removed is replaced by the suite's current one, checked against Debian's signed index, with a WARNING) and
# unpacked with `dpkg-deb -x`. Nothing is installed system-wide and no service starts. Where it cannot be had
# (another architecture, no network), DEST/unavailable says why and exits 0: those tests skip with that note.
set -eu

VERSION=2.42.0+ds-5+deb12u1
ARCH=amd64
SHA256=81d59a24fce84f7fbe97a45a4f2914b6a5881b5cd1db2a6a0e129e515e1a5f55
POOL_PATH=pool/main/p/prometheus/prometheus_${VERSION}_$ARCH.deb
SUITE=bookworm
DEST=${1:-.tools/prometheus}
HERE=$(cd "$(dirname "$0")" && pwd)

# The note the promtool tests skip with (tests/conftest.py): why promtool is not there.
skip() {
  mkdir -p "$DEST"
  echo "$1" > "$DEST/unavailable"
  echo "promtool not installed: $1 (the promtool checks of tests/ will be skipped)" >&2
  exit 0
}

if [ -x "$DEST/promtool" ] && [ "$(cat "$DEST/version" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
command -v dpkg-deb >/dev/null || skip "dpkg-deb is needed"
[ "$(dpkg --print-architecture 2>/dev/null)" = "$ARCH" ] || skip "the pinned package is for $ARCH only"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
"$HERE/fetch_deb.sh" "$SUITE" "$work/debs" prometheus "$VERSION" "$SHA256" "$POOL_PATH" 2>"$work/fetch.log" ||
  status=$?
cat "$work/fetch.log" >&2
[ "$status" -ne 1 ] || exit 1  # a sha256 mismatch: fail, never install what was fetched
[ "$status" -eq 0 ] || skip "prometheus $VERSION could not be had: $(tail -n 1 "$work/fetch.log")"
mkdir -p "$work/unpacked"
dpkg-deb -x "$work/debs"/prometheus_*.deb "$work/unpacked"
mkdir -p "$DEST"
install -m 0755 "$work/unpacked/usr/bin/promtool" "$DEST/promtool"
rm -f "$DEST/unavailable"
dpkg-deb -f "$work/debs"/prometheus_*.deb Version > "$DEST/version"
echo "installed $("$DEST/promtool" --version 2>&1 | head -n 1) in $DEST"
