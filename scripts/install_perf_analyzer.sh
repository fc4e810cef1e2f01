#!/usr/bin/env bash
# Install Triton's perf_analyzer 2.60.0 (requirements/perf-analyzer.txt, hash-checked) into DIR (default
# .tools/perf-analyzer) and write DIR/run, which runs the binary: directly where the system's glibc is 2.38 or newer,
# else through Debian 13's loader and C/C++ runtime: libc6, libstdc++6 and libgcc-s1 pinned by version and sha256,
# fetched by scripts/fetch_deb.sh from Debian's archive (a sha256 mismatch fails the install), unpacked, not installed.
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
    debs="$DIR/debs"
    status=0
    # Debian 13's runtime, pinned (version, sha256, pool path): scripts/fetch_deb.sh checks each download.
    PYTHON=$PYTHON "$HERE/scripts/fetch_deb.sh" trixie "$debs" \
        libc6 2.41-12+deb13u5 b59b0625cd1a791375d40dab23a4d5d3d0641e3d0a773501becdc3725b7f99cf \
        pool/main/g/glibc/libc6_2.41-12+deb13u5_amd64.deb \
        libstdc++6 14.2.0-19 ab1fa05837aa7a92aae748fd07a18a35f7d18bb4a71c4724fe2bbf0e32089de0 \
        pool/main/g/gcc-14/libstdc++6_14.2.0-19_amd64.deb \
        libgcc-s1 14.2.0-19 3c71917b490d1a17aed43196a2787a256ecf060526cdb20216a74bedc061b150 \
        pool/main/g/gcc-14/libgcc-s1_14.2.0-19_amd64.deb 2>"$DIR/fetch.log" || status=$?
    cat "$DIR/fetch.log" >&2
    [[ $status -ne 1 ]] || exit 1  # a sha256 mismatch: never run what was fetched, fail the install
    [[ $status -eq 0 ]] || unavailable "glibc $glibc is older than 2.38 and Debian 13's runtime could not be had: $(tail -n 1 "$DIR/fetch.log")"
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$DIR/root"; done
    rm -rf "$debs" "$DIR/fetch.log"
    libs="$DIR/root/usr/lib/x86_64-linux-gnu"
    # libssl3 and zlib are the system's: Debian 13's runtime is ABI-compatible with them.
    printf '#!/bin/sh\nexec "%s/ld-linux-x86-64.so.2" --library-path "%s:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" "%s" "$@"\n' \
        "$libs" "$libs" "$BINARY" > "$DIR/run"
fi
chmod +x "$DIR/run"
"$DIR/run" --version >/dev/null 2>&1 || "$DIR/run" --help >/dev/null 2>&1 ||
    unavailable "the perf_analyzer binary does not run on this machine"
echo "perf_analyzer 2.60.0 installed: $DIR/run"
