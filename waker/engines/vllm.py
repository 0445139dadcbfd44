"""vLLM adapter: `vllm serve <model>` with our host, port, served name and memory fraction.

Flag sources:
- `vllm serve` CLI reference: https://docs.vllm.ai/en/latest/cli/serve.html (repo: docs/cli/serve.md,
  docs/cli/README.md): the model is the first positional argument (`model_tag`); `--host`, `--port`,
  `--served-model-name`, `--gpu-memory-utilization` (fraction of GPU memory for weights + KV cache).
- vLLM's FlexibleArgumentParser (vllm/utils, "allows both underscore and dash in names") accepts
  `--served_model_name` as well, so the underscore spellings count as "the user passed this flag".
- `GET /health` (vllm/entrypoints/openai/api_server.py) answers 200 once the OpenAI-compatible server
  serves HTTP, which it does only after the engine client, and so the model, is up; it is the liveness
  and readiness probe path in e.g. https://aws.github.io/deep-learning-containers/vllm/deployment/eks/.
- Several nodes (docs/serving/parallelism_scaling.md, "Multi-node deployment"; NVIDIA's DGX Spark playbook
  "vLLM on stacked Sparks"): a Ray cluster (`ray start --head` / `ray start --address`), then `vllm serve` on
  the head with `--distributed-executor-backend ray` and `--pipeline-parallel-size` (`-pp`) or
  `--tensor-parallel-size` (`-tp`) equal to the number of nodes (one GPU each on a DGX Spark).
- Prometheus metrics: `GET /metrics` on the OpenAI-compatible server ("Production Metrics",
  https://docs.vllm.ai/en/latest/usage/metrics/, repo: docs/usage/metrics.md).

Sleep mode (https://docs.vllm.ai/en/latest/features/sleep_mode/): started with `--enable-sleep-mode` and
env `VLLM_SERVER_DEV_MODE=1` (the sleep routes exist only in dev mode). `POST /sleep?level=N`;
level 1 offloads weights to CPU RAM and drops the KV cache, level 2 drops both. Waking from level 1
is `POST /wake_up`; from level 2 the weights must be reloaded in place: `POST /wake_up?tags=weights`,
`POST /collective_rpc {"method": "reload_weights"}`, then `POST /wake_up?tags=kv_cache`.
`GET /is_sleeping` answers `{"is_sleeping": bool}`, true until every tag is awake
(vllm/entrypoints/openai/api_server.py; newer releases vllm/entrypoints/serve/sleep/api_router.py, attached only when
VLLM_SERVER_DEV_MODE is set). `/sleep` takes `mode` too (abort, the default: requests in flight fail; wait: they
finish first). `/health` answers 200 while asleep (vllm/entrypoints/serve/instrumentator/health.py checks only that
the engine is alive), so only `/is_sleeping` tells a sleeping engine from an awake one: adoption and the check after a
wake ask it.

Shutdown: vLLM >= 0.18 (`--shutdown-timeout`, PR #34730) drains running requests on SIGTERM for that many seconds;
without the flag it aborts them. We pass three quarters of stop_timeout unless the user sets it, or turns it off with
`shutdown_drain: false` (an older vLLM rejects the flag).

Engine routes (`routes`, forwarded as `/engines/{model}{path}`), read in vllm/entrypoints/openai/api_server.py (its
router: /health, /load, /tokenize, /detokenize, /tokenizer_info, /v1/models, /version) and, in newer releases,
vllm/entrypoints/serve/tokenize/api_router.py and vllm/entrypoints/serve/instrumentator/:
- `POST /tokenize`, `POST /detokenize`: the model's own tokenizer (count a prompt's tokens, see its chat template
  applied). They ask the model something, so they start a stopped model and wake a sleeping one, like a request.
- `GET /v1/models` (with max_model_len), `GET /version`, `GET /load` (requests in the server), `GET /health`,
  `GET /tokenizer_info` (answers only with --enable-tokenizer-info-endpoint): reads of the running server, answered
  only while the model is ready.
Left out: the dev routes (/sleep, /wake_up, /is_sleeping, /collective_rpc, /reset_prefix_cache, /reset_mm_cache,
/server_info: VLLM_SERVER_DEV_MODE, vllm/entrypoints/serve/dev/), which the waker alone drives; /pause and /resume
(stop generation for every client); /start_profile, /stop_profile, /v1/load_lora_adapter, /v1/unload_lora_adapter
and /scale_elastic_ep (change the engine); /metrics (the gateway's `/metrics/engines` serves it, under the metrics
key); and generations outside `/v1` (/invocations, /pooling, /classify, /score, /rerank).
"""

from collections.abc import Mapping
from types import MappingProxyType

from waker.config.spec import EngineKind, IdleAction, ModelSpec
from waker.engines.base import Call, EngineRoute, Launch, Readiness
from waker.engines.flags import ServeFlags, has_flag, option, required_model

