"""ONNX Runtime session settings: what the configuration asks for is what the session gets."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from gateway.models.runtime import RuntimeOptions, _session_options


def test_default_session_runs_one_intra_op_thread_sequentially_without_spinning() -> None:
    options = _session_options(RuntimeOptions())
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize(("mode", "expected"), [("sequential", "ORT_SEQUENTIAL"), ("parallel", "ORT_PARALLEL")])
def test_configured_threads_and_execution_mode_reach_the_session(mode: str, expected: str) -> None:
    options = _session_options(RuntimeOptions(intra_op_threads=0, inter_op_threads=3, execution_mode=mode))
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (0, 3)
    assert options.execution_mode == getattr(ort.ExecutionMode, expected)
