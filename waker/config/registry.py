"""The registry: every model in models.d, by name and alias, validated as a whole."""

import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
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


def read_yaml(path: Path) -> object:
    """A YAML file we are configured by (a models.d file, the API keys file) parsed with the guards below: not UTF-8,
    too deep, an alias bomb, a key given twice, not a regular file: a ConfigError naming the file and why."""
    text = _text(path)
    try:
        return yaml.load(text, Loader=_ModelsLoader)  # a SafeLoader, with guards
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([f"{path}: {_yaml_problem(exc)}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    except RecursionError:  # the depth guard comes first; never a traceback for a config file
        raise ConfigError([f"{path}: nested too deeply"]) from None
    except ValueError as exc:  # PyYAML's int() of a number beyond Python's digit limit
        raise ConfigError([f"{path}: {exc}"]) from None


def load_file(path: Path) -> ModelSpec:
    """One models.d file; raises ConfigError naming the file, the field and the reason."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of fields (name: ..., engine: ...)"])
    try:
        return ModelSpec.model_validate({**data, "source": path})
    except ValidationError as exc:
        raise ConfigError([f"{path}: {_field(err['loc'])}: {err['msg']}" for err in exc.errors()]) from None


def _text(path: Path) -> str:
    """The file's text, or a ConfigError saying why it has none. Anything but a regular file is refused before it is
    opened (a FIFO named x.yaml would block the read for good); bytes that are not UTF-8 used to escape as a
    UnicodeDecodeError: a traceback from `sparkgate check`, a 500 from /admin/reload and a dead file watch
    (tests/unit/config/test_config_files.py)."""
    try:
        if path.is_symlink() and not path.exists():
            raise ConfigError([f"{path}: a symbolic link to {os.readlink(path)!r}, which leads to no file"])
        if path.is_dir():
            raise ConfigError([f"{path}: a directory, not a model file"])
        if not path.is_file():
            raise ConfigError([f"{path}: not a regular file (a FIFO, socket or device)"])
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: can't be read: {exc.strerror or exc}"]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{path}: not UTF-8 text: byte {data[exc.start]:#04x} on line {line} (offset "
                           f"{exc.start}); save the file as UTF-8"]) from None


MAX_DEPTH = 32
"""Nesting a models.d file may have (it needs 3: multinode.head_env.NAME); deeper YAML made PyYAML's recursive
composer hit Python's recursion limit."""
MAX_NODES = 100_000
"""Values a file may expand to, aliases counted as what they stand for: a "billion laughs" file of nested aliases
is a few lines that stand for 10^9 values."""
_MERGE = "tag:yaml.org,2002:merge"


class _Refused(yaml.YAMLError):
    """A YAML file the models.d loader will not take; the message names the line."""


class _ModelsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with guards for hand-written files: a key given twice in one mapping is an error (PyYAML
    keeps the last one silently, hiding a mistake the way an unknown key would: those are refused too), and the
    nesting and the size that aliases expand to are limited."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values it stands for; nodes live as long as the loader
        self._checked: set[int] = set()

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        mark = self.peek_event().start_mark
        alias = self.check_event(yaml.AliasEvent)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
            node: yaml.Node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias:
            if id(node) not in self._sizes:
                raise _Refused(f"line {mark.line + 1}: an alias inside the value it refers to")
            return node
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes[id(item)] for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._sizes[id(key)] + self._sizes[id(value)] for key, value in node.value)
        if size > MAX_NODES:
            raise _Refused(f"line {mark.line + 1}: stands for more than {MAX_NODES} values (aliases expanded)")
        self._sizes[id(node)] = size
        return node

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Every mapping passes here once before its merge keys (<<: *base) are folded in: only the keys written in
        # it are compared, since a written key may override a merged one.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            first: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise _Refused(f"line {line}: key {key!r} is given twice (first on line {first[key]}); "
                                       "YAML would keep only the last one")
                    first[key] = line
                except TypeError:  # unhashable: PyYAML refuses it itself
                    continue
        super().flatten_mapping(node)


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    """A YAML syntax error as 'line L, column C: what' (PyYAML's own text names '<unicode string>')."""
    mark = exc.problem_mark or exc.context_mark
    what = "; ".join(part for part in (exc.context, exc.problem) if part)
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else what


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(file)"


def load_dir(directory: Path) -> Registry:
    """Every model file in `directory` (see `model_files`), as one registry; all problems reported at once."""
    try:
        files = model_files(directory)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError([f"{directory}: not a directory"]) from None
    except OSError as exc:
        raise ConfigError([f"{directory}: can't be read: {exc.strerror or exc}"]) from None
    specs: list[ModelSpec] = []
    problems: list[str] = []
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


def model_files(directory: Path) -> list[Path]:
    """The entries of `directory` that are model files: every *.yaml and *.yml, except hidden ones (editors' lock and
    backup files, such as emacs's `.#name.yaml`, a symbolic link to nowhere by design). One that is not a readable
    file (a directory, a link to nothing) is an error when loaded; it used to be skipped without a word."""
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and not p.name.startswith("."))


Fingerprint = tuple[tuple[object, ...], ...]


def fingerprint(directory: Path) -> Fingerprint:
    """What the file watch compares between polls: each model file's name, and its link's and its target's inode,
    size and times (a file moved into place keeps its mtime but not its inode; a chmod moves only ctime), or the
    error that stat gave. Never raises: one link to nothing used to empty the whole fingerprint, so the watch saw
    no change any more (tests/unit/config/test_config_files.py)."""
    try:
        paths = model_files(directory)
    except OSError as exc:
        return (("", type(exc).__name__),)
    return tuple((p.name, _stat(p.lstat), _stat(p.stat)) for p in paths)


def _stat(stat: Callable[[], os.stat_result]) -> tuple[int, ...] | str:
    try:
        found = stat()
    except OSError as exc:
        return type(exc).__name__
    return found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_mode
