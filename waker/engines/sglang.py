"""SGLang adapter: `python3 -m sglang.launch_server --model-path <model>` plus our flags.

Flag sources:
- Server arguments: https://docs.sglang.io/advanced_features/server_arguments.html
  (repo: docs/advanced_features/server_arguments.md): `--model-path` (alias `--model`), `--host`,
  `--port`, `--served-model-name`, `--mem-fraction-static` (fraction of memory for static allocation:
  weights plus the KV cache pool; the closest match to our gpu_memory_utilization).
- Readiness: `GET /health` answers 503 while the server is starting (until its warmup request ends), then 200. Since
  PR #8444 it shares its handler with `/health_generate` (python/sglang/srt/entrypoints/http_server.py): once up, every
  probe runs a one-token generation and waits at least a second for it, unless
  SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 (python/sglang/srt/environ.py, default true). We set it to 0 (the user's
  env wins) so our frequent probes stay cheap and answer at once; the 503-until-warm is the readiness signal we need.
- Several nodes (docs/references/multi_node_deployment): the same launch_server on every node with
  `--nnodes N --node-rank i --dist-init-addr <rank 0's address>:<port>` and the parallel size over all of
  them, `--tp-size` (alias `--tensor-parallel-size`) or `--pp-size` (alias `--pipeline-parallel-size`;
  server_args.py). Rank 0 serves HTTP; ranks >= 1 answer only a dummy `/health` on their --host/--port.
- Prometheus metrics: `GET /metrics`, served only when the server was started with `--enable-metrics`
  (https://docs.sglang.io/references/production_metrics.html); we add no flag for it, the user may.

Sleep mode (python/sglang/srt/entrypoints/http_server.py, managers/scheduler_update_weights_mixin.py): started with
`--enable-memory-saver`; `POST /release_memory_occupation {"tags": [...]}` and `POST /resume_memory_occupation`
(tags among weights, kv_cache, cuda_graph; none = all). The scheduler asserts it is fully idle, and a failed assert
kills the server: the waker puts only drained engines to sleep, and first repeats `POST /flush_cache` until it answers
200 (it does only when the scheduler is fully idle, else 400). Resuming a tag that was not released fails
(`offload_tags.remove`) and kills it too.
The weights are loaded in a memory-saver region whose CPU backup is off unless `--enable-weights-cpu-backup`, so a
release of `weights` DISCARDS them: resumed as they are, the model answers garbage without an error. Hence two levels:
- level 1 releases the KV cache and the CUDA graphs only; the weights stay in GPU memory (a sleeping engine holds them).
- level 2 releases everything, and the wake reloads the weights from disk after the resume
  (`POST /update_weights_from_disk {"model_path": <model>}`, which answers `{"success": bool, "message": ...}`).
SGLang has no route that tells whether it sleeps: the waker keeps that fact with the engine (a Docker container's
note, waker/runtime/docker/container.py) for the next gateway to find.

Engine routes (`routes`, forwarded as `/engines/{model}{path}`), read in python/sglang/srt/entrypoints/http_server.py:
- `POST /tokenize`, `POST /detokenize` (the same handlers as /v1/tokenize and /v1/detokenize): the model's own
  tokenizer. They ask the model something, so they start a stopped model and wake a sleeping one, like a request.
- `GET /get_model_info`, `GET /get_server_info`, `GET /get_load`, `GET /v1/models`: reads of the running server,
  answered only while the model is ready. `/get_server_info` returns `dataclasses.asdict(server_args)`, which holds
  `api_key` (and `admin_api_key` where the release has it): the gateway drops those keys from the answer.
Left out: `/health` and `/health_generate` (each runs a one-token generation unless
SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0, which the user's env may undo); the memory and weight routes the waker
drives (/release_memory_occupation, /resume_memory_occupation, /update_weights_from_*, /init_weights_*,
/get_weights_by_name); /flush_cache (drops the radix cache for every client); /abort_request, /pause_generation,
/continue_generation, /slow_down (act on others' requests); /set_internal_state, /configure_logging, /freeze_gc,
/start_profile, /stop_profile, /*_expert_distribution_record, /load_lora_adapter, /unload_lora_adapter,
/open_session, /close_session (change the engine); /metrics (the gateway's `/metrics/engines` serves it, under the
metrics key); and generations outside `/v1` (/generate, /encode, /classify, /invocations, /vertex_generate).
"""

from collections.abc import Mapping
from types import MappingProxyType

from waker.config.spec import EngineKind, IdleAction, ModelSpec
from waker.engines.base import Call, EngineRoute, Launch, Readiness
from waker.engines.flags import ServeFlags, option, required_model

