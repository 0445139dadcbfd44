"""models.d: durations, schema validation, and the registry's name rules."""

from pathlib import Path

import pytest

from waker.config.durations import format_duration, parse_duration
from waker.config.registry import ConfigError, load_dir
from waker.errors import ModelNotFound

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("20m", 1200), ("1h30m", 5400), ("250ms", 0.25), ("2d", 172800), (45, 45), ("1.5", 1.5),
    ("1m 30s", 90),
])
def test_durations_accept_human_forms(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "soon", "10x", "-5", "m10", True, None, "5s10"])
def test_durations_reject_what_is_not_one(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.05, 90, 3600, 5430)] == ["50ms", "1m30s", "1h", "1h30m30s"]


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


GOOD = "name: {name}\nengine: generic\ncommand: [python3, server.py, --port, '{{port}}']\n"


def test_loads_every_file_and_resolves_aliases(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD.format(name="alpha") + "aliases: [brain, chat]\nidle_timeout: 20m\n")
    write(tmp_path, "b.yml", GOOD.format(name="beta"))
    write(tmp_path, "notes.txt", "not a model")
    registry = load_dir(tmp_path)
    assert sorted(registry) == ["alpha", "beta"]
    assert registry.resolve("brain").name == "alpha"
    assert registry["alpha"].idle_timeout == 1200
    assert registry.routes() == {"alpha": "alpha", "brain": "alpha", "chat": "alpha", "beta": "beta"}
    with pytest.raises(ModelNotFound):
        registry.resolve("gamma")


def test_invalid_file_names_file_field_and_reason(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", GOOD.format(name="x") + "idle_timeout: soon\nmemory_gb: -3\n")
    with pytest.raises(ConfigError) as err:
        load_dir(tmp_path)
    text = str(err.value)
    assert f"{bad}: idle_timeout: " in text and "'soon' is not a duration" in text
    assert f"{bad}: memory_gb: " in text and "greater than or equal to 0" in text


def test_unknown_field_is_an_error_not_ignored(tmp_path: Path) -> None:
    write(tmp_path, "typo.yaml", GOOD.format(name="x") + "idle_timout: 5m\n")
    with pytest.raises(ConfigError, match="idle_timout: Extra inputs are not permitted"):
        load_dir(tmp_path)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    write(tmp_path, "one.yaml", "name: [not, a, string]\n")
    write(tmp_path, "two.yaml", "engine: vllm\nname: v\n")
    write(tmp_path, "three.yaml", "::: not yaml :::\n  - [")
    with pytest.raises(ConfigError) as err:
        load_dir(tmp_path)
    assert len(err.value.problems) >= 3
    assert any("two.yaml" in p and "needs model" in p for p in err.value.problems)
    assert any("three.yaml" in p for p in err.value.problems)


@pytest.mark.parametrize(("extra", "reason"), [
    ("runtime: external\n", "runtime external needs url"),
    ("runtime: docker\n", "runtime docker needs image"),
    ("url: http://x/v1\n", "url is only for runtime external"),
    ("aliases: [x]\n", "repeats the model's own name"),
    ("health_path: health\n", "must start with /"),
    ("gpu_memory_utilization: 1.5\n", "less than or equal to 1"),
])
def test_runtime_and_field_rules(tmp_path: Path, extra: str, reason: str) -> None:
    write(tmp_path, "m.yaml", GOOD.format(name="x") + extra)
    with pytest.raises(ConfigError, match=reason):
        load_dir(tmp_path)


def test_generic_process_model_needs_a_command(tmp_path: Path) -> None:
    write(tmp_path, "m.yaml", "name: x\n")
    with pytest.raises(ConfigError, match="needs command"):
        load_dir(tmp_path)


def test_duplicate_names_and_aliases_are_errors(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD.format(name="alpha") + "aliases: [shared]\n")
    write(tmp_path, "b.yaml", GOOD.format(name="beta") + "aliases: [shared]\n")
    write(tmp_path, "c.yaml", GOOD.format(name="alpha"))
    with pytest.raises(ConfigError) as err:
        load_dir(tmp_path)
    assert any("'shared' is already used by model 'alpha'" in p for p in err.value.problems)
    assert any("'alpha' is already used by model 'alpha'" in p for p in err.value.problems)


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no model files"):
        load_dir(tmp_path)


def test_bundled_models_d_is_valid() -> None:
    registry = load_dir(REPO / "models.d")
    assert len(registry) >= 1


def test_spec_hash_changes_with_what_shapes_the_engine_only(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD.format(name="alpha"))
    before = load_dir(tmp_path)["alpha"].spec_hash()
    write(tmp_path, "a.yaml", GOOD.format(name="alpha") + "idle_timeout: 1h\n")
    assert load_dir(tmp_path)["alpha"].spec_hash() == before
    write(tmp_path, "a.yaml", GOOD.format(name="alpha") + "args: [--ctx, '4096']\n")
    assert load_dir(tmp_path)["alpha"].spec_hash() != before
