"""Small argv helpers shared by the engine adapters.

The adapters add flags of their own (host, port, served name, memory) in front of the user's
`spec.args`. A user who passes one of those flags in `spec.args` means it: their value must win, and
the engine must not see the flag twice (argparse would silently keep the last one, click may refuse a
repeated option, and a repeated model positional breaks `vllm serve` outright). So every flag an
adapter adds goes through `option()`, which checks the user's args first.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from waker.config.args import has_flag
from waker.config.spec import ModelSpec
from waker.engines.base import Launch


def option(user_args: Sequence[str], names: Sequence[str], value: str) -> list[str]:
    """`[names[0], value]`, or nothing when the user already passed any spelling in `names`.

    `names[0]` is the spelling we emit; the rest are aliases the engine also accepts, listed so a user
    who writes the alias still overrides us.
    """
    if has_flag(user_args, names):
        return []
    return [names[0], value]


def required_model(spec: ModelSpec) -> str:
    """The weights argument, or a clear error: an engine we launch cannot start without one.

    ModelSpec only waives `model` for external runtimes, which are never launched; reaching here without
    one means a caller asked for argv it should not need.
    """
    if not spec.model:
        raise ValueError(f"model {spec.name!r}: engine {spec.engine} needs `model` to build a command line")
    return spec.model


@dataclass(frozen=True, slots=True)
class ServeFlags:
    """An engine's spellings of the flags every adapter sets: where to listen, the served name, and
    its memory fraction. The first spelling is the one emitted; the others are aliases users may write."""

    host: tuple[str, ...]
    port: tuple[str, ...]
    served_name: tuple[str, ...]
    memory: tuple[str, ...]

    def options(self, spec: ModelSpec, launch: Launch) -> list[str]:
        """Host, port, served name and (when set) the memory fraction, each unless the user set it."""
        user = spec.args
        argv = option(user, self.host, launch.host) + option(user, self.port, str(launch.port))
        argv += option(user, self.served_name, spec.upstream_name)
        if spec.gpu_memory_utilization is not None:
            argv += option(user, self.memory, str(spec.gpu_memory_utilization))
        return argv
