"""Every example in models.d/examples passes the fit check on a 121.7 GiB DGX Spark: alone, and in the combinations
the quick start recommends (its `sparkgate check --together` groups), with a checkpoint of the real size and
architecture on disk for each (sparse files: tests/checkpoints.py).

The example files are read as they are, after the quick start's own edit (`sed "s|/home/YOU|$HOME|g"`), with HOME
set to a temporary directory where the weights are laid out as `hf download` leaves them. Sizes (the research file
dgx-spark-catalog.md): gpt-oss-120b ~60.8 GiB of checkpoint files (~61 GiB once loaded), gpt-oss-20b 13.8 GB,
Qwen3-Coder-30B-A3B-FP8 ~31 GB, Qwen3-4B-Instruct-2507 (bf16) ~7.5 GiB, Qwen3-Embedding-0.6B ~1.2 GB,
Llama-3.1-8B FP4 ~6 GB, qwen2.5-coder-1.5b q8_0 ~1.6 GB.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from tests.checkpoints import (
    GIB,
    GPT_OSS_20B,
    GPT_OSS_120B,
    LLAMA_3_1_8B,
    QWEN2_5_CODER_1_5B_GGUF,
    QWEN3_4B_INSTRUCT_2507,
    QWEN3_CODER_30B_A3B_FP8,
    QWEN3_EMBEDDING_0_6B,
    WHISPER_LARGE_V3_TURBO,
    hf_cache_repo,
    write_gguf,
)
from waker.config.checkpoint import host_path, hub_cache, weights_argument
from waker.config.registry import load_dir

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "models.d" / "examples"
QUICKSTART = REPO / "docs" / "quickstart-dgx-spark.md"

# (a piece of the model id or GGUF file name, lowercase) -> (config or GGUF metadata, shards, bytes on disk)
CHECKPOINTS: list[tuple[str, dict[str, Any], int, int]] = [
    ("gpt-oss-120b", GPT_OSS_120B, 15, int(60.8 * GIB)),
    ("gpt-oss-20b", GPT_OSS_20B, 3, int(13.8e9)),
    ("qwen3-coder-30b-a3b", QWEN3_CODER_30B_A3B_FP8, 4, int(31e9)),
    ("qwen3-4b-instruct-2507", QWEN3_4B_INSTRUCT_2507, 3, int(7.5 * GIB)),
    ("qwen3-embedding-0.6b", QWEN3_EMBEDDING_0_6B, 1, int(1.2e9)),
    ("llama-3.1-8b", LLAMA_3_1_8B, 2, int(6e9)),
    ("qwen2.5-coder-1.5b", QWEN2_5_CODER_1_5B_GGUF, 1, int(1.6e9)),
    ("whisper-large-v3-turbo", WHISPER_LARGE_V3_TURBO, 1, int(1.62e9)),
]


def _checkpoint_for(model: str) -> tuple[dict[str, Any], int, int]:
    for piece, config, shards, size in CHECKPOINTS:
        if piece in model.lower():
            return config, shards, size
    raise AssertionError(f"no synthetic checkpoint for {model!r}: add one to CHECKPOINTS")


@pytest.fixture
def spark_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The examples as the quick start installs them, with every model's weights downloaded under a fresh HOME."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for key in list(os.environ):
        if key.startswith("SPARKGATE_") or key in ("DOCKER_HOST", "HF_HOME", "HF_HUB_CACHE"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SPARKGATE_STATS_DB", str(tmp_path / "stats.sqlite3"))
    directory = tmp_path / "models.d"
    directory.mkdir()
    for example in EXAMPLES.glob("*.yaml"):
        (directory / example.name).write_text(example.read_text().replace("/home/YOU", str(home)))
    for spec in load_dir(directory).values():
        if spec.engine == "service":  # ComfyUI (comfyui.yaml) loads its own checkpoints: the fit check skips services
            continue
        model = weights_argument(spec)
        assert model is not None
        config, shards, size = _checkpoint_for(model)
        if model.endswith(".gguf"):
            write_gguf(host_path(spec, model), config, size)
            continue
        cache = hub_cache(spec, {})
        assert cache is not None, f"{spec.name}: no volume for the Hugging Face cache"
        hf_cache_repo(cache, model, config, shards, size)
    return directory


def _groups() -> list[str]:
    """The --together groups the quick start recommends (its `sparkgate check` command)."""
    groups = re.findall(r"--together\s+([\w.,-]+)", QUICKSTART.read_text())
    assert groups, f"{QUICKSTART} recommends no --together group"
    return groups


def _tables(out: str) -> dict[str, list[list[str]]]:
    """Each fit table's rows, by its heading."""
    tables: dict[str, list[list[str]]] = {}
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Fit check, "):
            rows = []
            for row in lines[i + 2:]:
                if not row or row.startswith("  "):
                    break
                rows.append([cell.strip() for cell in row.split("  ") if cell.strip()])
            tables[line] = rows
    return tables


def test_every_example_fits_a_spark_alone_and_in_the_quickstarts_combinations(
        spark_models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check", "--config-dir", str(spark_models), "--node-total", "121.7"]
    for group in _groups():
        argv += ["--together", group]
    code = cli.main(argv)
    captured = capsys.readouterr()
    print(captured.out)  # the tables, for the record (pytest -s)
    tables = _tables(captured.out)
    assert len(tables) == 1 + len(_groups()), captured.out
    alone = next(rows for heading, rows in tables.items() if "alone on node 'local': 121.7 GiB" in heading)
    assert len(alone) == len([s for s in load_dir(spark_models).values() if s.engine != "service"])
    not_fitting = [f"{heading}\n  {row}" for heading, rows in tables.items() for row in rows if row[-1] != "FITS"]
    reasons = [line for line in captured.out.splitlines() if line.startswith("  ")]
    assert not not_fitting, "\n".join(not_fitting + reasons)
    assert code == 0, captured.err
