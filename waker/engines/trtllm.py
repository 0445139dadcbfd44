"""TensorRT-LLM adapter: `trtllm-serve <model>` plus our flags.

Flag sources:
- trtllm-serve reference, "Syntax" section:
  https://nvidia.github.io/TensorRT-LLM/commands/trtllm-serve/trtllm-serve.html (checked against the
  1.3.0rc7 page and against tensorrt_llm/commands/serve.py): MODEL is a positional argument; `--host`,
  `--port`; `--kv_cache_free_gpu_memory_fraction` (alias `--free_gpu_memory_fraction` in newer releases,
  the only spelling in 0.18): "Free GPU memory fraction reserved for KV Cache, after allocating model
  weights and buffers"; `--served_model_name` ("prototype"; default: the model path).
- The same page lists `/health` among the server's endpoints.
- Prometheus metrics: `GET /prometheus/metrics`, mounted when the server returns perf metrics
  (`return_perf_metrics` in the LLM API options; tensorrt_llm/serve/openai_server.py `mount_metrics`, and
  examples/serve/prometheus_metrics.py). Its `/metrics` route answers iteration stats as JSON, not
  Prometheus text, so it is not the one to scrape.
- No sleep mode we use: `/release_memory` and `/resume_memory` are marked "RL-only endpoints" in
  openai_server.py.

Caveats worth knowing when writing a models.d entry:
- The fraction means something different from vLLM's: it is a share of the memory left free *after*
  the weights are loaded, not of the whole GPU. We pass gpu_memory_utilization through unchanged, as
  the closest knob trtllm-serve has on its command line.
- `--served_model_name` first appears in the 1.3.0 release candidates (PR NVIDIA/TensorRT-LLM#11711,
  whose description spells it `--served-model-name`; the generated docs spell it with underscores, so we
  emit that and treat both as the user's override). Older trtllm-serve releases reject it as an unknown
  option; run a 1.3+ release.

Engine routes (`routes`, forwarded as `/engines/{model}{path}`), read in tensorrt_llm/serve/openai_server.py
(`register_routes`): `GET /version`, `GET /v1/models`, `GET /health`: reads of the running server, answered only while
the model is ready. trtllm-serve has no tokenize route. Left out: `/metrics` and `/perf_metrics` (each read drains
what it returns: `get_stats_async` consumes the iteration stats, `get_perf_metrics` swaps its deque for an empty one,
so a read through the gateway would take the numbers from whoever else collects them), `POST /kv_cache_events`
(drains too), `POST /steady_clock_offset` (sets it), `/health_generate` (generates), the RL-only routes
(/release_memory, /resume_memory, /update_weights, /server_info), and `/prometheus/metrics` (the gateway's
`/metrics/engines` serves it, under the metrics key).
"""

from collections.abc import Mapping
from types import MappingProxyType

from waker.config.spec import EngineKind, ModelSpec
from waker.engines.base import EngineRoute, Launch, NoSleepMode, Readiness
from waker.engines.flags import ServeFlags, required_model

_HOST = ("--host",)
_PORT = ("--port",)
_SERVED_NAME = ("--served_model_name", "--served-model-name")
_MEMORY = ("--kv_cache_free_gpu_memory_fraction", "--free_gpu_memory_fraction")
_FLAGS = ServeFlags(_HOST, _PORT, _SERVED_NAME, _MEMORY)


class TrtllmEngine(NoSleepMode):
    """Builds trtllm-serve command lines.

    Launcher: `trtllm-serve <model>` by default. A `spec.command` replaces `trtllm-serve` (it may also
    name the `serve` subcommand, e.g. `["trtllm-serve", "serve"]`); the model positional is appended
    after it. trtllm-serve has no model option, so the model is always ours and always present once.
    """

    kind: str = EngineKind.TRTLLM.value
    metrics_path: str | None = "/prometheus/metrics"
    routes: Mapping[str, EngineRoute] = MappingProxyType({
        "/version": EngineRoute.reading_state("GET"),
        "/v1/models": EngineRoute.reading_state("GET"),
        "/health": EngineRoute.reading_state("GET"),
    })

    def argv(self, spec: ModelSpec, launch: Launch) -> list[str]:
        model = required_model(spec)
        user = spec.args
        argv = [*(spec.command or ("trtllm-serve",)), model]
        return [*argv, *_FLAGS.options(spec, launch), *user]

    def readiness(self, spec: ModelSpec) -> Readiness:
        return Readiness(path=spec.health_path or "/health")
