"""API keys: who may call the gateway, and which models each key may use.

Keys come from settings (env or a file), never from models.d. Only digests are kept in memory and
every configured key is compared on every request (constant-time, whichever key matches), so
neither a key nor which key exists leaks through timing.
"""

import fnmatch
import functools
import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiKeySpec(BaseModel):
    """One client key as configured: `{"key": "...", "name": "laptop", "models": ["qwen*", "embed"]}`."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=8)
    name: str = "client"
    models: list[str] = Field(default_factory=lambda: ["*"], description="globs of allowed model names")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: a key's name and its allowed models (None = no auth configured)."""

    name: str
    models: tuple[str, ...]

    def may_use(self, *names: str) -> bool:
        """True if any of `names` (the name asked for, the model it resolves to) matches a glob."""
        return _may_use(self.models, names)


@functools.lru_cache(maxsize=4096)  # per request otherwise; names are configured ones (resolved before)
def _may_use(patterns: tuple[str, ...], names: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in names for pattern in patterns)


ANONYMOUS = Caller("anonymous", ("*",))


class AuthError(Exception):
    pass


_ACCEPTED_MAX = 1024


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    def __init__(self, keys: Iterable[ApiKeySpec], admin_key: str | None = None) -> None:
        self._keys = [(_digest(k.key), Caller(k.name, tuple(k.models))) for k in keys]
        self._admin = _digest(admin_key) if admin_key else None
        # Authorization values already accepted, and whose they are: a request with a known key skips the
        # hashing and the comparisons (profile: ~1.5% of the gateway's time per request). Only accepted
        # values are kept, so wrong keys can't fill it; bounded all the same.
        self._accepted: dict[str, Caller] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def has_admin(self) -> bool:
        return self._admin is not None

    def caller(self, authorization: str | None) -> Caller | None:
        """The caller for an `Authorization` header value; None when missing or wrong.

        With no keys configured everyone is ANONYMOUS (allowed everything)."""
        if not self._keys:
            return ANONYMOUS
        if authorization is not None and (known := self._accepted.get(authorization)) is not None:
            return known
        token = _bearer(authorization)
        if token is None:
            return None
        digest = _digest(token)
        found: Caller | None = None
        for known, caller in self._keys:  # no early exit: the time taken doesn't depend on which key matched
            if hmac.compare_digest(known, digest):
                found = caller
        if found is not None and authorization is not None:
            if len(self._accepted) >= _ACCEPTED_MAX:
                self._accepted.clear()
            self._accepted[authorization] = found
        return found

    def is_admin(self, authorization: str | None) -> bool:
        token = _bearer(authorization)
        return self._admin is not None and token is not None and hmac.compare_digest(self._admin, _digest(token))


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def load_keys(inline: list[ApiKeySpec], path: Path | None) -> list[ApiKeySpec]:
    """Keys from settings plus those in `path` (a YAML or JSON list of key entries)."""
    keys = list(inline)
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise AuthError(f"{path}: cannot read API keys: {exc}") from None
        if not isinstance(data, list):
            raise AuthError(f"{path}: expected a list of keys ({json.dumps({'key': '...', 'name': '...'})}, ...)")
        try:
            keys += [ApiKeySpec.model_validate(item) for item in data]
        except ValidationError as exc:
            raise AuthError(f"{path}: invalid API key entry: {exc.errors()[0]['msg']}") from None
    if len({k.key for k in keys}) != len(keys):
        raise AuthError("the same API key is configured twice")
    return keys


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
