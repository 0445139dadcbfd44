"""What `/v1/models` says of each model: the OpenAI fields, what clients show (`name`, `description`, the context
window), llama.cpp's router status, and sparkgate's own figures.

The list is built from `Waker.describe()` alone, with no I/O and nothing awaited: Open WebUI lists it before every
chat and background task (1 s cache, 10 s limit), and a list that is slow or fails is a "Model not found" there
(tests/unit/gateway/test_model_list.py::test_the_list_answers_while_a_model_starts_and_docker_is_unreachable).

`status` is llama.cpp's router shape (tools/server/server-models.cpp `get_router_models`): `value` is one of
`unloaded`, `loading`, `loaded`, `sleeping`; a model whose last start failed is `unloaded` with `failed: true` and
its `exit_code`, as llama.cpp reports one. Open WebUI's llama.cpp provider reads it for its Loaded indicator
(routers/openai.py `get_provider_model_loaded_state`: `loaded` and `sleeping` are loaded, `loading` and `unloaded`
are not, and an entry without `status` is taken as loaded), so it must be present on every entry.
"""

import functools

from waker.config.args import flag_value, has_flag
from waker.config.fit_check import CONTEXT_FLAGS
from waker.config.spec import EngineKind, ModelSpec
from waker.state import ModelState
from waker.status import ModelStatus

S = ModelState

STATUS_VALUES: dict[ModelState, str] = {
    S.READY: "loaded",
    # llama.cpp's own word for an engine that is up with its weights released. Open WebUI counts it as loaded: the
    # engine is resident (it holds its sleeping footprint) and answers after a wake, and Eject frees what it holds.
    S.SLEEPING: "sleeping",
    S.STARTING: "loading",
    S.WAKING: "loading",
    # A stop under way is shown as its outcome: Eject is answered "unloaded" at once, as llama.cpp's is.
    S.STOPPING: "unloaded",
    S.STOPPED: "unloaded",
    S.FAILED: "unloaded",  # with failed: true (llama.cpp has no "failed" value)
}

_SLOTS = ("--parallel", "-np")
_KV_UNIFIED = ("--kv-unified", "-kvu")


def status_of(status: ModelStatus) -> dict[str, object]:
    """The llama.cpp router `status` object of one model."""
    out: dict[str, object] = {"value": STATUS_VALUES[status.state]}
    if status.state is S.FAILED:
        out["failed"] = True
        if status.last_error is not None and status.last_error.exit_code is not None:
            out["exit_code"] = status.last_error.exit_code
    return out


def display_name(name: str, spec: ModelSpec) -> str:
    """What clients show: the entry's display_name (or its name); an alias says what it leads to, so a picker that
    lists both never shows two identical names."""
    shown = spec.display_name or spec.name
    return shown if name == spec.name else f"{name} \N{RIGHTWARDS ARROW} {shown}"


def context_length(spec: ModelSpec) -> int | None:
    """The context window: the entry's context_length, else the engine's context flag in its args, else None (the
    engine takes the checkpoint's own, which is not read here)."""
    if spec.context_length is not None:
        return spec.context_length
    return _from_args(spec.engine, spec.args)


@functools.lru_cache(maxsize=512)  # per listing otherwise; an entry's args don't change while it is loaded
def _from_args(engine: EngineKind, args: tuple[str, ...]) -> int | None:
    flags = CONTEXT_FLAGS.get(engine)
    if flags is None:
        return None
    tokens = _tokens(flag_value(args, flags))
    if tokens is None or tokens <= 0:  # llama.cpp -c 0: the model's own
        return None
    if engine is EngineKind.LLAMACPP and not has_flag(args, _KV_UNIFIED):
        # llama.cpp splits -c between its --parallel slots unless the KV cache is unified (what it picks for
        # itself when --parallel is not given): one request gets its slot's share.
        slots = _tokens(flag_value(args, _SLOTS))
        if slots is not None and slots > 1:
            return tokens // slots
    return tokens


_SUFFIX = {"k": 1000, "m": 1000**2, "K": 1024, "M": 1024**2}
"""vLLM's human-readable lengths (`--max-model-len 32k`): lower case decimal, upper case binary."""


def _tokens(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    try:
        if text[-1:] in _SUFFIX:
            return int(float(text[:-1]) * _SUFFIX[text[-1]])
        return int(text)
    except ValueError:
        return None  # "auto", "-1" spelled otherwise, a typo: the engine's own rules apply, unknown here


def model_entry(name: str, status: ModelStatus, created: int, now: float) -> dict[str, object]:
    """One `/v1/models` entry for `name` (the model's name or one of its aliases)."""
    spec = status.spec
    entry: dict[str, object] = {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "sparkgate",
        # Extra fields: OpenAI clients ignore them. Open WebUI shows `name`; Continue's vllm provider reads
        # max_model_len; llama.cpp-aware clients read status.
        "name": display_name(name, spec),
        "status": status_of(status),
        "state": status.state.value,
        "engine": spec.engine.value,
        "runtime": spec.runtime.value,
        "memory_gb": spec.memory_gb,
    }
    if spec.description:
        entry["description"] = spec.description
    window = context_length(spec)
    if window is not None:
        entry["context_length"] = entry["max_model_len"] = window
    if name != spec.name:
        entry["alias_of"] = spec.name
    elif spec.aliases:
        entry["aliases"] = list(spec.aliases)
    if status.last_error is not None and status.state is S.FAILED:
        entry["error"] = status.last_error.reason
        entry["failures"] = status.failures  # a crash loop shows here, with its backoff
        if status.retry_at is not None:
            entry["retry_in"] = round(max(0.0, status.retry_at - now), 1)
    return entry


__all__ = ["STATUS_VALUES", "context_length", "display_name", "model_entry", "status_of"]
