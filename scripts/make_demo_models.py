"""Build the demo model repository: ``OUTDIR/<name>/<version>/model.onnx``, offline and deterministic.

- ``digits/1``: scikit-learn logistic regression on the 8x8 digits set, ZipMap off, so both outputs are plain
  tensors (``label`` int64 [N], ``probabilities`` float [N,10]); input ``input`` float [N,64], pixels in [0, 1].
  The realistic classifier: predictions can be checked against held-out digits.
- ``mlp/1`` and ``mlp/2``: random 784-512-512-10 ReLU MLP (``input`` float [batch,784] -> ``output`` float
  [batch,10]), ~2.7 MB each. Same signature, different weights: exercises version selection and batching.
- ``iris/1``: ``logreg_iris.onnx`` shipped inside the onnxruntime wheel. Its ``probabilities`` output is a
  sequence of maps, not a tensor, and its input has a fixed shape [3,2]: the awkward model a gateway must handle.
- ``labels/1``: text in, text and numbers out (``text`` string [N] -> ``ids`` int64 [N], the index of each word
  in ``LABELS`` or -1, and ``echo`` string [N], the input unchanged): the BYTES datatype end to end.

Run: ``python scripts/make_demo_models.py [OUTDIR] [--force]`` (OUTDIR defaults to ``models``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from itertools import pairwise
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.datasets import get_example
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

# Opset 17 / IR 8 load on every onnxruntime since 1.13, well below the gateway's floor of 1.20.
ONNX_OPSET = 17
IR_VERSION = 8
DIGITS_SEED = 0
MLP_SEEDS = {1: 1, 2: 2}
MLP_LAYERS = (784, 512, 512, 10)
IRIS_EXAMPLE = "logreg_iris.onnx"
MODEL_FILE = "model.onnx"
LABELS = ("cat", "dog", "bird")


class RepositoryExistsError(FileExistsError):
    """Raised when model directories already exist and overwriting was not asked for."""

    def __init__(self, existing: Sequence[Path]) -> None:
        self.existing = tuple(existing)
        super().__init__("already exists: " + ", ".join(str(path) for path in self.existing))


def split_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return the digits set as ``(x_train, x_test, y_train, y_test)``, float32 pixels scaled to [0, 1]."""
    features, labels = load_digits(return_X_y=True)
    # Raw pixels are 0..16; scaling keeps the solver well conditioned and the client contract simple.
    features = (features / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.25, random_state=DIGITS_SEED, stratify=labels
    )
    return x_train, x_test, y_train, y_test


def build_digits() -> bytes:
    """Train the digits classifier and return it as a serialized ONNX model with tensor-only outputs."""
    x_train, _, y_train, _ = split_digits()
    classifier = LogisticRegression(max_iter=1000, random_state=DIGITS_SEED).fit(x_train, y_train)
    model = to_onnx(
        classifier,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={"zipmap": False},
        target_opset=ONNX_OPSET,
    )
    _merge_opset_imports(model)
    model.doc_string = "LogisticRegression on sklearn digits; input is 8x8 pixels scaled to [0, 1]."
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _merge_opset_imports(model: onnx.ModelProto) -> None:
    """Keep one opset import per domain (skl2onnx 1.20 lists the default domain twice)."""
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in versions.items())