_HOST = ("--host",)
_PORT = ("--port",)
_SERVED_NAME = ("--served-model-name", "--served_model_name")
_MEMORY = ("--gpu-memory-utilization", "--gpu_memory_utilization")
_FLAGS = ServeFlags(_HOST, _PORT, _SERVED_NAME, _MEMORY)
# The legacy `python -m vllm.entrypoints.openai.api_server` launcher takes the model as `--model`.
_MODEL = ("--model",)
_BACKEND = ("--distributed-executor-backend",)
_PIPELINE = ("--pipeline-parallel-size", "--pipeline_parallel_size", "-pp")
_TENSOR = ("--tensor-parallel-size", "--tensor_parallel_size", "-tp")
_SLEEP_MODE = "--enable-sleep-mode"
_SHUTDOWN = ("--shutdown-timeout", "--shutdown_timeout")


def shutdown_timeout(stop_timeout: float) -> int:
    """`--shutdown-timeout` for a stop that allows `stop_timeout` seconds between SIGTERM and SIGKILL: three quarters
    of it, whole seconds, so the engine drains what runs and still exits before the kill.

    vLLM >= 0.18 (PR #34730) aborts the requests in flight on SIGTERM unless given this flag (default 0); with it,
    it refuses new requests and lets the running ones finish for up to that many seconds."""
    return max(0, int(stop_timeout * 0.75))


class VllmEngine:
    """Builds `vllm serve` command lines.

    Launcher: `vllm serve <model>` by default. A `spec.command` replaces `vllm serve` only, e.g.
    `["/opt/venv/bin/vllm", "serve"]` or `["uv", "run", "vllm", "serve"]`; the model is then appended as
    the positional argument right after it, so it is present exactly once either way. When the user's
    args already carry `--model` (the legacy api_server launcher wants it that way) we add no
    positional: their args win, as for every other flag below.
    """

    kind: str = EngineKind.VLLM.value
    supports_sleep: bool = True
    metrics_path: str | None = "/metrics"
    routes: Mapping[str, EngineRoute] = MappingProxyType({
        "/tokenize": EngineRoute.using_model("POST"),
        "/detokenize": EngineRoute.using_model("POST"),
        "/v1/models": EngineRoute.reading_state("GET"),
        "/version": EngineRoute.reading_state("GET"),
        "/load": EngineRoute.reading_state("GET"),
        "/health": EngineRoute.reading_state("GET"),
        "/tokenizer_info": EngineRoute.reading_state("GET"),
    })

    def argv(self, spec: ModelSpec, launch: Launch) -> list[str]:
        model = required_model(spec)
        user = spec.args
        argv = list(spec.command) if spec.command else ["vllm", "serve"]
        if not has_flag(user, _MODEL):
            argv.append(model)
        drain = option(user, _SHUTDOWN, str(shutdown_timeout(spec.stop_timeout))) if spec.shutdown_drain else []
        return [*argv, *_FLAGS.options(spec, launch), *drain, *user]

    def readiness(self, spec: ModelSpec) -> Readiness:
        return Readiness(path=spec.health_path or "/health")

    def launch_spec(self, spec: ModelSpec) -> ModelSpec:
        """With idle_action sleep: `--enable-sleep-mode` (unless the user passed it) and VLLM_SERVER_DEV_MODE=1
        (unless the user's env sets it: theirs wins)."""
        if spec.idle_action is not IdleAction.SLEEP:
            return spec
        args = spec.args if _SLEEP_MODE in spec.args else (*spec.args, _SLEEP_MODE)
        return spec.model_copy(update={"args": args, "env": {"VLLM_SERVER_DEV_MODE": "1", **spec.env}})

    def launch_hash(self, spec: ModelSpec) -> str:
        return self.launch_spec(spec).spec_hash()

    def sleep_calls(self, spec: ModelSpec) -> tuple[Call, ...]:
        # mode=wait: requests still running finish first (the default, abort, fails them). The waker only puts
        # idle engines to sleep; this covers a request that slips in between.
        return (Call("POST", f"/sleep?level={spec.sleep_level}&mode=wait"),)

    def wake_calls(self, spec: ModelSpec) -> tuple[Call, ...]:
        if spec.sleep_level == 1:
            calls: tuple[Call, ...] = (Call("POST", "/wake_up"),)
        else:
            # Level 2 dropped the weights: wake the weights' memory, reload them in place, then the KV cache. A wake
            # without the reload answers 200 and then generates garbage (vLLM #29341).
            calls = (
                Call("POST", "/wake_up?tags=weights"),
                Call("POST", "/collective_rpc", {"method": "reload_weights"}),
                Call("POST", "/wake_up?tags=kv_cache"),
            )
        if spec.reset_prefix_cache:
            # Releases before PR #22726 (Aug 2025) kept stale prefix-cache entries across a level-2 sleep.
            calls += (Call("POST", "/reset_prefix_cache"),)
        return calls

    def sleep_state_call(self, spec: ModelSpec) -> Call | None:
        return Call("GET", "/is_sleeping")

    def ray_argv(self, spec: ModelSpec, launch: Launch, size: int) -> list[str]:
        """`vllm serve` spread over the `size` nodes of the Ray cluster it runs in: Ray as the executor and
        `size` pipeline stages (or tensor shards, `multinode.parallel: tensor`). Ours go before the user's
        args; a flag the user sets wins, as in `argv`."""
        user = spec.args
        split = _TENSOR if spec.multinode.parallel == "tensor" else _PIPELINE
        ours = option(user, _BACKEND, "ray") + option(user, split, str(size))
        argv = self.argv(spec, launch)
        cut = len(argv) - len(user)
        return [*argv[:cut], *ours, *argv[cut:]]
