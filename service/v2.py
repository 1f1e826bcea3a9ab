"""The Open Inference Protocol (KServe V2) codec: infer bodies in, named output tensors out.

A request carries one input tensor named "input", FP32 or FP64, shape [B, *input_shape],
as JSON `data` (flat or nested, row-major) or as raw little-endian bytes after the JSON
header (Triton's binary tensor data extension: the `Inference-Header-Content-Length` header
says where the JSON ends, the input's `binary_data_size` parameter how many bytes it has).
It decodes to the same `PredictRequest` as the native API, so both go through one batcher.

Request `parameters` (V2 parameters are scalars): `num_samples` (int), `seed` (int),
`credible_levels` (a string: "0.9,0.95" or "[0.9, 0.95]"), `binary_data_output` (bool:
every output as binary). Triton's `timeout` (microseconds) shortens the server's deadline;
its `priority` is accepted and has no effect.

Outputs are the predictive summaries, each a tensor over the request's rows; float outputs
are FP64 (the summaries are computed in float64), `lower` / `upper` are [B, L, outputs], one
row per credible level in the order the response's `credible_levels` parameter lists them;
a checkpoint with OOD reference scores adds `ood_score` (FP64) and `ood` (BOOL) per row.
Errors are `{"error": "..."}`; a request the native API answers 422 is a 400 here, as V2
has it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import orjson

from service.errors import ApiError, Location, Problem, problems_message
from service.gateway import Reply
from service.protocol import (
    DEFAULT_LEVELS,
    LARGEST,
    MAX_LEVELS,
    MAX_PROBLEMS,
    MAX_SEED,
    NUMBERS,
    NUMPY_DTYPES,
    PredictRequest,
    describe,
    load_json,
)
from service.registry import ModelSpec
from training.calibration import method_name
from training.summaries import Summary

INPUT = "input"
TOP_LEVEL = ("id", "parameters", "inputs", "outputs")
TOP_LEVEL_SET = frozenset(TOP_LEVEL)
NO_BYTES = memoryview(b"")
DATA: Location = ("inputs", 0, "data")
PARAMETERS = ("num_samples", "seed", "credible_levels", "binary_data_output", "timeout")
IGNORED_PARAMETERS = frozenset({"priority"})  # Triton's; no meaning here
INPUT_TYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
MODEL_TYPES = {np.float32: "FP32", np.float64: "FP64"}
FIELDS = ("mean", "std", "variance", "epistemic_variance", "aleatoric_variance")
CLASS_FIELDS = (
    "confidence",
    "entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
)
HEADER_LENGTH = b"inference-header-content-length"
CONTENT_ENCODING = b"content-encoding"
WIRE_TYPES = {"FP64": "<f8", "INT64": "<i8", "BOOL": "?"}


def output_tensors(spec: ModelSpec) -> dict[str, tuple[str, list[int]]]:
    """Each output's (datatype, shape) with -1 for the rows (and the credible levels)."""
    return _output_tensors(spec.task, spec.num_outputs, spec.ood is not None)


@cache
def _output_tensors(task: str, k: int, ood: bool) -> dict[str, tuple[str, list[int]]]:
    """`ood`: the checkpoint has in-distribution reference scores (training.ood), so each
    row gets its `ood_score` and `ood` flag."""
    bounds = {"lower": ("FP64", [-1, -1, k]), "upper": ("FP64", [-1, -1, k])}
    flags = {"ood_score": ("FP64", [-1]), "ood": ("BOOL", [-1])} if ood else {}
    if task == "regression":
        return {**{name: ("FP64", [-1, k]) for name in FIELDS}, **bounds, **flags}
    return {
        "probabilities": ("FP64", [-1, k]),
        "predicted_class": ("INT64", [-1]),
        "predicted_label": ("BYTES", [-1]),
        **{name: ("FP64", [-1]) for name in CLASS_FIELDS},
        **bounds,
        **flags,
    }


def model_metadata(spec: ModelSpec, versions: Sequence[int]) -> dict:
    datatype = MODEL_TYPES[NUMPY_DTYPES[spec.dtype]]
    return {
        "name": spec.name,
        "versions": [str(v) for v in versions],
        "platform": f"credence_{spec.method}",
        "inputs": [{"name": INPUT, "datatype": datatype, "shape": [-1, *spec.input_shape]}],
        "outputs": [
            {"name": name, "datatype": datatype, "shape": shape}
            for name, (datatype, shape) in output_tensors(spec).items()
        ],
    }


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request: the protocol-neutral request and how to answer it."""

    request: PredictRequest
    id: str | None
    outputs: tuple[tuple[str, bool], ...]  # (name, as binary)


def error_reply(error: ApiError) -> tuple[int, bytes, Mapping[str, str]]:
    """V2's error body; a 422 (the native API's invalid request) is V2's 400."""
    status = 400 if error.status == 422 else error.status
    return status, orjson.dumps({"error": problems_message(error.problems)}), error.headers


