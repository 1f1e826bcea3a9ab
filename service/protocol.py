"""Predict requests in, predictions out.

A body is parsed and checked against the model's spec before anything is queued, so no
client input reaches the model that it cannot take, and every problem is reported with
where it is (`["instances", 3, 1]`, `["parameters", "seed"]`). Responses are rendered
straight from the summary tensors with orjson; each prediction holds lists over the
model's outputs (targets or classes), even when there is one output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import orjson
import torch
from safetensors.numpy import save as save_safetensors

from service import images
from service.errors import ApiError, Location, Problem
from service.gateway import Reply
from service.registry import ModelSpec
from training import attributions
from training.attributions import Explain
from training.calibration import method_name
from training.summaries import Summary

NUMBERS = frozenset({int, float})  # exact types: bool is an int subclass and is refused
TOP_LEVEL = ("instances", "parameters")
PARAMETERS = {  # by route verb: :sample returns draws, not intervals
    "predict": ("num_samples", "credible_levels", "seed", "timeout_ms"),
    "sample": ("num_samples", "seed", "timeout_ms"),
    "acquire": ("num_samples", "seed", "k", "acquisition", "timeout_ms"),
    "explain": (
        "num_samples",
        "credible_levels",
        "seed",
        "method",
        "steps",
        "quantity",
        "outputs",
        "timeout_ms",
    ),
}
# per-draw attributions one :explain request may ask for (draws x instances x outputs x
# input elements): 64 MiB of float32, a few times that in the response
MAX_ATTRIBUTIONS = 1 << 24
# what :acquire ranks a pool by, per task (the first is the default): BALD is the mutual
# information between a point's label and the weights (Houlsby et al. 2011); a regression
# model's counterpart is its epistemic variance (summed over targets)
ACQUISITIONS = {
    "classification": ("bald", "max_entropy", "variation_ratios"),
    "regression": ("epistemic_variance",),
}
ACQUISITION_FIELDS = {
    "bald": "mutual_information",
    "max_entropy": "entropy",
    "variation_ratios": "variation_ratio",
    "epistemic_variance": "epistemic_variance",
}
OCTET_STREAM = "application/octet-stream"
DEFAULT_LEVELS = (0.95,)
MAX_LEVELS = 16
MAX_SEED = 2**63 - 1
MAX_PROBLEMS = 20
REGRESSION_FIELDS = ("mean", "std", "variance", "epistemic_variance", "aleatoric_variance")
_MISSING = object()
NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
LARGEST = {dtype: float(np.finfo(numpy).max) for dtype, numpy in NUMPY_DTYPES.items()}


@dataclass(frozen=True)
class PredictRequest:
    """A validated request: inputs [B, *input_shape] in the model's dtype, as a numpy array
    (the batch makes one tensor of its requests' arrays: a tensor per request cost more)."""

    x: np.ndarray
    num_samples: int
    levels: tuple[float, ...] | None  # None: the draws themselves (:sample)
    seed: int | None
    k: int = 0  # :acquire: how many of the pool to return, by `acquisition`
    acquisition: str | None = None
    explain: Explain | None = None  # :explain: what to attribute (training.attributions)
    timeout_s: float | None = None  # the client's deadline, if it set one (it only shortens)


class _DuplicateKey(Exception):
    """A JSON object names one key twice (which value is meant is anyone's guess)."""


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    found: dict[str, object] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


def _duplicate(key: str) -> ApiError:
    message = f"the key {key!r} appears twice in one JSON object: which value is meant?"
    return ApiError.single(422, "duplicate_key", message)


def load_json(body: bytes, count_keys: Callable[[object], int] | None = None) -> object:
    """orjson first; the stdlib parser second, because orjson refuses NaN and Infinity
    tokens (and numbers past the double range) as syntax errors, while they deserve a 422
    that names the instance and feature that holds them.

    orjson keeps the last of repeated keys without a word. Every key in a JSON text is
    followed by a colon, and only a string can hold another, so when the body's colons
    outnumber the keys `count_keys` finds in what was parsed (a repeat, a colon in a
    string, or an object it does not look into), the body is read again by a parser that
    refuses repeats: one byte count on the usual body."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        error = exc
    else:
        if count_keys is not None and body.count(b":") != count_keys(data):
            try:
                json.loads(body, object_pairs_hook=_unique)
            except _DuplicateKey as duplicate:
                raise _duplicate(duplicate.args[0]) from None
        return data
    try:
        return json.loads(body, object_pairs_hook=_unique)
    except _DuplicateKey as duplicate:
        raise _duplicate(duplicate.args[0]) from None
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        raise ApiError.single(
            400, "invalid_json", f"request body is not valid JSON: {error}"
        ) from None


def _native_keys(data: object) -> int:
    """The keys of a native body's top object, its parameters and rows keyed by name."""
    if not isinstance(data, dict):
        return 0
    count = len(data)
    parameters, instances = data.get("parameters"), data.get("instances")
    if isinstance(parameters, dict):
        count += len(parameters)
    if isinstance(instances, list) and instances and isinstance(instances[0], dict):
        count += sum(len(row) for row in instances if isinstance(row, dict))
    return count


def describe(value: object) -> str:
    """How a JSON value is named in error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {json.dumps(shown)}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return f"the number {value!r}"


def where(location: Location) -> str:
    """["instances", 2, "x1"] -> 'instances[2]["x1"]'."""
    text = str(location[0]) if location else "body"
    for part in location[1:]:
        text += f"[{part}]" if isinstance(part, int) else f"[{json.dumps(part)}]"
    return text


def check_content_type(value: str | None) -> None:
    """A body declared as anything but JSON is a 415 (none declared is read as JSON)."""
    if value is None or value == "application/json":  # what clients send, checked first
        return
    media = value.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return
    message = (
        f"Content-Type must be application/json, got {value!r} (curl -d sends "
        "application/x-www-form-urlencoded unless given -H 'Content-Type: application/json')"
    )
    raise ApiError.single(415, "unsupported_media_type", message, ("headers", "content-type"))


def parse_predict(
    body: bytes, spec: ModelSpec, max_instances: int, verb: str = "predict"
) -> PredictRequest:
    """Validate the body of a :predict, :sample, :acquire or :explain request (`verb`)
    against `spec`; raises ApiError (400 / 422) listing problems."""
    data = load_json(body, _native_keys)
    if not isinstance(data, dict):
        raise ApiError.single(
            422,
            "invalid_body",
            'the body must be a JSON object {"instances": [...], "parameters": {...}}, '
            f"got {describe(data)}",
        )
    problems: list[Problem] = [
        Problem("unknown_field", f"unknown field {key!r}; a request has {list(TOP_LEVEL)}", (key,))
        for key in data
        if key not in TOP_LEVEL
    ]
    parameters = data.get("parameters")
    num_samples, levels, seed = _parameters(parameters, spec, problems, PARAMETERS[verb])
    x = _instances(data.get("instances", _MISSING), spec, max_instances, problems)
    k, acquisition = 0, None
    if verb == "acquire" and x is not None:
        k, acquisition = _acquisition(parameters, spec, len(x), problems)
    explain = None
    if verb == "explain" and x is not None:
        explain = _explain(parameters, spec, problems)
        _check_attribution_size(spec.draws(num_samples), x, explain, problems)
    timeout_s = _timeout(parameters, problems)
    if problems or x is None:
        raise ApiError(422, problems[:MAX_PROBLEMS])
    levels = None if verb == "sample" else levels
    n = spec.draws(num_samples)
    return PredictRequest(x, n, levels, seed, k, acquisition, explain, timeout_s)


def _explain(parameters: object, spec: ModelSpec, problems: list[Problem]) -> Explain:
    """:explain's method, steps (integrated gradients only), quantity and outputs (names or
    indices of targets or classes; default all), each checked where it is."""
    values = parameters if isinstance(parameters, dict) else {}
    if spec.manifest.get("forecast", {}).get("relative"):
        message = (
            "this model forecasts changes from each window's last value, which :explain does "
            "not attribute; explain a forecaster trained with --no-relative"
        )
        problems.append(Problem("unsupported", message, ("instances",)))
    method = values.get("method", attributions.METHODS[0])
    if method not in attributions.METHODS:
        message = f"method must be one of {', '.join(attributions.METHODS)}, got {describe(method)}"
        problems.append(Problem("invalid_value", message, ("parameters", "method")))
        method = attributions.METHODS[0]
    steps = attributions.DEFAULT_STEPS if method == "integrated_gradients" else 1
    if "steps" in values and method != "integrated_gradients":
        message = f"steps applies to integrated_gradients; {method} takes one gradient"
        problems.append(Problem("unknown_parameter", message, ("parameters", "steps")))
    elif "steps" in values:
        allowed = "an integer from 1 to {high}, the points on the path from the baseline"
        steps = (
            _integer(values, "steps", 1, attributions.MAX_STEPS, allowed, problems)
            or attributions.DEFAULT_STEPS
        )
    choices = attributions.QUANTITIES[spec.task]
    quantity = values.get("quantity", choices[0])
    if quantity not in choices:
        message = (
            f"quantity must be one of {', '.join(choices)} for a {spec.task} model, "
            f"got {describe(quantity)}"
        )
        problems.append(Problem("invalid_value", message, ("parameters", "quantity")))
        quantity = choices[0]
    outputs = _outputs(values.get("outputs"), spec, problems)
    return attributions.Explain(method, steps, quantity, outputs)


def _outputs(value: object, spec: ModelSpec, problems: list[Problem]) -> tuple[int, ...]:
    """The outputs to explain, as indices: every output when absent."""
    names, location = spec.output_names, ("parameters", "outputs")
    if value is None:
        return tuple(range(len(names)))
    if not isinstance(value, list) or not value:
        message = (
            f"outputs must be a non-empty list of output names {list(names)} or indices "
            f"from 0 to {len(names) - 1}, got {describe(value)}"
        )
        problems.append(Problem("wrong_type", message, location))
        return (0,)
    chosen: list[int] = []
    for i, item in enumerate(value):
        index = names.index(item) if isinstance(item, str) and item in names else None
        if type(item) is int and 0 <= item < len(names):
            index = item
        if index is None:
            message = (
                f"outputs[{i}] must be one of {list(names)} or an index from 0 to "
                f"{len(names) - 1}, got {describe(item)}"
            )
            problems.append(Problem("invalid_value", message, (*location, i)))
        elif index in chosen:
            message = f"outputs[{i}] names output {names[index]!r} again"
            problems.append(Problem("duplicate_output", message, (*location, i)))
        else:
            chosen.append(index)
    return tuple(chosen) or (0,)


def _check_attribution_size(
    n: int, x: np.ndarray, explain: Explain, problems: list[Problem]
) -> None:
    """Refuse a request whose per-draw attributions would not fit MAX_ATTRIBUTIONS."""
    size = n * x.shape[0] * len(explain.outputs) * math.prod(x.shape[1:])
    if size > MAX_ATTRIBUTIONS:
        message = (
            f"{n} draws x {x.shape[0]} instances x {len(explain.outputs)} outputs x "
            f"{math.prod(x.shape[1:])} input elements are {size} attributions; this server "
            f"computes at most {MAX_ATTRIBUTIONS} per request: send fewer instances, "
            "outputs or num_samples"
        )
        problems.append(Problem("too_large", message, ("instances",)))


def _timeout(parameters: object, problems: list[Problem]) -> float | None:
    """parameters.timeout_ms in seconds, or None when absent."""
    value = parameters.get("timeout_ms") if isinstance(parameters, dict) else None
    if value is None:
        return None
    if type(value) in NUMBERS and math.isfinite(value) and value > 0:
        return value / 1000
    message = f"timeout_ms must be a positive number of milliseconds, got {describe(value)}"
    problems.append(Problem("wrong_type", message, ("parameters", "timeout_ms")))
    return None


def _acquisition(
    parameters: object, spec: ModelSpec, pool: int, problems: list[Problem]
) -> tuple[int, str]:
    """:acquire's k (default 1, at most the pool) and acquisition (default the task's first)."""
    values = parameters if isinstance(parameters, dict) else {}
    allowed = "an integer from 1 to {high}, the number of instances"
    k = _integer(values, "k", 1, pool, allowed, problems) or 1
    choices = ACQUISITIONS[spec.task]
    acquisition = values.get("acquisition", choices[0])
    if acquisition not in choices:
        message = (
            f"acquisition must be one of {', '.join(choices)} for a {spec.task} model, "
            f"got {describe(acquisition)}"
        )
        problems.append(Problem("invalid_value", message, ("parameters", "acquisition")))
        acquisition = choices[0]
    return k, acquisition


def _integer(
    parameters: dict, key: str, low: int, high: int, allowed: str, problems: list[Problem]
) -> int | None:
    """parameters[key] when it is an integer in [low, high]; None when absent or refused
    (a refusal is added to `problems`, saying what is `allowed`: formatted with `high`, only
    then)."""
    value = parameters.get(key)
    if value is None:
        return None
    if type(value) is int and low <= value <= high:
        return value
    code = "out_of_range" if type(value) is int else "wrong_type"
    message = f"{key} must be {allowed.format(high=high)}, got {describe(value)}"
    problems.append(Problem(code, message, ("parameters", key)))
    return None


def _parameters(
    value: object, spec: ModelSpec, problems: list[Problem], allowed: Sequence[str]
) -> tuple[int, tuple[float, ...], int | None]:
    num_samples, levels, seed = spec.default_num_samples, DEFAULT_LEVELS, None
    if value is None:
        return num_samples, levels, seed
    if not isinstance(value, dict):
        problems.append(
            Problem("wrong_type", f'"parameters" must be an object, got {describe(value)}', ())
        )
        return num_samples, levels, seed
    for key in value:
        if key not in allowed:
            problems.append(
                Problem(
                    "unknown_parameter",
                    f"unknown parameter {key!r}; allowed: {', '.join(allowed)}",
                    ("parameters", key),
                )
            )
    allowed = "an integer from 1 to {high} for this model"
    most = spec.max_num_samples
    num_samples = _integer(value, "num_samples", 1, most, allowed, problems) or num_samples
    raw_levels = value.get("credible_levels")
    if raw_levels is not None:
        levels = _levels(raw_levels, problems) or levels
    allowed = "an integer from 0 to 2**63 - 1 ({high}) or null"
    seed = _integer(value, "seed", 0, MAX_SEED, allowed, problems)
    return num_samples, levels, seed


def _levels(value: object, problems: list[Problem]) -> tuple[float, ...] | None:
    location: Location = ("parameters", "credible_levels")
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LEVELS:
        problems.append(
            Problem(
                "wrong_type",
                f"credible_levels must be a list of 1 to {MAX_LEVELS} numbers strictly between "
                f"0 and 1, got {describe(value)}",
                location,
            )
        )
        return None
    ok = True
    for i, level in enumerate(value):
        if type(level) not in NUMBERS or not 0 < level < 1:
            ok = False
            problems.append(
                Problem(
                    "out_of_range" if type(level) in NUMBERS else "wrong_type",
                    f"credible_levels[{i}] must be a number strictly between 0 and 1, "
                    f"got {describe(level)}",
                    (*location, i),
                )
            )
    return tuple(float(level) for level in value) if ok else None


def _instances(
    value: object, spec: ModelSpec, max_instances: int, problems: list[Problem]
) -> np.ndarray | None:
    location: Location = ("instances",)
    if value is _MISSING:
        shape = list(spec.input_shape)
        row_hint = (
            f"a list of {shape[0]} numbers" if len(shape) == 1 else f"nested lists of shape {shape}"
        )
        if spec.feature_names:
            row_hint += f" or an object keyed by {list(spec.feature_names)}"
        if images.takes_images(spec.input_shape):
            row_hint += ' or {"b64": "<base64 PNG or JPEG>"}'

        problems.append(
            Problem(
                "missing_field",
                f'"instances" is required: a list of rows, each {row_hint}',
                location,
            )
        )
        return None
    if not isinstance(value, list):
        problems.append(
            Problem(
                "wrong_type", f'"instances" must be a list of rows, got {describe(value)}', location
            )
        )
        return None
    if not value:
        problems.append(
            Problem("empty_instances", '"instances" is empty: send at least one row', location)
        )
        return None
    if len(value) > max_instances:
        problems.append(
            Problem(
                "too_many_instances",
                f'"instances" has {len(value)} rows; this server takes at most {max_instances} '
                "per request",
                location,
            )
        )
        return None
    # `flat` stays aligned with the rows (placeholders stand in for what could not be read)
    # so that NaN and infinities are reported along with every other problem
    flat: list[int | float] = []
    keyed: set[int] = set()
    for i, row in enumerate(value):
        if len(problems) >= MAX_PROBLEMS:
            return None
        if isinstance(row, dict) and "b64" in row and images.takes_images(spec.input_shape):
            flat.extend(_image(row, spec, (*location, i), problems))
            continue
        if images.takes_images(spec.input_shape) and _is_plane(row, spec.input_shape):
            row = [row]  # [H, W] for a one-channel model
        if isinstance(row, dict):
            row = _from_keyed(row, spec, (*location, i), problems)
            if row is None:
                flat.extend([0.0] * math.prod(spec.input_shape))
                continue
            keyed.add(i)
        names = spec.feature_names if i in keyed else None
        _collect(row, spec.input_shape, 0, (*location, i), flat, problems, names)
    return _to_array(flat, len(value), spec, keyed, problems)


def _is_plane(row: object, shape: tuple[int, ...]) -> bool:
    """Whether a row is one [H, W] plane where the model takes [1, H, W]."""
    return (
        shape[0] == 1
        and shape[1] != 1
        and type(row) is list
        and len(row) == shape[1]
        and type(row[0]) is list
        and len(row[0]) == shape[2]
    )


def _image(row: dict, spec: ModelSpec, location: Location, problems: list[Problem]) -> list:
    """The pixels of a {"b64": ...} instance, or zeros and a problem naming it."""
    at = (*location, "b64")
    if len(row) > 1:
        extra = sorted(set(row) - {"b64"})
        problems.append(Problem("unknown_field", f"{where(location)} has {extra} beside b64", at))
    else:
        try:
            return images.decode(row["b64"], spec.input_shape).ravel().tolist()
        except images.ImageError as exc:
            problems.append(Problem("bad_image", f"{where(at)}: {exc}", at))
    return [0.0] * math.prod(spec.input_shape)


def _from_keyed(
    row: dict, spec: ModelSpec, location: Location, problems: list[Problem]
) -> list | None:
    names = spec.feature_names
    if not names:
        problems.append(
            Problem(
                "wrong_type",
                f"{where(location)} is an object, but this model has no feature names: "
                f"send a list of {spec.input_shape[0]} numbers",
                location,
            )
        )
        return None
    missing = [name for name in names if name not in row]
    unknown = [key for key in row if key not in names]
    if missing:
        problems.append(
            Problem("missing_feature", f"{where(location)} lacks feature(s) {missing}", location)
        )
    if unknown:
        problems.append(
            Problem(
                "unknown_feature",
                f"{where(location)} has unknown feature(s) {unknown}; the model's features are "
                f"{list(names)}",
                location,
            )
        )
    return None if missing or unknown else [row[name] for name in names]


def _collect(
    value: object,
    shape: Sequence[int],
    depth: int,
    location: Location,
    flat: list,
    problems: list[Problem],
    names: Sequence[str] | None,
) -> None:
    """Append the numbers of one (sub)row to `flat`, or record why it cannot be read."""
    size = shape[depth]
    leaf = depth == len(shape) - 1
    if type(value) is not list or len(value) != size:
        got = describe(value) if type(value) is not list else f"{len(value)} values"
        what = f"{size} numbers" if leaf else f"{size} lists"
        problems.append(
            Problem(
                "wrong_shape",
                f"{where(location)} must hold {what} (input shape {list(shape)}), got {got}",
                location,
            )
        )
        flat.extend([0.0] * math.prod(shape[depth:]))
        return
    if not leaf:
        for j, sub in enumerate(value):
            _collect(sub, shape, depth + 1, (*location, j), flat, problems, names)
        return
    if NUMBERS.issuperset(map(type, value)):
        flat.extend(value)
        return
    for j, item in enumerate(value):
        if type(item) in NUMBERS:
            flat.append(item)
        else:
            at = (*location, names[j] if names else j)
            problems.append(
                Problem("wrong_type", f"{where(at)} must be a number, got {describe(item)}", at)
            )
            flat.append(0.0)


def _to_array(
    flat: list, rows: int, spec: ModelSpec, keyed: set[int], problems: list[Problem]
) -> np.ndarray | None:
    """The inputs in the model's dtype; NaN, infinities and values past its range refused."""
    shape = spec.input_shape
    dtype = NUMPY_DTYPES[spec.dtype]
    try:
        wide = np.array(flat, dtype=np.float64)  # numpy: a fraction of torch's per-call cost
    except (OverflowError, RuntimeError, TypeError) as exc:  # integers past the float range
        wide, error = None, exc
    # the common case: all finite and in range (NaN compares false), checked in one pass
    if wide is not None and not problems and np.abs(wide).max() <= LARGEST[spec.dtype]:
        return wide.astype(dtype).reshape(rows, *shape)
    per_row = math.prod(shape)

    def location(index: int) -> Location:
        row, rest = divmod(index, per_row)
        parts = []
        for size in reversed(shape):
            rest, part = divmod(rest, size)
            parts.append(part)
        parts.reverse()
        if row in keyed and spec.feature_names:
            return ("instances", row, spec.feature_names[parts[0]])
        return ("instances", row, *parts)

    if wide is None:
        huge = [index for index, item in enumerate(flat) if abs(item) > 1e308]
        if not huge:
            raise error
        for index in huge[:MAX_PROBLEMS]:
            at = location(index)
            problems.append(Problem("non_finite", f"{where(at)} is too large to be a number", at))
        return None
    with np.errstate(over="ignore"):  # past the dtype's range becomes inf, refused below
        narrow = wide.astype(dtype)
    bad = np.flatnonzero(~np.isfinite(narrow)).tolist()
    for index in bad[: max(MAX_PROBLEMS - len(problems), 0)]:
        at, item = location(index), wide[index].item()
        if math.isnan(item):
            message = f"{where(at)} is NaN; inputs must be finite numbers"
        elif math.isinf(item):
            message = f"{where(at)} is {'-' if item < 0 else ''}Infinity; inputs must be finite"
        else:
            message = f"{where(at)} = {item!r} is outside the range of {spec.dtype}"
        problems.append(Problem("non_finite", message, at))
    return None if bad or problems else narrow.reshape(rows, *shape)


