#!/bin/sh
# Prints the newest supported Python on this machine that runs (a pyenv shim of a version not selected does not),
# else the interpreter given ($1): `make test-latest` runs the suite on it.
for version in 3.13 3.12; do
  for python in "python$version" "$(pyenv prefix "$version" 2>/dev/null)/bin/python$version"; do
    "$python" -c '' 2>/dev/null && { command -v "$python"; exit 0; }
  done
done
echo "${1:-python3}"
