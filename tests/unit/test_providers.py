"""Execution provider plans without a session: order, per-model lists, options, fallback; and the GPU check script
on this CPU-only machine (it says what is missing and exits 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.models.providers import ProviderError, ProviderSettings, plan, short_name
from tests.conftest import ROOT

CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]
GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_the_plan_keeps_the_order_and_each_providers_options():
    settings = ProviderSettings(names=("TensorRT", "CUDA", "CPU"), options={"CUDA": {"device_id": "1"}})
    made = plan(settings, "mlp", GPU)
    assert made.providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert made.options == ({}, {"device_id": "1"}, {})
    assert made.unavailable == ()


def test_without_fallback_a_missing_provider_is_an_error_naming_the_models_own_key():
    settings = ProviderSettings(names=("CPU",), by_model={"mlp": ("CUDA", "CPU")})
    assert plan(settings, "iris", CPU_ONLY).providers == ("CPUExecutionProvider",)
    with pytest.raises(ProviderError, match=r"^models\.providers_by_model\.mlp: CUDA not available .*offers Azure"):
        plan(settings, "mlp", CPU_ONLY)


def test_with_fallback_missing_providers_are_skipped_and_named_but_one_must_remain():
    settings = ProviderSettings(names=("CUDA", "OpenVINO", "CPU"), fallback=True)
    made = plan(settings, "mlp", CPU_ONLY)
    assert (made.providers, made.unavailable) == (("CPUExecutionProvider",), ("CUDA", "OpenVINO"))
    with pytest.raises(ProviderError, match=r"^models\.providers: CUDA not available"):
        plan(ProviderSettings(names=("CUDA",), fallback=True), "mlp", CPU_ONLY)


def test_short_names_round_trip_and_unknown_ones_keep_onnx_runtimes_name():
    assert short_name("CUDAExecutionProvider") == "CUDA"
    assert short_name("AzureExecutionProvider") == "AzureExecutionProvider"


def test_the_gpu_check_on_a_cpu_only_machine_says_what_is_missing_and_exits_2():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a GPU build of ONNX Runtime: the script would run the check")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/check_gpu.py"), str(ROOT / "models")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "SKIP CUDA: not in this ONNX Runtime (install onnxruntime-gpu)" in result.stdout