def predictions(spec: ModelSpec, summary: Summary, levels: Sequence[float]) -> list[dict]:
    """One prediction object per row of a batch's summaries.

    Built for all the rows of a batch at once (one `tolist` per field, not one per request
    and field): each request then takes its slice of plain Python objects.
    """
    if "ood" in summary:  # service.workers.summarize_batch added the flags
        ood: tuple[list, list] = (summary["ood_score"].tolist(), summary["ood"].tolist())
    else:  # a checkpoint without in-distribution reference scores
        rows = summary["mean" if spec.task == "regression" else "probabilities"].shape[0]
        ood = ([None] * rows, [None] * rows)
    if spec.task == "regression":
        return _regression(summary, levels, method_name(spec.calibration), ood)
    return _classification(summary, levels, spec.output_names, ood)


def render(spec: ModelSpec, num_samples: int, seed: int, predictions: list[dict]) -> bytes:
    """The response body of one request, from its rows of `predictions`."""
    return orjson.dumps(
        {
            "model_name": spec.name,
            "model_version": spec.version,
            "num_samples": num_samples,
            "seed": seed,
            "predictions": predictions,
        }
    )


def draw_rows(draws: Summary) -> list[dict]:
    """One object per row of a batch's `training.summaries.per_draw` fields, [n][outputs]
    lists each (one `tolist` per field for the whole batch)."""
    columns = {key: value.tolist() for key, value in draws.items()}
    rows = zip(*columns.values(), strict=True)
    return [dict(zip(columns, values, strict=True)) for values in rows]


