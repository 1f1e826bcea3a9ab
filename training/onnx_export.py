"""ONNX export: the whole sampler as one graph, for serving with ONNX Runtime.

    credence-export --model models/NAME[/VERSION]      (or credence-train ... --export-onnx)

writes `model.onnx` into the checkpoint's version folder and lists it, with its sha256, in
the manifest. The graph is `PosteriorModel.sample` itself, sample axis included:

    inputs   x [B, D] float32 (original units), seeds [B] int64, n int64 scalar
    output   draws [n, B, out], as `sample(x, n, seeds)` returns them

Normalization and the likelihood head are inside the graph. Dropout masks are NOT the ONNX
Dropout op, which graph optimizers delete from inference graphs: they are the counter-based
hash of `training.rng` written in uint32 ONNX ops (Mul and Add wrap modulo 2**32, which is
what the hash's masked int64 products compute), so they survive every optimization level,
depend on each row's seed alone, and are the PyTorch masks bit for bit. The only difference
from PyTorch is the float rounding of the matrix products.

Exported methods: MC dropout, and the stored draw sets (ensembles, SG-MCMC samples), whose
draw s is member s mod M. Methods that draw Gaussian weights per request (variational,
laplace) are refused with a message that says so.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from training.architectures import arch_name
from training.checkpoint import ONNX, Checkpoint, CheckpointError, add_files
from training.evaluate import load_model_path  # the MODEL_DIR/NAME[/VERSION] rule of -eval
from training.likelihoods import MIN_VARIANCE, GaussianHead
from training.model import PosteriorModel
from training.posteriors.mc_dropout import MCDropoutMLP
from training.posteriors.stacked import DeepEnsemble, SGHMCSamples, SGLDSamples, StackedMLP

OPSET = 18  # BitwiseAnd / BitwiseXor need 18
IR_VERSION = 8  # the IR of opset 18; onnxruntime refuses IRs newer than it knows
OUTPUT = "draws"

# The hash of training.rng; tests/test_onnx.py checks every stage against it bit for bit.
_MIX_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_MIX_SHIFTS = (16, 15, 15)
_GOLDEN = 0x61C88647
_HALF_BITS = 16  # bernoulli: two 16-bit thresholds per 32-bit hash word


class ExportError(ValueError):
    """A model this exporter cannot write as ONNX (a method without an exporter)."""


class Graph:
    """A small builder over onnx.helper: fresh names, constants as initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names = 0

    def _fresh(self, hint: str) -> str:
        self._names += 1
        return f"{hint}_{self._names}"

    def const(self, value: np.ndarray | int | float, dtype: type = np.float32) -> str:
        name = self._fresh("c")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def u32(self, value: int | np.ndarray) -> str:
        return self.const(value, np.uint32)

    def i64(self, value: int | Sequence[int] | np.ndarray) -> str:
        return self.const(value, np.int64)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: object) -> str:
        """Add a node; returns its (first) output name."""
        names = [self._fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0]

    def ops(self, op_type: str, *inputs: str, outputs: int, **attrs: object) -> list[str]:
        """Add a node with several outputs; returns all their names."""
        names = [self._fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names

    def model(
        self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="credence",
        )
        onnx.checker.check_model(model, full_check=True)
        return model


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


# --- training.rng in uint32 ONNX ops -----------------------------------------------------


def mix32(g: Graph, x: str) -> str:
    """rng.mix32: xor-shift / multiply avalanche; uint32 Mul wraps like `& 0xFFFFFFFF`."""
    first, second, third = (g.u32(s) for s in _MIX_SHIFTS)
    x = g.op("BitwiseXor", x, g.op("BitShift", x, first, direction="RIGHT"))
    x = g.op("Mul", x, g.u32(_MIX_MULTIPLIERS[0]))
    x = g.op("BitwiseXor", x, g.op("BitShift", x, second, direction="RIGHT"))
    x = g.op("Mul", x, g.u32(_MIX_MULTIPLIERS[1]))
    return g.op("BitwiseXor", x, g.op("BitShift", x, third, direction="RIGHT"))


def combine(g: Graph, key: str, value: str) -> str:
    """rng.combine: mix32(key ^ mix32(value + golden)), broadcasting key against value."""
    return mix32(g, g.op("BitwiseXor", key, mix32(g, g.op("Add", value, g.u32(_GOLDEN)))))


def seed_keys(g: Graph, seeds: str) -> str:
    """rng.seed_keys: int64 seeds [U] -> uint32 keys [U] from both 32-bit halves.

    Casts between integer types keep the low bits (two's complement), and the high half is
    a logical shift of the seed's bits, which is what `(seeds >> 32) & 0xFFFFFFFF` gives.
    """
    low = g.op("Cast", seeds, to=TensorProto.UINT32)
    unsigned = g.op("Cast", seeds, to=TensorProto.UINT64)
    high_bits = g.op("BitShift", unsigned, g.const(32, np.uint64), direction="RIGHT")
    high = g.op("Cast", high_bits, to=TensorProto.UINT32)
    return combine(g, mix32(g, low), high)


def draw_keys(g: Graph, seed_key: str, n: str, stream: int) -> str:
    """rng.draw_keys from precomputed seed keys [U]: keys [n, U] of draws 0..n-1."""
    per_seed = g.op("Unsqueeze", combine(g, seed_key, g.u32(stream)), g.i64([0]))
    draws = g.op("Range", g.i64(0), n, g.i64(1))
    draws = g.op("Unsqueeze", g.op("Cast", draws, to=TensorProto.UINT32), g.i64([1]))
    return combine(g, per_seed, draws)


def bits(g: Graph, keys: str, size: int) -> str:
    """rng.bits: keys [...] -> uint32 words [..., size], word i of key k = hash(k, i)."""
    counters = g.u32(np.arange(size, dtype=np.uint32))
    return combine(g, g.op("Unsqueeze", keys, g.i64([-1])), counters)


def bernoulli(g: Graph, keys: str, size: int, p: float) -> str:
    """rng.bernoulli: keys [n, U] -> booleans [n, U, size], True with probability p.

    Element 2j compares the low 16 bits of word j with round(p * 2**16), element 2j+1 its
    high 16 bits: the two halves are compared, then interleaved by a Concat on a new last
    axis and a Reshape (faster in onnxruntime than a Gather of each element's word).
    """
    words = bits(g, keys, math.ceil(size / 2))
    threshold = g.u32(round(p * 2**_HALF_BITS))
    low = g.op("BitwiseAnd", words, g.u32((1 << _HALF_BITS) - 1))
    high = g.op("BitShift", words, g.u32(_HALF_BITS), direction="RIGHT")
    last = g.i64([-1])
    pairs = [g.op("Unsqueeze", g.op("Less", half, threshold), last) for half in (low, high)]
    keep = g.op("Reshape", g.op("Concat", *pairs, axis=-1), g.i64([0, 0, -1]))
    if size % 2:  # the high half of the last word is not used
        keep = g.op("Slice", keep, g.i64([0]), g.i64([size]), last)
    return keep


def rng_probe(stream: int, size: int, p: float) -> onnx.ModelProto:
    """A graph of the hash stages alone (seeds [B], n) -> seed keys [B], draw keys [n, B],
    bits [n, B, size] and bernoulli [n, B, size]: how the tests compare them with rng."""
    g = Graph()
    seed_key = seed_keys(g, "seeds")
    keys = draw_keys(g, seed_key, "n", stream)
    outputs = {  # name: (value, element type, shape)
        "seed_keys": (seed_key, TensorProto.UINT32, ["batch"]),
        "draw_keys": (keys, TensorProto.UINT32, ["draws", "batch"]),
        "bits": (bits(g, keys, size), TensorProto.UINT32, ["draws", "batch", size]),
        "bernoulli": (bernoulli(g, keys, size, p), TensorProto.BOOL, ["draws", "batch", size]),
    }
    out = []
    for name, (value, kind, shape) in outputs.items():
        g.nodes.append(helper.make_node("Identity", [value], [name]))
        out.append(helper.make_tensor_value_info(name, kind, shape))
    return g.model(_inputs()[1:], out, "credence_rng_probe")


# --- model bodies: standardized inputs [B, D] -> raw head outputs [n, B, raw] ------------


def _activation(g: Graph, name: str, h: str) -> str:
    if name == "relu":
        return g.op("Relu", h)
    if name == "tanh":
        return g.op("Tanh", h)
    if name == "gelu":  # F.gelu's exact form: x * Phi(x)
        phi = g.op("Add", g.op("Erf", g.op("Div", h, g.const(math.sqrt(2.0)))), g.const(1.0))
        return g.op("Mul", g.op("Mul", h, phi), g.const(0.5))
    raise ExportError(f"no ONNX form for activation {name!r}")


def _mc_dropout_body(g: Graph, model: MCDropoutMLP, z: str, n: str) -> str:
    """MCDropoutMLP's draws: one mask per (draw, distinct seed), gathered to the rows."""
    unique, _, row_of, _ = g.ops("Unique", "seeds", outputs=4, sorted=1)
    seed_key = seed_keys(g, unique)
    activation = model.arch.get("activation", "relu")
    h, masked = z, False
    for i, layer in enumerate(model.layers):
        weight = layer.weight.detach().cpu()
        if model._dropped(i):
            width = layer.in_features
            keep = bernoulli(g, draw_keys(g, seed_key, n, stream=i), width, 1 - model.p)
            keep = g.op("Cast", g.op("Gather", keep, row_of, axis=1), to=TensorProto.FLOAT)
            h = g.op("Mul", h, keep)  # torch.where(keep, h, 0) for finite h; Where is slower
            # the 1 / (1 - p) rescale rides on the weights (PyTorch scales the product: the
            # two agree to rounding)
            weight = weight * (1 / (1 - model.p))
            masked = True
        h = g.op("MatMul", h, g.const(weight.numpy().T))
        h = g.op("Add", h, g.const(_np(layer.bias)))
        if i < len(model.layers) - 1:
            h = _activation(g, activation, h)
    if not masked:  # no dropout anywhere: the same output for every draw
        h = g.op("Expand", h, g.op("Concat", g.op("Reshape", n, g.i64([1])), g.i64([1, 1]), axis=0))
    return h


def _stacked_body(g: Graph, model: StackedMLP, z: str, n: str) -> str:
    """StackedMLP's draws: draw s runs member s mod M; the seeds are not used."""
    members = g.op("Mod", g.op("Range", g.i64(0), n, g.i64(1)), g.i64(model.members))
    activation = model.arch.get("activation", "relu")
    h = z
    for i, (weight, bias) in enumerate(zip(model.weights, model.biases, strict=True)):
        w = g.op("Gather", g.const(_np(weight)), members, axis=0)
        b = g.op("Gather", g.const(_np(bias)), members, axis=0)
        h = g.op("Add", g.op("MatMul", h, w), b)  # [B, a] @ [n, a, b] broadcasts to [n, B, b]
        if i < len(model.weights) - 1:
            h = _activation(g, activation, h)
    return h


Body = Callable[[Graph, PosteriorModel, str, str], str]
BODIES: dict[type[PosteriorModel], Body] = {
    MCDropoutMLP: _mc_dropout_body,  # type: ignore[dict-item]
    DeepEnsemble: _stacked_body,  # type: ignore[dict-item]
    SGLDSamples: _stacked_body,  # type: ignore[dict-item]
    SGHMCSamples: _stacked_body,  # type: ignore[dict-item]
}
EXPORTABLE_METHODS = tuple(sorted(cls.method for cls in BODIES))


def check_exportable(method: str, arch: str = "mlp") -> None:
    """Raise ExportError unless `method` on `arch` has an ONNX exporter."""
    if arch != "mlp":
        raise ExportError(f"ONNX export covers MLPs, not a {arch}; serve it with the torch backend")
    if method not in EXPORTABLE_METHODS:
        raise ExportError(
            f"method {method!r} cannot be exported to ONNX; the methods that export are "
            f"{', '.join(EXPORTABLE_METHODS)}; serve it with the torch backend"
        )


# --- normalization and likelihood head ---------------------------------------------------


def _head(g: Graph, model: PosteriorModel, raw: str) -> str:
    """head.per_draw, then the normalizer's return to original units (Gaussian heads)."""
    head, norm = model.head, model.normalizer
    if not isinstance(head, GaussianHead):
        return raw  # logits
    k = head.num_targets
    y_std = norm.y_std.detach().cpu()
    scale2 = (y_std**2).numpy()
    if head.noise == "heteroscedastic":
        mean = g.op("Slice", raw, g.i64([0]), g.i64([k]), g.i64([-1]))
        soft = g.op("Softplus", g.op("Slice", raw, g.i64([k]), g.i64([2 * k]), g.i64([-1])))
        variance = g.op("Mul", g.op("Add", soft, g.const(MIN_VARIANCE)), g.const(scale2))
    else:  # the same variance for every draw: exp(log variance) * y_std**2, in PyTorch
        mean = raw
        constant = (head.log_noise_variance.detach().cpu().exp() * y_std**2).numpy()
        variance = g.op("Expand", g.const(constant), g.op("Shape", raw))
    mean = g.op("Add", g.op("Mul", mean, g.const(y_std.numpy())), g.const(_np(norm.y_mean)))
    return g.op("Concat", mean, variance, axis=-1)


def _inputs(features: int | None = None) -> list[onnx.ValueInfoProto]:
    return [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features or "features"]),
        helper.make_tensor_value_info("seeds", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("n", TensorProto.INT64, []),
    ]


