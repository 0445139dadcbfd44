"""models.d files that are not what a model file should be: every one is a ConfigError naming the file and why
(bytes that are not UTF-8, nesting, alias bombs, directories, links to nothing, unreadable files), keys given twice
are refused at any level, environment names and durations are checked, and the file watch's fingerprint sees
changes next to a link to nothing. Each test here failed before its fix."""

import os
from pathlib import Path

import pytest
import yaml

from waker.config.durations import parse_duration
from waker.config.registry import ConfigError, load_dir
from waker.config.spec import ModelSpec

GOOD = "name: {name}\nengine: generic\ncommand: [python3, server.py]\n"


def write(directory: Path, name: str, text: str | bytes) -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def problems(directory: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_dir(directory)
    return err.value.problems


def test_a_file_that_is_not_utf8_is_a_config_error_naming_the_file_and_the_line(tmp_path: Path) -> None:
    # It used to escape as UnicodeDecodeError: `sparkgate check` printed a traceback, /admin/reload answered 500.
    write(tmp_path, "good.yaml", GOOD.format(name="good"))
    bad = write(tmp_path, "latin1.yaml", GOOD.format(name="x").encode() + "# café\n".encode("latin-1"))
    assert problems(tmp_path) == [f"{bad}: not UTF-8 text: byte 0xe9 on line 4 (offset 59); save the file as UTF-8"]


def test_yaml_nested_too_deeply_is_a_config_error_not_a_recursion_error(tmp_path: Path) -> None:
    bad = write(tmp_path, "deep.yaml", GOOD.format(name="x") + "args: " + "[" * 2000 + "]" * 2000 + "\n")
    [problem] = problems(tmp_path)
    assert problem.startswith(f"{bad}: line 4: nested deeper than")


def test_a_billion_laughs_file_is_refused_before_anything_walks_it(tmp_path: Path) -> None:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bad = write(tmp_path, "bomb.yaml", GOOD.format(name="x") + "\n".join(lines) + "\n")
    [problem] = problems(tmp_path)
    assert problem.startswith(f"{bad}: line ") and "aliases expanded" in problem


def test_an_alias_inside_its_own_value_is_refused(tmp_path: Path) -> None:
    bad = write(tmp_path, "loop.yaml", GOOD.format(name="x") + "args: &a [*a]\n")
    assert problems(tmp_path) == [f"{bad}: line 4: an alias inside the value it refers to"]


def test_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    write(tmp_path, "m.yaml", "command: &cmd [python3, server.py]\nname: m\nargs: *cmd\n"
          "ulimits: {memlock: &one {soft: 1, hard: 2}, stack: {<<: *one, hard: 3}}\n")
    spec = load_dir(tmp_path)["m"]
    assert spec.args == ("python3", "server.py")
    assert spec.ulimits["stack"].model_dump() == {"soft": 1, "hard": 3}  # a written key overrides a merged one


def test_a_directory_named_like_a_model_file_is_an_error_not_skipped(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", GOOD.format(name="good"))
    (tmp_path / "old.yaml").mkdir()
    assert problems(tmp_path) == [f"{tmp_path / 'old.yaml'}: a directory, not a model file"]


def test_a_link_to_nothing_is_an_error_naming_its_target(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", GOOD.format(name="good"))
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "elsewhere" / "gone.yaml")
    target = tmp_path / "elsewhere" / "gone.yaml"
    assert problems(tmp_path) == [f"{tmp_path / 'gone.yaml'}: a symbolic link to '{target}', which leads to no file"]


def test_a_fifo_is_refused_without_being_opened(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", GOOD.format(name="good"))
    os.mkfifo(tmp_path / "pipe.yaml")  # opening it would block the load for good
    assert problems(tmp_path) == [f"{tmp_path / 'pipe.yaml'}: not a regular file (a FIFO, socket or device)"]


def test_an_unreadable_file_is_an_error_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (chmod 000 is no obstacle to root, who may run the tests: the refusal is simulated.)
    bad = write(tmp_path, "secret.yaml", GOOD.format(name="x"))
    real = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path == bad:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert problems(tmp_path) == [f"{bad}: can't be read: Permission denied"]


def test_hidden_files_such_as_editor_locks_are_not_model_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD.format(name="a"))
    (tmp_path / ".#a.yaml").symlink_to("me@host.1234:1700000000")  # emacs's lock: a link to nowhere by design
    write(tmp_path, ".a.yaml.swp", b"\xff\xfe")
    assert list(load_dir(tmp_path)) == ["a"]


@pytest.mark.parametrize(("text", "line", "key"), [
    ("name: x\nengine: generic\ncommand: [a]\nname: y\n", 4, "name"),  # the top level
    (GOOD.format(name="x") + "env:\n  A: '1'\n  B: '2'\n  A: '3'\n", 7, "A"),  # nested
    (GOOD.format(name="x") + "ulimits: {memlock: -1, memlock: 0}\n", 4, "memlock"),  # flow style, one line
    (GOOD.format(name="x") + "multinode:\n  head_env:\n    X: a\n    X: b\n", 7, "X"),  # two levels down
])
def test_a_key_given_twice_is_refused_with_its_line(tmp_path: Path, text: str, line: int, key: str) -> None:
    # PyYAML kept the last one silently: `name` given twice served the model under the second name.
    bad = write(tmp_path, "m.yaml", text)
    [problem] = problems(tmp_path)
    assert problem.startswith(f"{bad}: line {line}: key {key!r} is given twice (first on line ")


def test_yaml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    bad = write(tmp_path, "m.yaml", GOOD.format(name="x") + "args: [a, b\n")
    [problem] = problems(tmp_path)
    assert problem.startswith(f"{bad}: line 5, column 1: ") and "<unicode string>" not in problem


@pytest.mark.parametrize(("env", "reason"), [
    ({"A=B": "x"}, "'A=B' is not an environment variable name"),
    ({"": "x"}, "'' is not an environment variable name"),
    ({"9LIVES": "x"}, "'9LIVES' is not an environment variable name"),
    ({"A B": "x"}, "'A B' is not an environment variable name"),
    ({"A\0": "x"}, "is not an environment variable name"),
    ({"A": "x\0y"}, "the value of A holds a NUL character"),
])
def test_environment_names_and_values_a_process_can_take(tmp_path: Path, env: dict[str, str], reason: str) -> None:
    # They used to pass validation and fail every start of the engine.
    bad = write(tmp_path, "m.yaml", GOOD.format(name="x") + yaml.safe_dump({"env": env}))
    [problem] = problems(tmp_path)
    assert problem.startswith(f"{bad}: env: ") and reason in problem
    write(tmp_path, "m.yaml", "name: x\nengine: vllm\nruntime: docker\nimage: i\nmodel: m\nnodes: 2\nnode: [a, b]\n"
          "network: host\n" + yaml.safe_dump({"multinode": {"worker_env": env}}))
    [problem] = problems(tmp_path)
    assert f"{bad}: multinode.worker_env: " in problem and reason in problem


def test_usual_environment_names_pass() -> None:
    spec = ModelSpec.model_validate({"name": "x", "command": ["a"], "env": {"HF_HUB_OFFLINE": "1", "_x9": "",
                                                                             "lower_case": "a=b c"}})
    assert spec.env["lower_case"] == "a=b c"


def test_arguments_with_a_nul_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "m.yaml", GOOD.format(name="x") + 'args: ["--x\\0"]\n')
    [problem] = problems(tmp_path)
    assert "args: " in problem and "NUL" in problem


def test_a_name_with_a_trailing_newline_is_not_a_name(tmp_path: Path) -> None:
    write(tmp_path, "m.yaml", 'name: "x\\n"\nengine: generic\ncommand: [a]\n')
    [problem] = problems(tmp_path)
    assert "name: " in problem and "is not a valid model name" in problem


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "infinity", "1e400", ".nan", ".inf", "-.inf",
                                   "1" + "0" * 400, "9" * 400 + "s", "-5"])