_MODEL = ("--model-path", "--model")
_HOST = ("--host",)
_PORT = ("--port",)
_SERVED_NAME = ("--served-model-name",)
_MEMORY = ("--mem-fraction-static",)
_FLAGS = ServeFlags(_HOST, _PORT, _SERVED_NAME, _MEMORY)
_NNODES = ("--nnodes",)
_NODE_RANK = ("--node-rank",)
_DIST_INIT = ("--dist-init-addr",)
_TENSOR = ("--tp-size", "--tensor-parallel-size", "--tp")
_PIPELINE = ("--pp-size", "--pipeline-parallel-size")
_MEMORY_SAVER = "--enable-memory-saver"
_HEALTH_GENERATION = "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"
_LEVEL_1_TAGS = ("kv_cache", "cuda_graph")
_ALL_TAGS = ("weights", "kv_cache", "cuda_graph")


def _released(spec: ModelSpec) -> list[str]:
    """What a sleep releases: the KV cache and CUDA graphs at level 1, the weights too at level 2 (named, not left
    to the default, so a release and its resume always name the same tags)."""
    return list(_LEVEL_1_TAGS if spec.sleep_level == 1 else _ALL_TAGS)


class SglangEngine:
    """Builds SGLang launch_server command lines.

    Launcher: `python3 -m sglang.launch_server` by default. A `spec.command` replaces exactly that part
    (e.g. `["sglang", "serve"]` or a venv's python with `-m sglang.launch_server`); `--model-path
    <model>` is appended after it either way, unless the user's args already name the model.
    """

    kind: str = EngineKind.SGLANG.value
    supports_sleep: bool = True
    metrics_path: str | None = "/metrics"
    routes: Mapping[str, EngineRoute] = MappingProxyType({
        "/tokenize": EngineRoute.using_model("POST"),
        "/detokenize": EngineRoute.using_model("POST"),
        "/get_model_info": EngineRoute.reading_state("GET"),
        "/get_server_info": EngineRoute.reading_state("GET", redact=("api_key", "admin_api_key")),
        "/get_load": EngineRoute.reading_state("GET"),
        "/v1/models": EngineRoute.reading_state("GET"),
    })

    def argv(self, spec: ModelSpec, launch: Launch) -> list[str]:
        model = required_model(spec)
        user = spec.args
        argv = list(spec.command) if spec.command else ["python3", "-m", "sglang.launch_server"]
        argv += option(user, _MODEL, model)
        return [*argv, *_FLAGS.options(spec, launch), *user]

    def readiness(self, spec: ModelSpec) -> Readiness:
        return Readiness(path=spec.health_path or "/health")

    def launch_spec(self, spec: ModelSpec) -> ModelSpec:
        """Cheap readiness probes (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 unless the user's env sets it) and, with
        idle_action sleep, `--enable-memory-saver` (unless the user passed it)."""
        env = {_HEALTH_GENERATION: "0", **spec.env}
        if spec.idle_action is not IdleAction.SLEEP:
            return spec.model_copy(update={"env": env})
        args = spec.args if _MEMORY_SAVER in spec.args else (*spec.args, _MEMORY_SAVER)
        return spec.model_copy(update={"args": args, "env": env})

    def launch_hash(self, spec: ModelSpec) -> str:
        return self.launch_spec(spec).spec_hash()

    def sleep_calls(self, spec: ModelSpec) -> tuple[Call, ...]:
        # The release asserts an idle scheduler, and a failed assert kills the server. The waker sleeps only engines
        # it has no request in (drained), but a request a client abandoned may still be running in the engine:
        # /flush_cache succeeds only when the scheduler is fully idle (the release's own test), so it is repeated
        # until it does.
        return (Call("POST", "/flush_cache", retry=True),
                Call("POST", "/release_memory_occupation", {"tags": _released(spec)}))

    def wake_calls(self, spec: ModelSpec) -> tuple[Call, ...]:
        resume = Call("POST", "/resume_memory_occupation", {"tags": _released(spec)})
        if spec.sleep_level == 1:
            return (resume,)
        # The weights' memory is back but its contents were discarded: load them again, in place.
        return (resume, Call("POST", "/update_weights_from_disk", {"model_path": required_model(spec)}))

    def sleep_state_call(self, spec: ModelSpec) -> Call | None:
        return None

    def rank_argv(self, spec: ModelSpec, launch: Launch, nnodes: int, rank: int, dist_init_addr: str) -> list[str]:
        """launch_server as rank `rank` of `nnodes` (one per node), meeting at `dist_init_addr` (host:port
        of rank 0), the model split over all of them by tensor (`--tp-size`) or pipeline (`--pp-size`)."""
        user = spec.args
        split = _TENSOR if spec.multinode.parallel == "tensor" else _PIPELINE
        ours = option(user, _NNODES, str(nnodes)) + option(user, _NODE_RANK, str(rank))
        ours += option(user, _DIST_INIT, dist_init_addr) + option(user, split, str(nnodes))
        argv = self.argv(spec, launch)
        cut = len(argv) - len(user)
        return [*argv[:cut], *ours, *argv[cut:]]
