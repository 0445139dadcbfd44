"""The example catalog (models.d/examples): it loads, fits the default budget, routes every role
alias, and every entry builds a sane engine command line."""

import os
from pathlib import Path

import pytest

from gateway.cli import main
from waker.config.registry import Registry, load_dir
from waker.config.spec import ModelSpec, RuntimeKind
from waker.engines.base import Launch
from waker.engines.registry import engine_for
from waker.scheduling.budget import Budget
from waker.scheduling.placement import budget_problems

EXAMPLES = Path(__file__).resolve().parents[3] / "models.d" / "examples"
ROLES = ("brain", "chat", "coder", "autocomplete", "utility", "embed")
LAUNCH = Launch("0.0.0.0", 8000)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_dir(EXAMPLES)


def _flags(argv: list[str]) -> list[str]:
    """Every option in argv (`--flag value` or `--flag=value`), as written; values are skipped."""
    return [arg.split("=", 1)[0] for arg in argv if arg.startswith("-") and not _is_number(arg)]


def _is_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True


def test_catalog_loads_and_fits_the_default_budget(registry: Registry) -> None:
    assert len(registry) >= 7
    assert budget_problems(registry.values(), {"local": Budget()}) == []
    for spec in registry.values():
        assert 0 < spec.memory_gb <= Budget().capacity_gb, spec.name


@pytest.mark.parametrize("role", ROLES)
def test_each_role_alias_resolves(registry: Registry, role: str) -> None:
    spec = registry.resolve(role)
    assert role in spec.aliases


def test_every_entry_runs_in_docker_with_what_gb10_needs(registry: Registry) -> None:
    for spec in registry.values():
        assert spec.runtime is RuntimeKind.DOCKER, spec.name
        assert spec.image, spec.name
        assert spec.gpus == "all", spec.name
        assert spec.start_timeout >= 180, spec.name


def test_the_120b_has_a_long_start_timeout_and_the_20b_sleeps_at_level_2(registry: Registry) -> None:
    brain = registry.resolve("brain")
    assert brain.start_timeout >= 15 * 60
    chat = registry.resolve("chat")
    assert chat.idle_action == "sleep"
    assert chat.sleep_level == 2
    assert chat.sleep_memory_gb is not None and chat.sleep_memory_gb < chat.memory_gb


def test_memory_fractions_agree_with_memory_gb(registry: Registry) -> None:
    # On unified memory the fraction is of the whole 128 GB pool; memory_gb must cover it. (trtllm's
    # fraction is of the memory left free after its weights, so it is bounded by the same figure.)
    for spec in registry.values():
        if spec.gpu_memory_utilization is not None:
            assert spec.gpu_memory_utilization * Budget().total_gb <= spec.memory_gb + 1, spec.name


@pytest.mark.parametrize("name", sorted(os.path.splitext(p.name)[0] for p in EXAMPLES.glob("*.yaml")))
def test_argv_names_the_model_once_and_repeats_no_flag(registry: Registry, name: str) -> None:
    spec = next(s for s in registry.values() if s.source is not None and s.source.stem == name)
    argv = engine_for(spec.engine).argv(spec, LAUNCH)
    assert spec.upstream_name in argv
    assert argv.count(spec.model) == 1
    flags = _flags(argv)
    assert len(flags) == len(set(flags)), f"{spec.name}: repeated flag in {argv}"
    assert "0.0.0.0" in argv and "8000" in argv


def test_aliases_are_unique_across_files(registry: Registry) -> None:
    names = [n for spec in registry.values() for n in spec.names]
    assert len(names) == len(set(names))
    assert all(isinstance(spec, ModelSpec) for spec in registry.values())


def test_sparkgate_check_accepts_the_catalog(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SPARKGATE_"):
            monkeypatch.delenv(key)
    # The catalog is for a DGX Spark: on a smaller machine (the node's total is read from it) the big models can't fit.
    monkeypatch.setenv("SPARKGATE_NODES", '{"local": {"total_gb": 128, "unified_memory": true}}')
    assert main(["check", "--config-dir", str(EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert "model(s) OK" in out
    for role in ROLES:
        assert role in out