def build_graph(model: PosteriorModel) -> onnx.ModelProto:
    """The ONNX graph of `model.sample` (see the module docstring for its inputs/output)."""
    body = BODIES.get(type(model))
    if body is None:
        check_exportable(model.method, arch_name(model.arch))
        raise ExportError(f"no ONNX exporter for {type(model).__name__}")
    g = Graph()
    norm = model.normalizer
    z = g.op(
        "Div",
        g.op("Sub", "x", g.const(_np(norm.x_mean))),
        g.const(_np(norm.x_std)),
    )
    with torch.no_grad():
        draws = _head(g, model, body(g, model, z, "n"))
    g.nodes.append(helper.make_node("Identity", [draws], [OUTPUT]))
    out_features = 2 * model.head.num_targets if model.task == "regression" else None
    out = helper.make_tensor_value_info(
        OUTPUT, TensorProto.FLOAT, ["draws", "batch", out_features or model.head.raw_features]
    )
    return g.model(_inputs(model.arch["in_features"]), [out], f"credence_{model.method}")


# --- running and checking ----------------------------------------------------------------


def session(
    data: bytes, threads: int = 0, level: str = "all", optimized_path: Path | None = None
) -> ort.InferenceSession:
    """A CPU onnxruntime session; threads 0 = onnxruntime's choice; level all|basic|none.

    Idle threads sleep instead of spinning: the server's summaries and event loop share the
    same cores, and on a busy 2-core machine spinning made 2-thread calls slower, not faster.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_draws(sess: ort.InferenceSession, x: np.ndarray, n: int, seeds: np.ndarray) -> np.ndarray:
    """draws [n, B, out] from a session of an exported graph."""
    feeds = {
        "x": np.ascontiguousarray(x, dtype=np.float32),
        "seeds": np.ascontiguousarray(seeds, dtype=np.int64),
        "n": np.asarray(n, dtype=np.int64),
    }
    return sess.run([OUTPUT], feeds)[0]


def verify(model: PosteriorModel, data: bytes, rows: int = 16, n: int = 8) -> None:
    """Refuse a graph whose draws differ from PyTorch's beyond float rounding."""
    norm = model.normalizer
    gen = torch.Generator().manual_seed(0)
    mean, std = norm.x_mean.detach().cpu(), norm.x_std.detach().cpu()
    x = mean + std * torch.randn(rows, model.arch["in_features"], generator=gen)
    seeds = torch.randint(0, 2**62, (rows,), generator=gen)
    seeds[rows // 2 :] = seeds[0]  # some rows share a seed, as a batched request's rows do
    device = mean.device if not list(model.parameters()) else next(model.parameters()).device
    expected = _np(model.sample(x.to(device), n, seeds.to(device)))
    got = run_draws(session(data, threads=1), x.numpy(), n, seeds.numpy())
    scale = float(np.abs(expected).max()) or 1.0
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-5 * scale):
        worst = float(np.abs(got - expected).max()) if got.shape == expected.shape else math.inf
        raise ExportError(
            f"the exported graph's draws differ from PyTorch's (shape {got.shape} vs "
            f"{expected.shape}, largest difference {worst:.3g}); not writing it"
        )


