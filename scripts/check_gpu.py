"""Check a GPU machine: load each demo model with every GPU execution provider this ONNX Runtime offers (CUDA,
TensorRT), confirm the session really runs on it, and compare its outputs with CPU's on the same inputs.

Run where onnxruntime-gpu is installed (not in this project's lock: it replaces onnxruntime):
``python scripts/check_gpu.py [MODELS] [--providers CUDA TensorRT] [--rtol 1e-3] [--atol 1e-4]``.
Exit 0 when every model ran on every provider asked for and matched CPU; 1 otherwise; 2 when no provider asked for is
available. One line per model and provider.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

PROVIDERS = {"CUDA": "CUDAExecutionProvider", "TensorRT": "TensorrtExecutionProvider"}
DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64}


def inputs_for(session: ort.InferenceSession, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """Random inputs for every input (dynamic dims as 4), or None when an input is of a type not generated here."""
    feed = {}
    for arg in session.get_inputs():
        dtype = DTYPES.get(arg.type)
        if dtype is None:
            return None
        shape = [dim if isinstance(dim, int) and dim > 0 else 4 for dim in arg.shape]
        feed[arg.name] = rng.random(shape).astype(dtype) if dtype != np.int64 else rng.integers(0, 3, shape)
    return feed


def check(model: Path, short: str, rtol: float, atol: float) -> bool:
    """One model on one provider against CPU: prints one line, returns whether it passed."""
    label = f"{model.parent.parent.name}:{model.parent.name} on {short}"
    cpu = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feed = inputs_for(cpu, np.random.default_rng(0))
    if feed is None:
        print(f"SKIP {label}: an input type this script does not generate")
        return True
    try:
        gpu = ort.InferenceSession(str(model), providers=[PROVIDERS[short], "CPUExecutionProvider"])
    except Exception as exc:
        print(f"FAIL {label}: the session did not start: {' '.join(str(exc).split())[:200]}")
        return False
    if gpu.get_providers()[0] != PROVIDERS[short]:
        print(f"FAIL {label}: ONNX Runtime fell back to {gpu.get_providers()[0]}")
        return False
    worst = 0.0
    for want, got in zip(cpu.run(None, feed), gpu.run(None, feed), strict=True):
        if not isinstance(want, np.ndarray):
            continue  # a sequence of maps (the iris classifier's probabilities): compared through the label output
        if want.dtype.kind in "iub":
            if not np.array_equal(want, got):
                print(f"FAIL {label}: integer outputs differ from CPU")
                return False
            continue
        if not np.allclose(want, got, rtol=rtol, atol=atol):
            print(f"FAIL {label}: max abs difference {float(np.max(np.abs(want - got))):.3g} over rtol/atol")
            return False
        worst = max(worst, float(np.max(np.abs(want - got))) if want.size else 0.0)
    print(f"OK   {label}: outputs match CPU (max abs difference {worst:.3g})")
    return True


def main(argv: list[str] | None = None) -> int:
    """Check every ``MODELS/<name>/<version>/model.onnx`` on each provider asked for."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="?", default="models", type=Path)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}, device {ort.get_device()}, providers {', '.join(available)}")
    asked = [short for short in args.providers if PROVIDERS[short] in available]
    for short in sorted(set(args.providers) - set(asked)):
        print(f"SKIP {short}: not in this ONNX Runtime (install onnxruntime-gpu)")
    if not asked:
        return 2
    models = sorted(args.models.glob("*/*/model.onnx"))
    if not models:
        print(f"no models under {args.models} (make models)")
        return 2
    results = [check(model, short, args.rtol, args.atol) for model in models for short in asked]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
