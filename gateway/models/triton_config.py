"""A Triton ``config.pbtxt`` in a model folder: read with protobuf's text format against Triton's own
model_config.proto (proto/triton/), honoured where the gateway has the same notion, and explained where it does not
(docs/triton-config.md).

Honoured: ``default_model_filename`` (the file each version folder is loaded from, instead of model.onnx), and
``name``, ``platform`` and ``backend``, checked. Everything else is named in the load log with where the gateway
keeps that setting (batching, versions, providers) or that it has none: the gateway reads a model's inputs and
outputs from the ONNX file itself, and its settings live in gateway.yaml, one place for each.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from gateway._pb.triton import model_config_pb2

CONFIG_FILE = "config.pbtxt"
MAX_BYTES = 1 << 20  # Triton's configs are a few kB; a larger file is not read
ONNX_PLATFORMS = {"platform": "onnxruntime_onnx", "backend": "onnxruntime"}
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}", re.ASCII)

# Where the gateway keeps what Triton's field sets ("{model}": the model's name).
ELSEWHERE = {
    "max_batch_size": "models.batching.{model}.max_batch_size (inputs and outputs come from the ONNX file)",
    "dynamic_batching": "models.batching.{model} (max_batch_size, max_queue_delay_us)",
    "input": "read from the ONNX file",
    "output": "read from the ONNX file",
    "version_policy": "every version folder loads; models.versions.{model} pins the default and a canary",
    "instance_group": "models.providers_by_model.{model} (CPU or GPU), models.run_threads (concurrency)",
    "optimization": "models.providers and models.provider_options (TensorRT, OpenVINO...)",
}


@dataclass(frozen=True, slots=True)
class TritonConfig:
    """What a model's config.pbtxt says that the gateway uses, and what it leaves aside (field -> where the gateway
    keeps it, or "not supported"); ``error`` when the file could not be used at all (then nothing is honoured)."""

    model_filename: str | None = None
    honoured: tuple[str, ...] = ()
    ignored: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()
    error: str | None = None


def read(model_folder: Path) -> TritonConfig | None:
    """The folder's config.pbtxt as the gateway reads it; None when there is none."""
    path = model_folder / CONFIG_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return TritonConfig(error=f"cannot read it: {exc.strerror}")
    return _read(str(path), model_folder.name, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _read(path: str, model: str, inode: int, size: int, mtime_ns: int) -> TritonConfig:
    """Parsed once per version of the file (the repository is scanned every poll)."""
    if size > MAX_BYTES:
        return TritonConfig(error=f"{size} bytes, over the {MAX_BYTES} read")
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_BYTES + 1).decode("utf-8")
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        return TritonConfig(error=" ".join(str(exc).split())[:300])
    return explain(config, model)


def explain(config: model_config_pb2.ModelConfig, model: str) -> TritonConfig:
    """Sort a parsed config's fields into honoured and ignored, with the warnings the honoured ones raise."""
    honoured: list[str] = []
    ignored: list[tuple[str, str]] = []
    warnings: list[str] = []
    filename = None
    for field, _ in config.ListFields():
        name = field.name
        if name == "name":
            honoured.append(name)
            if config.name != model:
                warnings.append(f"name '{config.name[:100]}' is not the folder's; the model is served as '{model}'")
        elif name in ONNX_PLATFORMS:
            honoured.append(name)
            value = getattr(config, name)
            if value != ONNX_PLATFORMS[name]:
                warnings.append(
                    f"{name} '{value[:100]}': the gateway runs ONNX models only, with ONNX Runtime "
                    f"({name}: {ONNX_PLATFORMS[name]})"
                )
        elif name == "default_model_filename":
            if not _FILE_NAME.fullmatch(config.default_model_filename) or ".." in config.default_model_filename:
                return TritonConfig(
                    error=f"default_model_filename '{config.default_model_filename[:100]}' is not a file name "
                    "in the version folder (letters, digits, '_', '.', '-')"
                )
            honoured.append(name)
            filename = config.default_model_filename
        else:
            ignored.append((name, ELSEWHERE.get(name, "not supported").format(model=model)))
    return TritonConfig(filename, tuple(honoured), tuple(ignored), tuple(warnings))


def model_file(config: TritonConfig | None, default: str) -> str:
    """The file each version folder is loaded from: default_model_filename when the config names one."""
    return config.model_filename if config is not None and config.model_filename else default
