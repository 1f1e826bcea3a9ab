"""Optional API keys (`CREDENCE_API_KEYS`, `CREDENCE_API_KEYS_FILE`): bearer tokens.

Only the keys' sha256 digests are held, a presented key is hashed and compared with every
stored digest in constant time (no early exit, so the time taken says nothing about which
key or how much of it matched), and no key is ever written to a log. Health and readiness
stay open for probes, and metrics for scrapers, unless `auth_health` / `auth_metrics` say
otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.types import Scope

if TYPE_CHECKING:
    from service.settings import Settings

HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
METRICS_PATH = "/metrics"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_digests(path: Path) -> list[bytes]:
    """A keys file: one sha256 hex digest per line (`sha256sum` of the key); blank lines and
    lines starting with # are skipped. ValueError names a line that is not a digest."""
    digests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split()[0] if line.strip() else ""
        if not line or line.startswith("#"):
            continue
        try:
            value = bytes.fromhex(line)
        except ValueError:
            value = b""
        if len(value) != 32:
            raise ValueError(f"{path}:{number}: not a sha256 hex digest")
        digests.append(value)
    return digests


class Keys:
    """The keys a request may present, and which paths need one."""

    def __init__(self, digests: list[bytes], health: bool = False, metrics: bool = False):
        if not digests:
            raise ValueError("API keys are configured but none were given")
        self.digests = list(digests)
        self.open = set() if health else set(HEALTH_PATHS)
        if not metrics:
            self.open.add(METRICS_PATH)

    def allows(self, scope: Scope) -> bool:
        if scope["path"] in self.open:
            return True
        token = bearer(scope)
        if token is None:
            return False
        presented = digest(token)
        found = False
        for stored in self.digests:  # all of them, whatever matched
            found |= hmac.compare_digest(presented, stored)
        return found


def bearer(scope: Scope) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    for key, value in scope["headers"]:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def keys_of(settings: Settings) -> Keys | None:
    """The configured keys (both sources together), or None: no authentication."""
    digests = []
    if settings.api_keys is not None:
        keys = [k.strip() for k in settings.api_keys.get_secret_value().split(",")]
        digests += [digest(k) for k in keys if k]
    if settings.api_keys_file is not None:
        try:
            digests += read_digests(settings.api_keys_file)
        except OSError as exc:
            raise ValueError(f"api_keys_file {settings.api_keys_file}: {exc.strerror}") from None
    if settings.api_keys is None and settings.api_keys_file is None:
        return None
    return Keys(digests, health=settings.auth_health, metrics=settings.auth_metrics)