def test_durations_are_finite_and_not_negative(tmp_path: Path, value: str) -> None:
    # idle_timeout: nan meant never: nothing compares greater than nan.
    bad = write(tmp_path, "m.yaml", GOOD.format(name="x") + f"idle_timeout: {value}\n")
    [problem] = problems(tmp_path)
    assert problem.startswith(f"{bad}: idle_timeout: ")
    assert "finite number of seconds" in problem or "cannot be negative" in problem


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", "inf", 10 ** 400])
def test_parse_duration_refuses_what_is_not_finite(value: object) -> None:
    with pytest.raises(ValueError, match="finite number of seconds"):
        parse_duration(value)


@pytest.mark.parametrize("field", ["memory_gb: .inf", "sleep_memory_gb: .inf", "memory_gb: .nan"])
def test_floats_in_models_d_are_finite(tmp_path: Path, field: str) -> None:
    write(tmp_path, "m.yaml", GOOD.format(name="x") + field + "\n")
    [problem] = problems(tmp_path)
    assert problem.endswith("Input should be a finite number")


def test_the_watch_fingerprint_sees_changes_next_to_a_link_to_nothing(tmp_path: Path) -> None:
    # One dangling *.yaml link made the whole fingerprint empty: no later change was seen.
    from waker.config.registry import fingerprint

    write(tmp_path, "a.yaml", GOOD.format(name="a"))
    (tmp_path / "gone.yaml").symlink_to("nowhere.yaml")
    before = fingerprint(tmp_path)
    assert [entry[0] for entry in before] == ["a.yaml", "gone.yaml"]
    write(tmp_path, "a.yaml", GOOD.format(name="a") + "idle_timeout: 5m\n")
    assert fingerprint(tmp_path) != before
    changed = fingerprint(tmp_path)
    write(tmp_path, "nowhere.yaml", GOOD.format(name="b"))  # the link now leads somewhere
    assert fingerprint(tmp_path) != changed


def test_the_watch_fingerprint_sees_a_file_moved_into_place_and_a_chmod(tmp_path: Path) -> None:
    from waker.config.registry import fingerprint

    path = write(tmp_path, "a.yaml", GOOD.format(name="a"))
    spare = write(tmp_path, "a.tmp", GOOD.format(name="b"))
    os.utime(spare, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))  # same size, same mtime
    before = fingerprint(tmp_path)
    spare.replace(path)
    moved = fingerprint(tmp_path)
    assert moved != before
    path.chmod(0o600)
    assert fingerprint(tmp_path) != moved


def test_the_watch_fingerprint_of_a_missing_directory_does_not_raise(tmp_path: Path) -> None:
    from waker.config.registry import fingerprint

    assert fingerprint(tmp_path / "nope") == (("", "FileNotFoundError"),)
