"""Who may call the gateway: API keys and the models each may use, and the door every request passes first.

Keys come from settings (env or a file), never from models.d. Only digests are kept in memory and
every configured key is compared on every request (constant-time, whichever key matches), so
neither a key nor which key exists leaks through timing.

A key's globs match model names, never aliases: an alias is allowed exactly when its model is
(test_a_keys_glob_matching_an_alias_does_not_grant_the_model_behind_it).

The door (`Door`) looks at what a browser can't hide, before any key: a `Host` that is not this gateway
(DNS rebinding), an `Origin` that is not an allowed one (a web page the user visits), and, on a gateway
without client keys, a body that is not JSON (a form or `text/plain` POST needs no CORS preflight).
"""

import fnmatch
import functools
import hashlib
import hmac
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway import errors, forms
from gateway.errors import ApiError
from waker.config.registry import ConfigError, read_yaml
from waker.config.spec import Progress


class ApiKeySpec(BaseModel):
    """One client key as configured: `{"key": "...", "name": "laptop", "models": ["qwen*", "embed"]}`."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=8)
    name: str = "client"
    models: list[str] = Field(default_factory=lambda: ["*"],
                              description="globs of allowed model names (canonical names, never aliases)")
    metrics: bool = Field(default=False, description="may read /metrics and /metrics/engines")
    tasks: bool = Field(default=False, description="every request is a background task: it never starts, wakes or "
                                                   "waits for a model (gateway/tasks.py)")
    progress: Progress | None = Field(
        default=None, description='how its streaming chat completions are shown a wake: "open-webui", "reasoning" '
                                  'or "off"; unset: as the model says (gateway/progress.py)')


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: a key's name, its allowed models, whether it may read metrics."""

    name: str
    models: tuple[str, ...]
    metrics: bool = False
    tasks: bool = False  # every request of this key is a background task (gateway/tasks.py)
    progress: Progress | None = None  # how its waits are shown (gateway/progress.py); None: as the model says

    def may_use(self, asked: str, model: str | None = None) -> bool:
        """True if a glob matches `model`, the canonical name that `asked` resolves to (`asked` itself when
        not given). The name asked for is never matched: it may be an alias, and an alias is allowed exactly
        when its model is; otherwise adding alias `small-x` to a private model would open it to every
        `small*` key (test_a_keys_glob_matching_an_alias_does_not_grant_the_model_behind_it)."""
        return _may_use(self.models, asked if model is None else model)


@functools.lru_cache(maxsize=4096)  # per request otherwise; names are configured ones (resolved before)
def _may_use(patterns: tuple[str, ...], model: str) -> bool:
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)


ANONYMOUS = Caller("anonymous", ("*",))


class AuthError(Exception):
    pass