def render_draws(spec: ModelSpec, num_samples: int, seed: int, rows: list[dict]) -> bytes:
    """A :sample response: each field draw-major, [n][instances][outputs], so that draw s
    is one joint posterior sample of the request's instances."""
    fields = {
        key: [list(s) for s in zip(*(row[key] for row in rows), strict=True)] for key in rows[0]
    }
    return orjson.dumps(
        {
            "model_name": spec.name,
            "model_version": spec.version,
            "num_samples": num_samples,
            "seed": seed,
            "outputs": list(spec.output_names),
            "draws": fields,
        }
    )


def render_acquired(
    spec: ModelSpec, num_samples: int, seed: int, acquisition: str, k: int, rows: list[dict]
) -> bytes:
    """An :acquire response: the k instances of the pool that score highest (ties: the
    earlier first), by index, with their scores."""
    field = ACQUISITION_FIELDS[acquisition]
    scores = [math.fsum(v) if isinstance(v := row[field], list) else v for row in rows]
    best = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    return orjson.dumps(
        {
            "model_name": spec.name,
            "model_version": spec.version,
            "num_samples": num_samples,
            "seed": seed,
            "acquisition": acquisition,
            "indices": best,
            "scores": [scores[i] for i in best],
        }
    )


def render_draws_binary(spec: ModelSpec, num_samples: int, seed: int, rows: list[dict]) -> Reply:
    """A :sample response as safetensors bytes (`Accept: application/octet-stream`): each
    field a float64 tensor [n, instances, outputs], the response's other keys as metadata;
    `safetensors.numpy.load(body)` reads it, with no JSON of n x B numbers either way."""
    tensors = {
        key: np.ascontiguousarray(np.asarray([row[key] for row in rows]).transpose(1, 0, 2))
        for key in rows[0]
    }
    metadata = {
        "model_name": spec.name,
        "model_version": str(spec.version),
        "num_samples": str(num_samples),
        "seed": str(seed),
        "outputs": orjson.dumps(list(spec.output_names)).decode(),
    }
    headers = {"content-type": OCTET_STREAM, "credence-format": "safetensors"}
    return Reply(save_safetensors(tensors, metadata=metadata), headers)


