"""Server configuration from CREDENCE_* environment variables; `credence-serve` flags win.

Number of posterior samples per request, first match wins:
    the request's `parameters.num_samples`
    > the model manifest's `num_samples.default`
    > `default_num_samples` here.
The largest number a request may ask for is the smaller of the manifest's `num_samples.max`
and `max_num_samples` here (a hard server cap); a default above that cap is lowered to it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.auth import keys_of

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
Backend = Literal["torch", "onnx"]
Precision = Literal["float32", "bfloat16", "float16"]


class Settings(BaseSettings):
    """Everything `credence-serve` can be told; each field is also CREDENCE_<FIELD>."""

    model_config = SettingsConfigDict(
        env_prefix="CREDENCE_", extra="ignore", protected_namespaces=()
    )

    model_dir: Path = Path("models")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda[:i]")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch_rows: int = Field(256, ge=1, description="rows per model call")
    max_batch_delay_ms: float = Field(
        0.0, ge=0, le=10_000, description="extra wait for more rows; 0 takes what is queued"
    )
    default_num_samples: int = Field(100, ge=1, description="when the manifest gives none")
    max_num_samples: int = Field(1000, ge=1, description="hard cap over every model")
    max_instances: int = Field(1024, ge=1, description="rows in one request")
    max_body_bytes: int = Field(
        64 * 2**20, ge=1, description="a predict body past this is a 413, refused unread"
    )
    max_queue: int = Field(256, ge=1, description="requests waiting per model version")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline; past it, 504")
    shutdown_grace_s: float = Field(
        30.0, gt=0, description="after SIGTERM: how long queued and in-flight requests may take"
    )
    torch_threads: int = Field(
        0, ge=0, description="intra-op threads; 0: 1 (a large model runs a batch per core)"
    )
    batch_workers: Literal["auto"] | Annotated[int, Field(ge=0, le=64)] = Field(
        "auto",
        description="processes computing one model version's batches, one batch each; 0: "
        "on the event loop; auto: 0 for a small model, one per core for a large torch one, "
        "1 for a large onnx one",
    )
    backend: Backend = Field("torch", description="torch, or onnx: each checkpoint's model.onnx")
    precision: Precision = Field(
        "float32",
        description="bfloat16 or float16: MC-dropout MLPs' layers in 16 bits, products "
        "accumulated in float32 (bfloat16 on AMX CPUs and CUDA, float16 on CUDA); other models "
        "stay float32",
    )
    cuda_graphs: bool = Field(
        False,
        description="replay MC-dropout MLPs' draws from CUDA graphs, one per bucket of "
        "batch rows and draws (on CUDA; elsewhere ignored with a warning)",
    )
    batch_invariant: bool = Field(
        False,
        description="true: each request's products are calls of its own, so a seeded request "
        "gets the same bits alone and in any batch; false: MC-dropout and sample-set models "
        "multiply over the whole batch (faster; the same numbers to float rounding)",
    )
    api_keys: SecretStr | None = Field(
        None, description="comma-separated API keys; set, requests need Authorization: Bearer"
    )
    api_keys_file: Path | None = Field(
        None, description="a file of API keys' sha256 hex digests, one per line"
    )
    admin_without_keys: bool = Field(
        False,
        description="the admin routes (POST /v1/models/{name}:reload, "
        "/v2/repository/models/{name}/load and /unload) answer without API keys configured: "
        "anyone who reaches the port can swap models. With keys set they always need a key; "
        "without keys and without this they are 403",
    )
    model_poll_s: float = Field(
        0.0,
        ge=0,
        description="seconds between scans of model_dir: a new or rewritten version is "
        "loaded, checked and swapped in, a removed one unloaded (0: never; reload by hand)",
    )
    auth_health: bool = Field(False, description="health and readiness need a key too")
    auth_metrics: bool = Field(False, description="/metrics needs a key too")
    log_level: LogLevel = "info"
    access_log: bool = Field(
        False, description="a log line per HTTP request (at log level info); metrics count them"
    )

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        value = value.strip().lower()
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:<index>, got {value!r}")
        return value

    @field_validator("log_level", "backend", "precision", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _onnx_on_cpu(self) -> Settings:
        if self.backend == "onnx" and self.device.startswith("cuda"):
            raise ValueError(
                f"backend onnx runs on onnxruntime's CPU provider; device {self.device!r} "
                "needs backend torch (or use device auto or cpu)"
            )
        if self.backend == "onnx" and self.precision != "float32":
            raise ValueError(
                f"backend onnx runs the exported float32 graph; precision {self.precision!r} "
                "needs backend torch"
            )
        if self.backend == "onnx" and self.cuda_graphs:
            raise ValueError("backend onnx runs on onnxruntime; cuda_graphs needs backend torch")
        if self.cuda_graphs and self.batch_invariant:
            raise ValueError(
                "cuda_graphs replays products over a whole bucket of rows; batch_invariant "
                "needs them per request"
            )
        return self

    @model_validator(mode="after")
    def _keys_readable(self) -> Settings:
        keys_of(self)  # a missing or malformed keys file, or no key at all, fails here
        return self

    @model_validator(mode="after")
    def _default_within_cap(self) -> Settings:
        if self.default_num_samples > self.max_num_samples:
            raise ValueError(
                f"default_num_samples ({self.default_num_samples}) exceeds "
                f"max_num_samples ({self.max_num_samples})"
            )
        return self


def resolve_device(spec: str) -> torch.device:
    """The torch device for a validated spec; refuses CUDA that this machine does not have."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible"
            )
    return device
