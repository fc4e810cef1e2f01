"""Packaging: pyproject.toml builds (as ``make setup``'s ``pip install -e`` does) without setuptools warnings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_editable_build_gives_no_setuptools_deprecation_warning(tmp_path):
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("gateway", "meta", "dist"):
        (tmp_path / folder).mkdir()
    (tmp_path / "gateway" / "__init__.py").write_text("")
    build = (
        "from setuptools import build_meta\n"
        "print(build_meta.prepare_metadata_for_build_editable('meta'))\n"
        "print(build_meta.build_editable('dist'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", build],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