def wants_binary(accept: str | None) -> bool:
    """Whether an Accept header asks for :sample's binary draws."""
    return accept is not None and OCTET_STREAM in accept


def _intervals(summary: Summary, levels: Sequence[float]) -> list[list[dict]]:
    lower = summary["lower"].transpose(0, 1).tolist()  # [B][L][outputs]
    upper = summary["upper"].transpose(0, 1).tolist()
    return [
        [{"level": level, "lower": lo[j], "upper": hi[j]} for j, level in enumerate(levels)]
        for lo, hi in zip(lower, upper, strict=True)
    ]


def _regression(
    summary: Summary, levels: Sequence[float], calibration: str | None, ood: tuple[list, list]
) -> list[dict]:
    """Each prediction names the calibration its numbers carry (null: the raw model's)."""
    columns = [summary[key].tolist() for key in REGRESSION_FIELDS]
    intervals = _intervals(summary, levels)
    return [
        {
            **dict(zip(REGRESSION_FIELDS, values, strict=True)),
            "intervals": row_intervals,
            "calibration": calibration,
            "ood_score": score,
            "ood": flag,
        }
        for *values, row_intervals, score, flag in zip(*columns, intervals, *ood, strict=True)
    ]


def _classification(
    summary: Summary, levels: Sequence[float], labels: Sequence[str], ood: tuple[list, list]
) -> list[dict]:
    probabilities = summary["probabilities"].tolist()
    predicted = summary["predicted_class"].tolist()
    confidence = summary["confidence"].tolist()
    entropy = summary["entropy"].tolist()
    expected = summary["expected_entropy"].tolist()
    mutual = summary["mutual_information"].tolist()
    variation = summary["variation_ratio"].tolist()
    intervals = _intervals(summary, levels)
    scores, flags = ood
    return [
        {
            "probabilities": probabilities[i],
            "predicted_class": labels[predicted[i]],
            "confidence": confidence[i],
            "entropy": entropy[i],
            "expected_entropy": expected[i],
            "mutual_information": mutual[i],
            "variation_ratio": variation[i],
            "intervals": intervals[i],
            "ood_score": scores[i],
            "ood": flags[i],
        }
        for i in range(len(probabilities))
    ]