def bad(message: str, location: Location = ()) -> ApiError:
    return ApiError.single(400, "invalid_request", message, location)


def header_length(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The Inference-Header-Content-Length header, if any. A compressed body (tritonclient's
    request_compression_algorithm) is refused by name rather than misread as bad JSON."""
    length = None
    for key, value in headers:
        if key == HEADER_LENGTH:
            length = value
        elif key == CONTENT_ENCODING and value.strip().lower() not in (b"", b"identity"):
            shown = value.decode("latin-1")[:40]
            raise bad(f"Content-Encoding {shown!r} is not supported: send the body uncompressed")
    return length


def split_body(body: bytes, length: bytes | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary data after it."""
    if length is None:
        return body, NO_BYTES
    text = length.decode("latin-1").strip()
    n = int(text) if text.isascii() and text.isdigit() and len(text) <= 19 else -1
    if not 0 <= n <= len(body):
        raise bad(
            f"Inference-Header-Content-Length must be an integer from 0 to the body's "
            f"{len(body)} bytes, got {text[:40]!r}"
        )
    return body[:n], memoryview(body)[n:]


def _keys(data: object) -> int:
    """The keys of an infer header's objects: its own, its parameters, and each tensor's
    and its parameters (service.protocol.load_json counts them against the colons)."""

    def of(item: object) -> int:
        if not isinstance(item, dict):
            return 0
        parameters = item.get("parameters")
        return len(item) + (len(parameters) if isinstance(parameters, dict) else 0)

    count = of(data)
    if isinstance(data, dict):
        for key in ("inputs", "outputs"):
            tensors = data.get(key)
            if isinstance(tensors, list):
                count += sum(of(tensor) for tensor in tensors)
    return count


def decode(body: bytes, length: bytes | None, spec: ModelSpec, max_instances: int) -> InferRequest:
    """Validate an infer body against `spec`; raises ApiError (400) saying what is wrong."""
    header, binary = split_body(body, length)
    data = load_json(header, _keys)
    if not isinstance(data, dict):
        raise bad(f"the body must be a JSON object with {list(TOP_LEVEL)}, got {describe(data)}")
    problems = []
    if not TOP_LEVEL_SET.issuperset(data):
        problems += [
            Problem("unknown_field", f"unknown field {k!r}; a request has {list(TOP_LEVEL)}", (k,))
            for k in data
            if k not in TOP_LEVEL
        ]
    request_id = data.get("id")
    if request_id is not None and not isinstance(request_id, str):
        problems.append(Problem("wrong_type", f"id must be a string, got {describe(request_id)}"))
    parameters = _parameters(data.get("parameters"), spec, problems)
    num_samples, levels, seed, binary_out, timeout_s = parameters
    x = _input(data.get("inputs"), binary, spec, max_instances, problems)
    outputs = _outputs(data.get("outputs"), spec, binary_out, problems)
    if problems or x is None:
        raise ApiError(400, problems[:MAX_PROBLEMS])
    request = PredictRequest(x, spec.draws(num_samples), levels, seed, timeout_s=timeout_s)
    return InferRequest(request, request_id, outputs)


def _parameters(
    value: object, spec: ModelSpec, problems: list[Problem]
) -> tuple[int, tuple[float, ...], int | None, bool, float | None]:
    num_samples, levels, seed, binary = spec.default_num_samples, DEFAULT_LEVELS, None, False
    timeout_s = None
    if value is None:
        return num_samples, levels, seed, binary, timeout_s
    if not isinstance(value, dict):
        problems.append(
            Problem("wrong_type", f"parameters must be an object, got {describe(value)}")
        )
        return num_samples, levels, seed, binary, timeout_s
    for key, item in value.items():
        at = ("parameters", key)
        if key == "num_samples":
            if type(item) is int and 1 <= item <= spec.max_num_samples:
                num_samples = item
            else:
                message = f"an integer from 1 to {spec.max_num_samples} for this model"
                problems.append(Problem("wrong_type", f"num_samples must be {message}", at))
        elif key == "seed":
            if type(item) is int and 0 <= item <= MAX_SEED:
                seed = item
            elif item is not None:
                message = f"seed must be an integer from 0 to {MAX_SEED}, got {describe(item)}"
                problems.append(Problem("wrong_type", message, at))
        elif key == "credible_levels":
            levels = parse_levels(item, problems) or levels
        elif key == "binary_data_output":
            if type(item) is bool:
                binary = item
            else:
                message = f"binary_data_output must be a boolean, got {describe(item)}"
                problems.append(Problem("wrong_type", message, at))
        elif key == "timeout":
            if type(item) is int and item > 0:
                timeout_s = item / 1e6
            else:
                message = f"timeout must be a positive integer (us), got {describe(item)}"
                problems.append(Problem("wrong_type", message, at))
        elif key not in IGNORED_PARAMETERS:
            message = f"unknown parameter {key!r}; allowed: {', '.join(PARAMETERS)}"
            problems.append(Problem("unknown_parameter", message, at))
    return num_samples, levels, seed, binary, timeout_s


def parse_levels(value: object, problems: list[Problem]) -> tuple[float, ...] | None:
    """credible_levels as "0.9,0.95" or "[0.9, 0.95]" (a JSON list is taken too)."""
    items: object = value
    if isinstance(value, str):
        text = value.strip()
        try:
            items = (
                json.loads(text) if text.startswith("[") else [float(t) for t in text.split(",")]
            )
        except ValueError:
            items = None
    ok = (
        isinstance(items, list)
        and 1 <= len(items) <= MAX_LEVELS
        and all(type(level) in NUMBERS and 0 < level < 1 for level in items)
    )
    if not ok:
        message = (
            f"credible_levels must be 1 to {MAX_LEVELS} numbers strictly between 0 and 1, as a "
            f'string "0.9,0.95" or "[0.9, 0.95]"; got {describe(value)}'
        )
        problems.append(Problem("wrong_type", message, ("parameters", "credible_levels")))
        return None
    return tuple(float(level) for level in items)  # type: ignore[union-attr]


def _input(
    value: object,
    binary: memoryview,
    spec: ModelSpec,
    max_instances: int,
    problems: list[Problem],
) -> np.ndarray | None:
    at: Location = ("inputs",)
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        problems.append(
            Problem(
                "wrong_type",
                f'inputs must hold one tensor named "{INPUT}", got {describe(value)}',
                at,
            )
        )
        return None
    tensor: dict = value[0]
    at = ("inputs", 0)
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    before = len(problems)
    if name != INPUT:
        problems.append(
            Problem(
                "unknown_input",
                f'the input is named "{INPUT}", got {describe(name)}',
                (*at, "name"),
            )
        )
    if type(datatype) is not str or datatype not in INPUT_TYPES:
        message = f"datatype must be one of {list(INPUT_TYPES)}, got {describe(datatype)}"
        problems.append(Problem("wrong_type", message, (*at, "datatype")))
    if (
        type(shape) is not list
        or len(shape) != len(spec.input_shape) + 1
        or set(map(type, shape)) != {int}
        or tuple(shape[1:]) != spec.input_shape
        or not 1 <= shape[0] <= max_instances
    ):
        message = (
            f"shape must be [B, {', '.join(map(str, spec.input_shape))}] with 1 <= B <= "
            f"{max_instances}, got {describe(shape) if not isinstance(shape, list) else shape}"
        )
        problems.append(Problem("wrong_shape", message, (*at, "shape")))
    parameters = tensor.get("parameters")
    size = None
    if parameters is not None:
        if not isinstance(parameters, dict):
            problems.append(
                Problem("wrong_type", "input parameters must be an object", (*at, "parameters"))
            )
            return None
        size = parameters.get("binary_data_size")
        unsupported = [k for k in parameters if k != "binary_data_size"]
        if unsupported:
            problems.append(
                Problem(
                    "unknown_parameter",
                    f"unsupported input parameter(s) {unsupported}",
                    (*at, "parameters"),
                )
            )
    if len(problems) > before:
        return None
    count = math.prod(shape)
    if size is None:
        if len(binary):
            problems.append(
                Problem(
                    "invalid_binary",
                    f"{len(binary)} bytes follow the JSON header, but the input has no "
                    "binary_data_size",
                )
            )
            return None
        flat = _json_data(tensor.get("data"), count, problems)
        if flat is None:
            return None
        try:
            wide = np.array(flat, dtype=np.float64)
        except OverflowError:  # integers past the double range
            problems.append(Problem("non_finite", "data holds a number too large", DATA))
            return None
    else:
        if "data" in tensor:
            problems.append(
                Problem(
                    "invalid_binary", "an input with binary_data_size has no data", (*at, "data")
                )
            )
            return None
        expected = count * INPUT_TYPES[datatype].itemsize
        if type(size) is not int or size != expected or len(binary) != expected:
            problems.append(
                Problem(
                    "invalid_binary",
                    f"binary_data_size must be {expected} (shape {shape} of {datatype}) and that "
                    f"many bytes must follow the JSON header; got binary_data_size "
                    f"{describe(size)} and {len(binary)} bytes",
                    (*at, "parameters", "binary_data_size"),
                )
            )
            return None
        wide = np.frombuffer(binary, dtype=INPUT_TYPES[datatype])
    return _checked(wide, shape, spec, problems)


def _json_data(value: object, count: int, problems: list[Problem]) -> list | None:
    """The numbers of `data`, flat or nested, row-major."""
    at = DATA
    if not isinstance(value, list):
        problems.append(
            Problem("wrong_type", f"data must be a list of numbers, got {describe(value)}", at)
        )
        return None
    flat = value
    while flat and type(flat[0]) is list:
        if not all(type(item) is list for item in flat):
            break
        flat = [x for item in flat for x in item]
    if not NUMBERS.issuperset(map(type, flat)):
        bad_item = next(item for item in flat if type(item) not in NUMBERS)
        problems.append(
            Problem("wrong_type", f"data must hold numbers only, got {describe(bad_item)}", at)
        )
        return None
    if len(flat) != count:
        problems.append(
            Problem("wrong_shape", f"data holds {len(flat)} numbers; its shape needs {count}", at)
        )
        return None
    return flat


def _checked(
    wide: np.ndarray, shape: list[int], spec: ModelSpec, problems: list[Problem]
) -> np.ndarray | None:
    """The inputs in the model's dtype; NaN, infinities and values past its range refused."""
    # all finite and in range (NaN compares false), checked in one pass
    if not np.abs(wide).max() <= LARGEST[spec.dtype]:
        index = int(np.flatnonzero(~(np.abs(wide) <= LARGEST[spec.dtype]))[0])
        message = (
            f"element {index} of the input ({wide[index].item()!r}) is not a finite number in "
            f"the range of {spec.dtype}"
        )
        problems.append(Problem("non_finite", message, DATA))
        return None
    return wide.astype(NUMPY_DTYPES[spec.dtype]).reshape(shape)


def _outputs(
    value: object, spec: ModelSpec, binary: bool, problems: list[Problem]
) -> tuple[tuple[str, bool], ...]:
    known = output_tensors(spec)
    if value is None:
        return _every_output(spec.task, spec.num_outputs, spec.ood is not None, binary)
    if not isinstance(value, list) or not value:
        problems.append(
            Problem(
                "wrong_type",
                f"outputs must be a list of output requests, got {describe(value)}",
                ("outputs",),
            )
        )
        return ()
    chosen: list[tuple[str, bool]] = []
    for i, item in enumerate(value):
        at: Location = ("outputs", i)
        name = item.get("name") if isinstance(item, dict) else None
        if type(name) is not str or name not in known:
            message = f"unknown output {describe(name)}; this model's outputs are {list(known)}"
            problems.append(Problem("unknown_output", message, (*at, "name")))
            continue
        if any(name == seen for seen, _ in chosen):
            problems.append(Problem("duplicate_output", f"output {name!r} is asked for twice", at))
            continue
        parameters = item.get("parameters") or {}
        as_binary = parameters.get("binary_data", binary) if isinstance(parameters, dict) else None
        others = (
            [k for k in parameters if k != "binary_data"] if isinstance(parameters, dict) else []
        )
        if type(as_binary) is not bool or others:
            message = "output parameters take binary_data (a boolean) only"
            problems.append(Problem("unknown_parameter", message, (*at, "parameters")))
            continue
        chosen.append((name, as_binary))
    return tuple(chosen)


@cache
def _every_output(task: str, k: int, ood: bool, binary: bool) -> tuple[tuple[str, bool], ...]:
    return tuple((name, binary) for name in _output_tensors(task, k, ood))


class Columns:
    """A group's summaries, made once per group: numpy arrays [B, ...] for binary outputs
    and, for JSON ones, each row's flat list of numbers (one `tolist` per field per group,
    made when a request first asks for the field). Sliced by rows, it gives a `Part`."""

    def __init__(self, spec: ModelSpec, summary: Summary, levels: tuple[float, ...]):
        tensors = {k: v for k, v in summary.items() if k not in ("lower", "upper")}
        tensors["lower"] = summary["lower"].transpose(0, 1)  # [L, B, k] -> [B, L, k]
        tensors["upper"] = summary["upper"].transpose(0, 1)
        self.arrays = {k: np.ascontiguousarray(v.numpy()) for k, v in tensors.items()}
        if "predicted_class" in self.arrays:
            labels = np.array(spec.output_names, dtype=object)
            self.arrays["predicted_label"] = labels[self.arrays["predicted_class"]]
        self.lists: dict[str, list[list]] = {}
        self.json_only: dict[tuple[tuple[str, bool], ...], list[tuple]] = {}
        self.tensors = output_tensors(spec)
        self.parameters: dict[str, object] = {
            "credible_levels": ",".join(map(repr, levels)),
            **({"calibration": name} if (name := method_name(spec.calibration)) else {}),
        }

    def rows(self, name: str) -> list[list]:
        found = self.lists.get(name)
        if found is None:
            array = self.arrays[name]
            found = self.lists[name] = array.reshape(len(array), -1).tolist()
        return found

    def one_row_json(self, outputs: tuple[tuple[str, bool], ...]) -> list[tuple]:
        """(name, datatype, shape, rows) of each output, for one-row requests that ask for
        them all as JSON: the common request, answered without a branch per output."""
        found = self.json_only.get(outputs)
        if found is None:
            found = self.json_only[outputs] = [
                (name, self.tensors[name][0], [1, *self.arrays[name].shape[1:]], self.rows(name))
                for name, _ in outputs
            ]
        return found

    def __getitem__(self, rows: slice) -> Part:
        return Part(self, rows.start, rows.stop)


@dataclass(frozen=True)
class Part:
    """One request's rows [start, stop) of its group's Columns."""

    columns: Columns
    start: int
    stop: int

    def data(self, name: str) -> list:
        """Output `name`'s numbers over these rows, flat and row-major."""
        rows = self.columns.rows(name)
        if self.stop - self.start == 1:
            return rows[self.start]
        return [x for row in rows[self.start : self.stop] for x in row]


def columns(spec: ModelSpec, summary: Summary, levels: tuple[float, ...]) -> Columns:
    return Columns(spec, summary, levels)


def render(spec: ModelSpec, infer: InferRequest, seed: int, part: Part) -> bytes | Reply:
    """One request's response: JSON, or JSON then binary tensors when any output is binary."""
    group = part.columns
    outputs: list[dict[str, object]] = []
    chunks: list[bytes] = []
    if part.stop - part.start == 1 and not any(binary for _, binary in infer.outputs):
        i = part.start
        outputs = [
            {"name": name, "datatype": datatype, "shape": shape, "data": rows[i]}
            for name, datatype, shape, rows in group.one_row_json(infer.outputs)
        ]
    else:
        _tensors(group, part, infer.outputs, outputs, chunks)
    response: dict[str, object] = {
        "model_name": spec.name,
        "model_version": str(spec.version),
        "parameters": {"num_samples": infer.request.num_samples, "seed": seed, **group.parameters},
        "outputs": outputs,
    }
    if infer.id is not None:
        response["id"] = infer.id
    header = orjson.dumps(response)
    if not chunks:
        return header
    length = str(len(header))
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": length,
    }
    return Reply(b"".join([header, *chunks]), headers)


def _tensors(
    group: Columns,
    part: Part,
    chosen: tuple[tuple[str, bool], ...],
    outputs: list[dict[str, object]],
    chunks: list[bytes],
) -> None:
    """The output tensors of `part`, binary ones' bytes appended to `chunks` in order."""
    for name, as_binary in chosen:
        datatype = group.tensors[name][0]
        array = group.arrays[name]
        shape = [part.stop - part.start, *array.shape[1:]]
        tensor: dict[str, object] = {"name": name, "datatype": datatype, "shape": shape}
        if as_binary:
            raw = _binary(array[part.start : part.stop], datatype)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = part.data(name)
        outputs.append(tensor)


def _binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":  # each element: its length as 4 little-endian bytes, then it
        encoded = [str(item).encode() for item in array.ravel()]
        return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    return np.ascontiguousarray(array, dtype=WIRE_TYPES[datatype]).tobytes()
