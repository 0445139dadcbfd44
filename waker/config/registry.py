"""The registry: every model in models.d, by name and alias, validated as a whole."""

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from waker.config.spec import ModelSpec, RuntimeKind
from waker.errors import ModelNotFound


class ConfigError(Exception):
    """models.d is invalid; `problems` lists each one as 'file: field: reason'."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid models.d:\n  " + "\n  ".join(problems))
        self.problems = problems


class Registry(Mapping[str, ModelSpec]):
    """Specs by canonical name; `resolve` also accepts aliases."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        self._routes: dict[str, str] = {}
        problems: list[str] = []
        for spec in specs:
            for name in spec.names:
                if name in self._routes:
                    first = self._specs[self._routes[name]]
                    problems.append(
                        f"{_where(spec)}: name {name!r} is already used by model {first.name!r} "
                        f"({_where(first)})"
                    )
                else:
                    self._routes[name] = spec.name
            self._specs.setdefault(spec.name, spec)
        problems += port_problems(self._specs.values())
        if problems:
            raise ConfigError(problems)

    def __getitem__(self, name: str) -> ModelSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def resolve(self, name: str) -> ModelSpec:
        """The spec that `name` (a model name or alias) routes to."""
        try:
            return self._specs[self._routes[name]]
        except KeyError:
            raise ModelNotFound(f"The model '{name}' does not exist", model=name) from None

    def routes(self) -> dict[str, str]:
        """Every name and alias, mapped to its model's canonical name."""
        return dict(self._routes)


def _where(spec: ModelSpec) -> str:
    return str(spec.source) if spec.source else "<inline>"


THIS_MACHINE = "(this machine)"  # where process engines and the gateway listen
_WILDCARDS = frozenset({"0.0.0.0", "::", "", "*"})


@dataclass(frozen=True, slots=True)
class Listener:
    """Where something listens: the machines it may run on (node names and THIS_MACHINE; None: any Docker node), an
    address, a port; `what` names it in a problem."""

    what: str
    machines: frozenset[str] | None
    host: str
    port: int


def listener(spec: ModelSpec, local_nodes: Collection[str] = ()) -> Listener | None:
    """Where the engine of an entry with an explicit `port` listens; None without one (a free port is picked) or for
    an external endpoint. A published container port is taken on every address of its node (the publish address is
    the node's, not the entry's); with `network: host` the engine binds `host` there."""
    if spec.port is None or spec.runtime is RuntimeKind.EXTERNAL:
        return None
    what = f"model {spec.name!r} ({_where(spec)})"
    if spec.runtime is RuntimeKind.PROCESS:
        return Listener(what, frozenset({THIS_MACHINE}), spec.host, spec.port)
    nodes = spec.candidate_nodes
    machines = None if nodes is None else frozenset(nodes) | (
        {THIS_MACHINE} if set(nodes) & set(local_nodes) else set())
    return Listener(what, machines, spec.host if spec.network == "host" else "0.0.0.0", spec.port)


def _same_machine(a: frozenset[str] | None, b: frozenset[str] | None, local_nodes: Collection[str]) -> bool:
    if a is None and b is None:
        return True
    if a is None or b is None:
        known = a if b is None else b
        assert known is not None
        # Any Docker node: it may land on each of `known`'s nodes, and on this machine where a node is local.
        return bool(known - {THIS_MACHINE}) or bool(local_nodes)
    return bool(a & b)


def _same_address(a: str, b: str) -> bool:
    a, b = ("127.0.0.1" if h == "localhost" else h for h in (a, b))
    return a == b or a in _WILDCARDS or b in _WILDCARDS


def port_problems(specs: Iterable[ModelSpec], local_nodes: Collection[str] = (),
                  gateway: tuple[str, int] | None = None) -> list[str]:
    """Entries whose explicit ports would meet: two engines on one port of one machine and address (0.0.0.0 meets
    every address), or an engine on the gateway's own (`gateway`: its host and port on this machine). The second
    engine could not bind, and the first would answer its readiness check and its requests.

    Without `local_nodes` (the registry alone) process engines are compared only with each other and containers
    only with each other; `gateway/config.py` passes the local Docker nodes, so a container on this machine meets
    the process engines too."""
    taken: list[Listener] = []
    if gateway is not None and gateway[1]:
        taken.append(Listener(f"the gateway itself ({gateway[0]}:{gateway[1]})", frozenset({THIS_MACHINE}),
                              gateway[0], gateway[1]))
    problems: list[str] = []
    for spec in specs:
        mine = listener(spec, local_nodes)
        if mine is None:
            continue
        for other in taken:
            if other.port == mine.port and _same_address(other.host, mine.host) and _same_machine(
                    other.machines, mine.machines, local_nodes):
                problems.append(f"{_where(spec)}: port: {mine.port} on {mine.host} is already taken by {other.what}: "
                                "one would answer for both; give it another port, or leave port out for a free one")
                break
        else:
            taken.append(mine)
    return problems


def load_file(path: Path) -> ModelSpec:
    """One models.d file; raises ConfigError naming the file, the field and the reason."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of fields (name: ..., engine: ...)"])
    try:
        return ModelSpec.model_validate({**data, "source": path})
    except ValidationError as exc:
        raise ConfigError([f"{path}: {_field(err['loc'])}: {err['msg']}" for err in exc.errors()]) from None


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(file)"


def load_dir(directory: Path) -> Registry:
    """Every *.yaml / *.yml directly in `directory`, as one registry; all problems reported at once."""
    if not directory.is_dir():
        raise ConfigError([f"{directory}: not a directory"])
    specs: list[ModelSpec] = []
    problems: list[str] = []
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    for path in files:
        try:
            specs.append(load_file(path))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    if not specs:
        raise ConfigError([f"{directory}: no model files (*.yaml) found"])
    return Registry(specs)