_ACCEPTED_MAX = 1024


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    def __init__(self, keys: Iterable[ApiKeySpec], admin_key: str | None = None) -> None:
        self._keys = [(_digest(k.key), Caller(k.name, tuple(k.models), k.metrics, tasks=k.tasks, progress=k.progress))
                      for k in keys]
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

    def request_caller(self, headers: Iterable[tuple[bytes, bytes]], max_header_bytes: int) -> Caller:
        """The caller of a request (ASGI headers), checking the headers' total size on the way (one pass): raises the
        431 or the 401 to answer. The proxy, the engine routes and the services take their caller here."""
        size = 0
        authorization = None
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name == b"authorization":
                authorization = value.decode("latin-1")
        if size > max_header_bytes:
            raise errors.headers_too_large(max_header_bytes)
        caller = self.caller(authorization)
        if caller is None:
            raise errors.unauthorized()
        return caller

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

    def may_read_metrics(self, authorization: str | None) -> bool | None:
        """True for the admin key or a client key marked `metrics`; False for another client key; None
        without a valid key. A gateway with no keys at all (loopback only) lets everyone read them."""
        if not self._keys and self._admin is None:
            return True
        if self.is_admin(authorization):
            return True
        caller = self.caller(authorization) if self._keys else None
        return None if caller is None else caller.metrics


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
            data = read_yaml(path)  # models.d's guards: a key given twice in an entry is an error, not the last wins
        except ConfigError as exc:
            raise AuthError(f"cannot read API keys: {exc}") from None
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
    """A loopback name or address (127.0.0.0/8, ::1, ::ffff:127.x.y.z)."""
    if host == "localhost":
        return True
    address = _ip(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address is not None and address.is_loopback


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_ACCEPTED_HOSTS_MAX = 1024


class Door:
    """Refuses, before any key is looked at, what a web page could make a browser send (see module docstring).

    `Host` is this gateway when its name is a loopback one (localhost, *.localhost), an IP address (a DNS
    rebinding page can only make the browser send the attacker's own *name*), the bound host or one of
    `allowed_hosts` ("*": any); the port is not compared (port mappings, port 0 in tests). `Origin`, when
    present, is this gateway's own (`http(s)://` + the request's Host) or one of `cors_origins`. Server-side
    clients (OpenAI SDKs, Open WebUI's backend, Continue, Cline) send no Origin and a JSON body: they pass.
    """

    def __init__(self, bound_host: str, allowed_hosts: Iterable[str], cors_origins: Iterable[str],
                 json_only: bool) -> None:
        self._names = {_normal_name(h) for h in (bound_host, *allowed_hosts)}
        self._any_host = "*" in self._names
        self._origins = {o.rstrip("/").lower() for o in cors_origins}
        self._any_origin = "*" in self._origins
        self._json_only = json_only
        self._accepted_hosts: set[bytes] = set()  # Host values already accepted: one set lookup per request

    def refusal(self, method: str, headers: Iterable[tuple[bytes, bytes]], path: str = "") -> ApiError | None:
        """None to let the request in; else the 403 to answer (headers as ASGI gives them: lower-case names).

        A multipart/form-data body passes on the upload endpoints (`forms.FORM_PATHS`: audio transcriptions and
        translations, image edits and variations), which take nothing else; a page that posts a form there sends
        its Origin, refused above unless allowed."""
        host = origin = content_type = length = encoding = None
        for name, value in headers:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                encoding = value
        if host is not None and host not in self._accepted_hosts:
            if not self._own_host(host.decode("latin-1")):
                return errors.host_not_allowed(host.decode("latin-1"))
            if len(self._accepted_hosts) >= _ACCEPTED_HOSTS_MAX:
                self._accepted_hosts.clear()
            self._accepted_hosts.add(host)
        # A preflight carries the Origin too; CORSMiddleware answers it (and refuses foreign origins) and it
        # changes nothing. Every other request from a foreign page stops here, whatever its method.
        if origin is not None and method != "OPTIONS" and not self._allowed_origin(origin, host):
            return errors.origin_not_allowed(origin.decode("latin-1"))
        # A body without a Content-Type is taken for JSON, as the proxy does (bare clients send one): a page
        # can't send it without an Origin, checked above.
        # A service's own web UI (ComfyUI's image upload) posts forms from the gateway's origin: an Origin that
        # passed the check above is that page's, so its body passes whatever its type.
        if self._json_only and method in _UNSAFE_METHODS and content_type is not None and not _is_json(content_type) \
                and (encoding is not None or (length is not None and length != b"0")) \
                and not (path in forms.FORM_PATHS and forms.is_form(content_type)) \
                and not (origin is not None and path.startswith("/services/")):
            return errors.json_required()
        return None

    def _own_host(self, value: str) -> bool:
        if self._any_host:
            return True
        name = _normal_name(_host_name(value))
        return name == "localhost" or name.endswith(".localhost") or _ip(name) is not None or name in self._names

    def _allowed_origin(self, origin: bytes, host: bytes | None) -> bool:
        text = origin.decode("latin-1").rstrip("/").lower()
        if self._any_origin or text in self._origins:
            return True
        if host is None:
            return False
        own = host.decode("latin-1").lower()
        return text in (f"http://{own}", f"https://{own}")


def _host_name(value: str) -> str:
    """The name of a Host value: `[::1]:8009` -> `::1`, `spark.lan:8009` -> `spark.lan`."""
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    name, colon, port = value.rpartition(":")
    return name if colon and port.isdigit() else value


def _normal_name(name: str) -> str:
    return name.strip().lower().removesuffix(".").strip("[]")


def _is_json(content_type: bytes) -> bool:
    """application/json, or any `+json` type (application/merge-patch+json ...), parameters allowed."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))
