"""SGLang adapter: `python3 -m sglang.launch_server --model-path <model>` plus our flags.

Flag sources:
- Server arguments: https://docs.sglang.io/advanced_features/server_arguments.html
  (repo: docs/advanced_features/server_arguments.md): `--model-path` (alias `--model`), `--host`,
  `--port`, `--served-model-name`, `--mem-fraction-static` (fraction of memory for static allocation:
  weights plus the KV cache pool; the closest match to our gpu_memory_utilization).
- Native APIs: https://docs.sglang.io/basic_usage/native_api.html (repo: docs/basic_usage/native_api.md):
  `/health` and `/health_generate`. We probe `/health`: `/health_generate` runs a generation on every
  poll, which is load we do not want while waiting for startup.
- Several nodes (docs/references/multi_node_deployment): the same launch_server on every node with
  `--nnodes N --node-rank i --dist-init-addr <rank 0's address>:<port>` and the parallel size over all of
  them, `--tp-size` (alias `--tensor-parallel-size`) or `--pp-size` (alias `--pipeline-parallel-size`;
  server_args.py). Rank 0 serves HTTP; ranks >= 1 answer only a dummy `/health` on their --host/--port.
- Prometheus metrics: `GET /metrics`, served only when the server was started with `--enable-metrics`
  (https://docs.sglang.io/references/production_metrics.html); we add no flag for it, the user may.

Sleep mode (python/sglang/srt/entrypoints/http_server.py): started with `--enable-memory-saver`;
`POST /release_memory_occupation` and `POST /resume_memory_occupation`, JSON body `{}` (all tags).
It must only be called on an idle engine (releasing under load aborts the engine): the waker only
puts idle models to sleep. SGLang has no route that tells whether it sleeps.
"""

from waker.config.spec import EngineKind, IdleAction, ModelSpec
from waker.engines.base import Call, Launch, Readiness
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


class SglangEngine:
    """Builds SGLang launch_server command lines.

    Launcher: `python3 -m sglang.launch_server` by default. A `spec.command` replaces exactly that part
    (e.g. `["sglang", "serve"]` or a venv's python with `-m sglang.launch_server`); `--model-path
    <model>` is appended after it either way, unless the user's args already name the model.
    """

    kind: str = EngineKind.SGLANG.value
    supports_sleep: bool = True
    metrics_path: str | None = "/metrics"

    def argv(self, spec: ModelSpec, launch: Launch) -> list[str]:
        model = required_model(spec)
        user = spec.args
        argv = list(spec.command) if spec.command else ["python3", "-m", "sglang.launch_server"]
        argv += option(user, _MODEL, model)
        return [*argv, *_FLAGS.options(spec, launch), *user]

    def readiness(self, spec: ModelSpec) -> Readiness:
        return Readiness(path=spec.health_path or "/health")

    def launch_spec(self, spec: ModelSpec) -> ModelSpec:
        """With idle_action sleep: `--enable-memory-saver` (unless the user passed it)."""
        if spec.idle_action is not IdleAction.SLEEP:
            return spec
        args = spec.args if _MEMORY_SAVER in spec.args else (*spec.args, _MEMORY_SAVER)
        return spec.model_copy(update={"args": args})

    def launch_hash(self, spec: ModelSpec) -> str:
        return self.launch_spec(spec).spec_hash()

    def sleep_calls(self, spec: ModelSpec) -> tuple[Call, ...]:
        return (Call("POST", "/release_memory_occupation", {}),)

    def wake_calls(self, spec: ModelSpec) -> tuple[Call, ...]:
        return (Call("POST", "/resume_memory_occupation", {}),)

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
