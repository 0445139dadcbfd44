"""`sparkgate check`'s fit check end to end: the tables it prints, its exit status (2 when a model will not start, alone
or in a --together group), --node-total, and the warning a starting gateway logs."""

# ruff: noqa: RUF001 - the issue and the check write the engines' arithmetic with a multiplication sign
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.config import load, load_models
from tests.checkpoints import GIB, GPT_OSS_120B, QWEN3_4B_INSTRUCT_2507, hf_cache_repo
from tests.harness import write_models as models
from waker import compose
from waker.config.machine import MemoryReading

SPARK = '{"local": {"total_gb": 121.7, "unified_memory": true}}'
REASON = ("weights 61.0 GiB + KV for one 131072-token request 4.5 GiB + overhead 2 GiB > 0.55 × 119.6 GiB = "
          "65.8 GiB")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("SPARKGATE_NODES", "DOCKER_HOST", "SPARKGATE_CONFIG_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SPARKGATE_STATS_DB", str(tmp_path / "stats.sqlite3"))


@pytest.fixture
def hf(tmp_path: Path) -> Path:
    """A host HF cache with gpt-oss-120b (61.0 GiB) and Qwen3-4B-Instruct-2507 (7.5 GiB) downloaded."""
    home = tmp_path / "hf"
    hf_cache_repo(home / "hub", "openai/gpt-oss-120b", GPT_OSS_120B, 15, int(61.0 * GIB))
    hf_cache_repo(home / "hub", "Qwen/Qwen3-4B-Instruct-2507", QWEN3_4B_INSTRUCT_2507, 1, int(7.5 * GIB))
    return home


def brain(hf: Path, fraction: float, memory_gb: float) -> dict[str, Any]:
    return {"name": "gpt-oss-120b", "aliases": ["brain"], "engine": "vllm", "runtime": "docker", "image": "vllm",
            "model": "openai/gpt-oss-120b", "args": ["--max-model-len", "131072"],
            "gpu_memory_utilization": fraction, "memory_gb": memory_gb,
            "volumes": [f"{hf}:/root/.cache/huggingface"]}


