"""llama.cpp adapter: `llama-server --model <model>` plus our flags.

Flag sources, all from the llama.cpp server README
(https://github.com/ggml-org/llama.cpp/blob/master/tools/server/README.md, repo: tools/server/README.md):
- `-m, --model FNAME`; the model may instead come from `-mu, --model-url`, `-hf, -hfr, --hf-repo` or
  `-dr, --docker-repo`, so any of those in the user's args means "the user picked the model".
- `--host HOST`, `--port PORT`.
- `-a, --alias STRING`: "set model name aliases, comma-separated (to be used by API)".
- `GET /health`: 503 while the model is loading, 200 once it is loaded and the server is ready.
- `GET /metrics`: Prometheus-compatible metrics, served only when started with `--metrics`; we add no flag
  for it, the user may. No sleep mode.

There is no GPU memory fraction flag: llama-server sizes its memory by layers offloaded (`-ngl`) and
context size (`-c`), so spec.gpu_memory_utilization is ignored here; put those flags in `args`.

Engine routes (`routes`, forwarded as `/engines/{model}{path}`), read in tools/server/server.cpp (the route table of
`llama_server`) and tools/server/README.md:
- `POST /tokenize`, `POST /detokenize`, `POST /apply-template`: the model's own tokenizer and chat template. They ask
  the model something, so they start a stopped model, like a request.
- `GET /props` (default generation settings, slots, context, chat template), `GET /slots` (each slot's sampling
  parameters and counters; the prompt text only when the server runs with its slots debug on: `to_json(only_metrics =
  slots_debug == 0)` in tools/server/server-context.cpp), `GET /health`, `GET /v1/models` (with the model's meta):
  reads of the running server, answered only while the model is ready.
Left out: `POST /props` (changes the defaults for every client, with --props), `POST /slots/{id}?action=save|restore|
erase` (writes and reads files under --slot-save-path, erases a slot's cache), `/lora-adapters` (POST rescales the
adapters for everyone), `/metrics` (the gateway's `/metrics/engines` serves it, under the metrics key), and
generations outside `/v1` (/completion, /completions, /infill, /embedding(s), /rerank).
"""

from collections.abc import Mapping
from types import MappingProxyType

from waker.config.spec import EngineKind, ModelSpec
from waker.engines.base import EngineRoute, Launch, NoSleepMode, Readiness
from waker.engines.flags import has_flag, option, required_model

_MODEL = ("--model", "-m")
_MODEL_SOURCES = (*_MODEL, "--model-url", "-mu", "--hf-repo", "-hf", "-hfr", "--docker-repo", "-dr")
_HOST = ("--host",)
_PORT = ("--port",)
_SERVED_NAME = ("--alias", "-a")


class LlamacppEngine(NoSleepMode):
    """Builds llama-server command lines.

    Launcher: `llama-server` by default; a `spec.command` replaces it (e.g. `["/opt/llama/llama-server"]`).
    `--model <model>` follows either way, unless the user's args already choose the model.
    """

    kind: str = EngineKind.LLAMACPP.value
    metrics_path: str | None = "/metrics"
    routes: Mapping[str, EngineRoute] = MappingProxyType({
        "/tokenize": EngineRoute.using_model("POST"),
        "/detokenize": EngineRoute.using_model("POST"),
        "/apply-template": EngineRoute.using_model("POST"),
        "/props": EngineRoute.reading_state("GET"),
        "/slots": EngineRoute.reading_state("GET"),
        "/health": EngineRoute.reading_state("GET"),
        "/v1/models": EngineRoute.reading_state("GET"),
    })

    def argv(self, spec: ModelSpec, launch: Launch) -> list[str]:
        model = required_model(spec)
        user = spec.args
        argv = list(spec.command) if spec.command else ["llama-server"]
        if not has_flag(user, _MODEL_SOURCES):
            argv += [_MODEL[0], model]
        argv += option(user, _HOST, launch.host)
        argv += option(user, _PORT, str(launch.port))
        argv += option(user, _SERVED_NAME, spec.upstream_name)
        # gpu_memory_utilization: deliberately unused, llama-server has no fraction flag (see module doc).
        return [*argv, *user]

    def readiness(self, spec: ModelSpec) -> Readiness:
        return Readiness(path=spec.health_path or "/health")
