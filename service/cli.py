"""`credence-serve`: serve every checkpoint under a model directory over HTTP.

Flags override CREDENCE_* environment variables, which override the defaults; a flag that
is not given leaves the environment's value alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import sys

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.settings import Settings, resolve_device

FLAGS = {  # flag -> (type, help); each sets the Settings field of the same name
    "model_dir": (str, "folder holding <name>/<version>/ checkpoints"),
    "host": (str, "interface to bind"),
    "port": (int, "port to bind"),
    "device": (str, "auto (CUDA when present, else CPU), cpu, cuda or cuda:<i>"),
    "max_batch_rows": (int, "rows per model call"),
    "max_batch_delay_ms": (float, "extra wait for more rows; 0 takes what is queued"),
    "default_num_samples": (int, "posterior samples when neither request nor manifest says"),
    "max_num_samples": (int, "hard cap on posterior samples per request"),
    "max_instances": (int, "rows per request"),
    "max_body_bytes": (int, "largest predict body in bytes; past it, 413 unread"),
    "max_queue": (int, "queued requests per model version before 503"),
    "request_timeout_s": (float, "deadline per request before 504"),
    "shutdown_grace_s": (float, "after SIGTERM, how long queued and in-flight requests may take"),
    "torch_threads": (int, "intra-op threads (0: 1)"),
    "batch_workers": (str, "processes computing a model's batches (0: on the event loop; auto)"),
    "backend": (str, "torch, or onnx (each checkpoint's model.onnx, from credence-export)"),
    "precision": (
        str,
        "float32, or bfloat16 or float16 for MC-dropout MLPs' layers (torch backend)",
    ),
    "cuda_graphs": (str, "true: MC-dropout draws replayed from CUDA graphs (on CUDA)"),
    "batch_invariant": (str, "true: a seeded request gets the same bits in any batch (slower)"),
    "api_keys": (str, "comma-separated API keys (better: CREDENCE_API_KEYS, not argv)"),
    "api_keys_file": (str, "file of API keys' sha256 hex digests, one per line"),
    "admin_without_keys": (str, "true: reload, load and unload work with no API keys set"),
    "model_poll_s": (float, "seconds between scans of model_dir for changed versions (0: off)"),
    "auth_health": (str, "true: health and readiness need a key too"),
    "auth_metrics": (str, "true: /metrics needs a key too"),
    "log_level": (str, "critical, error, warning, info or debug"),
    "access_log": (
        str,
        "true: a log line per HTTP request (off by default: it costs a quarter "
        "of a small model's requests/s)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credence-serve",
        description="Serve Bayesian models with calibrated uncertainty over HTTP. "
        "Every flag can also be set as CREDENCE_<FLAG> (e.g. CREDENCE_MODEL_DIR).",
    )
    for name, (kind, text) in FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=text)
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    """Settings from the environment with the given flags on top."""
    args = build_parser().parse_args(argv)
    return Settings(**{key: value for key, value in vars(args).items() if value is not None})


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        device = resolve_device(settings.device)
    except (ValidationError, ValueError) as exc:
        print(f"credence-serve: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("credence").info(
        "credence-serve on %s:%d, device %s", settings.host, settings.port, device
    )
    signal.signal(signal.SIGTERM, _drained)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return 0


def _drained(signum: int, frame: object) -> None:
    """uvicorn stops accepting on SIGTERM, lets every queued and in-flight request finish,
    then raises the signal again under the handler it found: this one, so that a drained
    server exits 0, as an orchestrator stopping a pod expects."""
    sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