def export_files(model: PosteriorModel) -> tuple[dict[str, bytes], dict]:
    """({model.onnx: bytes}, manifest keys): what both entry points add to a checkpoint."""
    check_exportable(model.method, arch_name(model.arch))
    data = build_graph(model).SerializeToString()
    verify(model, data)
    info = {
        "file": ONNX,
        "opset": OPSET,
        "inputs": {"x": "[B, D] float32", "seeds": "[B] int64", "n": "int64"},
        "output": f"{OUTPUT} [n, B, out] float32",
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }
    return {ONNX: data}, {"onnx": info}


def export_checkpoint(checkpoint: Checkpoint) -> Path:
    """Write model.onnx into a verified checkpoint's folder; returns the file's path."""
    model = checkpoint.manifest.get("model") or {}
    check_exportable(checkpoint.manifest.get("method", "?"), arch_name(model.get("arch") or {}))
    files, manifest = export_files(checkpoint.build("cpu"))
    add_files(checkpoint.path, files, manifest)
    return checkpoint.path / ONNX


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="credence-export",
        description="Write model.onnx (the whole sampler: normalization, seeded dropout, "
        "sample axis, likelihood head) into a checkpoint, for CREDENCE_BACKEND=onnx.",
    )
    parser.add_argument(
        "--model", required=True, help="MODEL_DIR/NAME (its highest version) or .../VERSION"
    )
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(load_model_path(args.model))
    except (CheckpointError, ExportError, OSError) as exc:
        parser.error(str(exc))
    print(f"wrote {path} (opset {OPSET}); serve it with CREDENCE_BACKEND=onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