def utility(hf: Path, fraction: float, memory_gb: float) -> dict[str, Any]:
    return {"name": "qwen3-4b-utility", "aliases": ["utility"], "engine": "sglang", "runtime": "docker",
            "image": "sglang", "model": "Qwen/Qwen3-4B-Instruct-2507", "args": ["--context-length", "32768"],
            "gpu_memory_utilization": fraction, "memory_gb": memory_gb,
            "volumes": [f"{hf}:/root/.cache/huggingface"]}


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["check", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table(out: str, heading: str) -> list[list[str]]:
    """The rows of the fit table under `heading` (cells split on two spaces or more)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Fit check, " + heading))
    rows = []
    for line in lines[start + 2:]:
        if not line or line.startswith("  "):
            break
        rows.append([cell.strip() for cell in line.split("  ") if cell.strip()])
    return rows


def test_check_exits_2_when_a_model_will_not_start_and_prints_the_arithmetic(
        tmp_path: Path, hf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARKGATE_NODES", SPARK)
    code, out, err = check(capsys, "--config-dir", str(models(tmp_path / "m", brain(hf, 0.55, 74))))
    assert code == 2
    assert "Fit check, alone on node 'local': 121.7 GiB, CUDA total 119.6 GiB (GiB):" in out
    assert table(out, "alone") == [["gpt-oss-120b", "vllm", "61.0", "4.5 (131072)", "2.0", "67.5", "65.8", "74",
                                    "WILL NOT START"]]
    assert f"  gpt-oss-120b: WILL NOT START: {REASON}" in out.splitlines()
    assert "gpt-oss-120b: warning: will not start" not in out  # the table says it; the notes don't repeat it
    assert "sparkgate: fit check: gpt-oss-120b will not start" in err


def test_check_exits_0_when_every_model_fits_or_cant_be_told(
        tmp_path: Path, hf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARKGATE_NODES", SPARK)
    missing = {**brain(tmp_path / "empty", 0.7, 86), "name": "not-here", "aliases": []}
    code, out, err = check(capsys, "--config-dir", str(models(tmp_path / "m", brain(hf, 0.7, 86), missing)))
    assert code == 0, err
    rows = {row[0]: row for row in table(out, "alone")}
    assert rows["gpt-oss-120b"][-1] == "FITS" and rows["gpt-oss-120b"][6] == "83.7"
    assert rows["not-here"][-1] == "CAN'T TELL"
    assert any(line.startswith("  not-here: CAN'T TELL: weights not downloaded yet: no ") for line in out.splitlines())


def test_node_total_checks_a_spark_from_a_smaller_machine(
        tmp_path: Path, hf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compose, "read_local_memory",
                        lambda: MemoryReading(31.2, False, "/proc/meminfo MemTotal (no GPU: no NVIDIA driver)"))
    directory = models(tmp_path / "m", brain(hf, 0.55, 74))
    code, _, err = check(capsys, "--config-dir", str(directory))
    assert code == 2 and "needs 74 GB but node 'local' has a budget of 23.2" in err  # this laptop: refused as before
    code, out, _ = check(capsys, "--config-dir", str(directory), "--node-total", "121.7")
    assert code == 2
    assert out.splitlines()[1].split()[:2] == ["local", "121.7"]
    assert f"  gpt-oss-120b: WILL NOT START: {REASON}" in out.splitlines()


def test_together_checks_each_member_started_last_and_exits_2_when_one_will_not_start(
        tmp_path: Path, hf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARKGATE_NODES", SPARK)
    directory = models(tmp_path / "m", brain(hf, 0.7, 86), utility(hf, 0.08, 12))
    code, out, _ = check(capsys, "--config-dir", str(directory))
    assert code == 0  # alone, the utility model starts (with its context cut: a warning)
    assert {row[0]: row[-1] for row in table(out, "alone")} == {"gpt-oss-120b": "FITS",
                                                                 "qwen3-4b-utility": "CONTEXT CUT"}
    code, out, err = check(capsys, "--config-dir", str(directory), "--together", "brain,utility")
    assert code == 2
    heading = "together on node 'local': gpt-oss-120b, qwen3-4b-utility (memory_gb 98 of a 113.7 GiB budget)"
    assert {row[0]: row[-1] for row in table(out, heading)} == {"gpt-oss-120b": "FITS",
                                                                "qwen3-4b-utility": "WILL NOT START"}
    assert ("  qwen3-4b-utility: WILL NOT START: weights 7.5 GiB > 0.08 × 33.6 GiB free at launch (beside "
            "gpt-oss-120b: 119.6 - 86) = 2.7 GiB: no room for the KV pool (SGLang: 'Not enough memory')"
            in out.splitlines())
    assert "qwen3-4b-utility will not start" in err


def test_together_refuses_an_unknown_name_and_reports_a_group_over_the_budget(
        tmp_path: Path, hf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARKGATE_NODES", SPARK)
    twin = {**brain(hf, 0.7, 86), "name": "twin", "aliases": []}
    directory = models(tmp_path / "m", brain(hf, 0.7, 86), twin)
    code, _, err = check(capsys, "--config-dir", str(directory), "--together", "brain,nobody")
    assert code == 2 and "--together brain,nobody: no model or alias 'nobody'" in err
    code, out, err = check(capsys, "--config-dir", str(directory), "--together", "brain,twin")
    assert code == 2
    assert ("  local: memory_gb 172 > the node's budget 113.7 GiB (121.7 - reserve 8): the scheduler never runs "
            "them together") in out.splitlines()
    assert "1 group(s) exceed the budget" in err


def test_the_help_states_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["check", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 when models.d is valid and no checked model will not start" in text
    assert "2 when models.d is invalid, a model WILL NOT START alone or in a --together group" in text


def test_a_starting_gateway_warns_about_a_model_that_will_not_start_and_still_loads_it(
        tmp_path: Path, hf: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SPARKGATE_NODES", SPARK)
    directory = models(tmp_path / "m", brain(hf, 0.55, 74))
    nodes = compose.resolve_nodes({"local": compose.LOCAL["local"].model_copy(
        update={"total_gb": 121.7, "unified_memory": True})})
    assert f"will not start (alone on node 'local': 121.7 GiB, CUDA total 119.6 GiB): {REASON}" in load(
        directory, None, nodes).warnings["gpt-oss-120b"]
    with caplog.at_level(logging.WARNING, logger="sparkgate.config"):
        registry = load_models(directory, None, nodes)
    assert registry["gpt-oss-120b"].gpu_memory_utilization == 0.55  # a warning, not a refusal
    assert "models.d: gpt-oss-120b: will not start (alone on node 'local'" in caplog.text
    assert REASON in caplog.text
