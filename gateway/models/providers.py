"""ONNX Runtime execution providers (``models.providers``; docs/providers.md): the names the settings use, which of
them the installed ONNX Runtime offers, and what a session is given.

Providers are named by their short names (``CUDA``, ``TensorRT``, ``CPU``...), tried in the order listed. By
default every listed provider must be available (a start error otherwise); ``models.provider_fallback`` drops the
unavailable ones with a log line instead. Which provider a session actually got is read back from the session.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

# Short name -> ONNX Runtime's name. Only providers ONNX Runtime's Python packages ship.
NAMES = {
    "TensorRT": "TensorrtExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "MIGraphX": "MIGraphXExecutionProvider",
    "OpenVINO": "OpenVINOExecutionProvider",
    "DirectML": "DmlExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "QNN": "QNNExecutionProvider",
    "CPU": "CPUExecutionProvider",
}
SHORT = {ort_name: short for short, ort_name in NAMES.items()}


def short_name(ort_name: str) -> str:
    """``CUDA`` for ``CUDAExecutionProvider``; a provider outside the table keeps ONNX Runtime's name."""
    return SHORT.get(ort_name, ort_name)


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """The providers to try, in order (``by_model`` overrides ``names``), their options, and whether an unavailable
    one is skipped (``fallback``) or an error."""

    names: tuple[str, ...] = ("CPU",)
    by_model: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    fallback: bool = False

    def for_model(self, model: str) -> tuple[str, ...]:
        """The providers one model asks for."""
        return self.by_model.get(model, self.names)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one session is given: ONNX Runtime's provider names and their options (same order), and the asked-for
    providers that were left out because this ONNX Runtime does not offer them."""

    providers: tuple[str, ...]
    options: tuple[dict[str, str], ...]
    unavailable: tuple[str, ...]


class ProviderError(Exception):
    """Asked-for providers this ONNX Runtime does not offer, without fallback; the message names the setting."""


def plan(settings: ProviderSettings, model: str, available: Collection[str]) -> Plan:
    """The providers a model's sessions get, given ONNX Runtime's ``available`` ones (its own names)."""
    asked = settings.for_model(model)
    usable = [name for name in asked if NAMES[name] in available]
    missing = tuple(name for name in asked if NAMES[name] not in available)
    if (missing and not settings.fallback) or not usable:
        key = f"models.providers_by_model.{model}" if model in settings.by_model else "models.providers"
        raise ProviderError(unavailable_message(key, missing or asked, available))
    return Plan(
        providers=tuple(NAMES[name] for name in usable),
        options=tuple(dict(settings.options.get(name, {})) for name in usable),
        unavailable=missing,
    )


def unavailable_message(key: str, missing: Sequence[str], available: Collection[str]) -> str:
    """Why a start stops: which providers, what is installed, and the two ways on."""
    offered = ", ".join(short_name(name) for name in available) or "none"
    return (
        f"{key}: {', '.join(missing)} not available in this ONNX Runtime (it offers {offered}): install the "
        "package that brings it (onnxruntime-gpu for CUDA and TensorRT, onnxruntime-openvino for OpenVINO), or set "
        "models.provider_fallback: true to use the next available provider in the list instead"
    )
