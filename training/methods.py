"""The posterior methods `credence-train --method` can fit (`training.posteriors.methods`)."""

from __future__ import annotations

from typing import Any

from training.posteriors.methods import (
    SGHMC,
    SGLD,
    Ensemble,
    Laplace,
    MCDropout,
    Method,
    Variational,
)

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (MCDropout, Variational, Ensemble, SGLD, SGHMC, Laplace)
}


def get_method(name: str, **options: Any) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](**options)
