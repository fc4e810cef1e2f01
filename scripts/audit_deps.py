"""`make audit-deps`: pip-audit over every version uv.lock pins (PyPI's advisory data, the default service).

Where no vulnerability service answers (an offline machine), it says so in one line and succeeds: the check is
advice for whoever refreshes the lock, not a gate that a network outage should close.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import httpx

# pip-audit's default service: PyPI's JSON API, one release at a time. Asked here for a release that exists (this
# environment's pip): a mirror that serves only whole projects answers 404, and pip-audit would then report every
# package "not found on PyPI" and still say "No known vulnerabilities found".
SERVICE = f"https://pypi.org/pypi/pip/{importlib.metadata.version('pip')}/json"


def service_answers() -> bool:
    try:
        response = httpx.get(SERVICE, timeout=10)
        return response.status_code == httpx.codes.OK and "vulnerabilities" in response.json()
    except (httpx.HTTPError, ValueError):
        return False


def main(requirements: str) -> int:
    if not service_answers():
        print(f"audit-deps: no vulnerability service answered ({SERVICE}): nothing was checked")
        return 0
    command = [sys.executable, "-m", "pip_audit", "--requirement", requirements, "--require-hashes"]
    command += ["--disable-pip", "--progress-spinner", "off"]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
