"""The registry: every model in models.d, by name and alias, validated as a whole."""

from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml
from pydantic import ValidationError

from waker.config.spec import ModelSpec
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