def build_mlp(seed: int) -> onnx.ModelProto:
    """Return a 784-512-512-10 ReLU MLP with He-initialised weights drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    current = "input"
    last = len(MLP_LAYERS) - 2
    for index, (fan_in, fan_out) in enumerate(pairwise(MLP_LAYERS)):
        weight = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out)).astype(np.float32)
        # Non-zero biases so that even an all-zero input gives a distinct answer per version.
        bias = rng.normal(0.0, 0.1, size=fan_out).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, name=f"fc{index}.weight"),
            numpy_helper.from_array(bias, name=f"fc{index}.bias"),
        ]
        gemm_out = "output" if index == last else f"fc{index}"
        nodes.append(
            helper.make_node("Gemm", [current, f"fc{index}.weight", f"fc{index}.bias"], [gemm_out], name=f"fc{index}")
        )
        if index != last:
            current = f"relu{index}"
            nodes.append(helper.make_node("Relu", [gemm_out], [current], name=current))

    graph = helper.make_graph(
        nodes,
        "mlp",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", MLP_LAYERS[0]])],
        outputs=[helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", MLP_LAYERS[-1]])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=IR_VERSION,
        producer_name="gateway-demo",
        doc_string=f"Random 784-512-512-10 ReLU MLP, seed {seed}; for load and batching tests only.",
    )
    onnx.checker.check_model(model)
    return model


def build_labels() -> bytes:
    """Return the string model: a LabelEncoder from words to their index in ``LABELS``, and an echo."""
    graph = helper.make_graph(
        [
            helper.make_node(
                "LabelEncoder",
                ["text"],
                ["ids"],
                domain="ai.onnx.ml",
                keys_strings=list(LABELS),
                values_int64s=list(range(len(LABELS))),
                default_int64=-1,
            ),
            helper.make_node("Identity", ["text"], ["echo"]),
        ],
        "labels",
        inputs=[helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        outputs=[
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch"]),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("ai.onnx.ml", 3)],
        ir_version=IR_VERSION,
        producer_name="gateway-demo",
        doc_string="Words to label ids, and the words echoed: string tensors in and out.",
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def read_iris() -> bytes:
    """Return the bytes of the iris logistic regression example that ships with onnxruntime."""
    return Path(get_example(IRIS_EXAMPLE)).read_bytes()


def _serialized_mlp(seed: int) -> bytes:
    return build_mlp(seed).SerializeToString()


def _recipes() -> dict[tuple[str, int], Callable[[], bytes]]:
    """Map (model name, version) to a function returning that model's serialized bytes."""
    recipes: dict[tuple[str, int], Callable[[], bytes]] = {("digits", 1): build_digits}
    recipes |= {("mlp", version): partial(_serialized_mlp, seed) for version, seed in MLP_SEEDS.items()}
    recipes["iris", 1] = read_iris
    recipes["labels", 1] = build_labels
    return recipes


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file sits in the target directory: os.replace is only atomic within one filesystem.
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            # mkstemp creates 0600; give the mode a plain open() would, so a gateway user can read it.
            os.fchmod(handle.fileno(), 0o666 & ~_current_umask())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def describe(path: Path) -> str:
    """Return a one-line signature of the model at ``path`` as onnxruntime sees it."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def side(args: Sequence[onnxruntime.NodeArg]) -> str:
        return ", ".join(f"{arg.name}: {arg.type} {arg.shape}" for arg in args)

    return f"({side(session.get_inputs())}) -> ({side(session.get_outputs())})"


def write_repository(outdir: Path, *, force: bool = False) -> list[Path]:
    """Write every demo model under ``outdir`` and return the paths written.

    Raises ``RepositoryExistsError`` before writing anything if a model directory exists and ``force`` is
    false. With ``force``, only the files this script owns are replaced; other versions are left alone.
    """
    recipes = _recipes()
    names = dict.fromkeys(name for name, _ in recipes)
    existing = [outdir / name for name in names if (outdir / name).exists()]
    if existing and not force:
        raise RepositoryExistsError(existing)

    written = []
    for (name, version), build in recipes.items():
        path = outdir / name / str(version) / MODEL_FILE
        write_atomic(path, build())
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", type=Path, default=Path("models"), help="default: models")
    parser.add_argument("--force", action="store_true", help="replace models that already exist")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    try:
        written = write_repository(args.outdir, force=args.force)
    except RepositoryExistsError as exc:
        for path in exc.existing:
            print(f"exists: {path}", file=sys.stderr)
        print("refusing to overwrite; pass --force to replace", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path} {describe(path)}")
    print(f"{len(written)} models in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
