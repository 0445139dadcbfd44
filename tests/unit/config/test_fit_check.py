"""The fit check: what each engine needs from the checkpoint on disk against what its memory flag gives it, in the
engine's own terms (waker/config/fit_check.py, waker/config/checkpoint.py), with the issue's figures as expected
values: gpt-oss-120b at 0.55 with 131072 tokens will not start ("weights 61.0 GiB + KV for one 131072-token request
4.5 GiB + overhead 2 GiB > 0.55 × 119.6 GiB = 65.8 GiB"), at 0.70 it fits; Qwen3-Coder-30B-A3B at 0.35 with 131072
will not start."""

# ruff: noqa: RUF001, RUF002 - the issue and the check write the engines' arithmetic with a multiplication sign
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoints import (
    GIB,
    GPT_OSS_120B,
    LLAMA_3_1_8B,
    QWEN2_5_CODER_1_5B_GGUF,
    QWEN3_4B_INSTRUCT_2507,
    QWEN3_CODER_30B_A3B_FP8,
    hf_cache_repo,
    model_dir,
    write_gguf,
    write_safetensors,
)
from waker.config.checkpoint import Checkpoint, kv_shape_of, read_checkpoint, read_gguf_metadata
from waker.config.fit_check import Verdict, alone, cuda_total_gb, estimate, together
from waker.config.nodes import NodeConfig
from waker.config.spec import ModelSpec

REPO = Path(__file__).resolve().parents[3]
SPARK_CUDA = 121.7 - 2.1  # a GB10: 121.7 GiB MemTotal, 119.6 GiB to CUDA
SPARK = NodeConfig(total_gb=121.7, unified_memory=True)


def entry(**fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", "engine": "vllm", **fields})


def brain(path: Path, fraction: float, memory_gb: float = 86) -> ModelSpec:
    return entry(name="gpt-oss-120b", model=str(path), args=["--max-model-len", "131072"],
                 gpu_memory_utilization=fraction, memory_gb=memory_gb)


@pytest.fixture
def gpt_oss_120b(tmp_path: Path) -> Path:
    """gpt-oss-120b with 61.0 GiB of weights (the issue's figure for the loaded weights) in 15 shards."""
    return model_dir(tmp_path / "gpt-oss-120b", GPT_OSS_120B, 15, int(61.0 * GIB))


# --- the KV cache per token, from real configs ---

def test_gpt_oss_120b_keeps_131072_tokens_in_its_18_full_attention_layers_only() -> None:
    kv = kv_shape_of(GPT_OSS_120B)
    assert (kv.full_layers, kv.windowed, kv.kv_heads, kv.key_dim) == (18, ((18, 128),), 8, 64)
    # 18 layers x 8 heads x 64 x 2 (K, V) x 2 bytes x 131072 tokens = 4.5 GiB; the 18 sliding layers add 128 tokens
    assert kv.kv_bytes(131072, 2, 2) == 18 * 8 * 64 * 2 * 2 * 131072 + 18 * 8 * 64 * 2 * 2 * 128
    assert kv.kv_bytes(131072, 2, 2) / GIB == pytest.approx(4.5, abs=0.01)
    assert kv.max_context == 131072 and kv.dtype_bytes == 2  # no torch_dtype in its config: served in bf16


def test_qwen3_coder_30b_a3b_needs_12_gib_for_131072_tokens_and_ignores_its_null_sliding_window() -> None:
    kv = kv_shape_of(QWEN3_CODER_30B_A3B_FP8)
    assert (kv.full_layers, kv.windowed) == (48, ())
    assert kv.kv_bytes(131072, 2, 2) == 12 * GIB  # 48 x 4 x 128 x 2 x 2 = 96 KiB per token
    assert kv.kv_bytes(131072, 1, 1) == 6 * GIB  # --kv-cache-dtype fp8


def test_llama_3_1_8b_takes_its_head_dim_from_hidden_size_over_heads() -> None:
    kv = kv_shape_of(LLAMA_3_1_8B)
    assert (kv.full_layers, kv.kv_heads, kv.key_dim, kv.max_context) == (32, 8, 128, 131072)
    assert kv.kv_bytes(32768, 2, 2) == 4 * GIB


# --- the issue's verdicts ---

def test_gpt_oss_120b_at_0_55_will_not_start_and_says_why_in_numbers(gpt_oss_120b: Path) -> None:
    spec = brain(gpt_oss_120b, 0.55, memory_gb=74)
    result = estimate(spec, read_checkpoint(spec), cuda_total=SPARK_CUDA)
    assert result.verdict is Verdict.WILL_NOT_START
    assert result.reasons == ("weights 61.0 GiB + KV for one 131072-token request 4.5 GiB + overhead 2 GiB > "
                              "0.55 × 119.6 GiB = 65.8 GiB",)
    assert (round(result.needs_gb or 0, 1), round(result.gives_gb or 0, 1)) == (67.5, 65.8)


def test_gpt_oss_120b_at_0_70_fits_and_is_over_budget_only_when_memory_gb_undercounts_it(gpt_oss_120b: Path) -> None:
    spec = brain(gpt_oss_120b, 0.70, memory_gb=86)
    assert estimate(spec, read_checkpoint(spec), cuda_total=SPARK_CUDA).verdict is Verdict.FITS
    short = brain(gpt_oss_120b, 0.70, memory_gb=70)
    result = estimate(short, read_checkpoint(short), cuda_total=SPARK_CUDA)
    assert result.verdict is Verdict.OVER_BUDGET
    assert result.reasons == ("gives 83.7 GiB (0.7 × 119.6 GiB) but memory_gb is 70: the budget undercounts it",)


def test_qwen3_coder_at_0_35_with_131072_tokens_will_not_start_and_fits_with_an_fp8_cache(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "coder", QWEN3_CODER_30B_A3B_FP8, 4, 31 * 10**9)
    spec = entry(name="coder", model=str(directory), args=["--max-model-len", "131072"], gpu_memory_utilization=0.35,
                 memory_gb=48)
    result = estimate(spec, read_checkpoint(spec), cuda_total=SPARK_CUDA)
    assert result.verdict is Verdict.WILL_NOT_START
    assert result.reasons == ("weights 28.9 GiB + KV for one 131072-token request 12.0 GiB + overhead 2 GiB > "
                              "0.35 × 119.6 GiB = 41.9 GiB",)
    fp8 = spec.model_copy(update={"args": (*spec.args, "--kv-cache-dtype", "fp8")})
    assert estimate(fp8, read_checkpoint(fp8), cuda_total=SPARK_CUDA).verdict is Verdict.FITS


def test_a_fraction_in_the_args_wins_over_gpu_memory_utilization(gpt_oss_120b: Path) -> None:
    spec = brain(gpt_oss_120b, 0.55).model_copy(update={"args": ("--max-model-len", "131072",
                                                                  "--gpu-memory-utilization=0.7")})
    assert estimate(spec, read_checkpoint(spec), cuda_total=SPARK_CUDA).verdict is Verdict.FITS


def test_without_a_context_flag_the_models_own_maximum_is_checked(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "coder", QWEN3_CODER_30B_A3B_FP8, 1, 31 * 10**9)
    spec = entry(model=str(directory), gpu_memory_utilization=0.45, memory_gb=56)
    result = estimate(spec, read_checkpoint(spec), cuda_total=SPARK_CUDA)
    assert result.kv_tokens == "262144" and round(result.kv_gb or 0, 1) == 24.0
    assert result.verdict is Verdict.WILL_NOT_START  # 28.9 + 24 + 2 > 53.8
    assert result.reasons[0].startswith("weights 28.9 GiB + KV for one 262144-token request (the model's maximum in "
                                        "config.json: no --max-model-len in args) 24.0 GiB")


def test_vllm_refuses_to_start_when_less_than_its_share_is_free_at_launch(gpt_oss_120b: Path) -> None:
    spec = brain(gpt_oss_120b, 0.70)
    others = [entry(name="coder", model="x", memory_gb=56)]
    result = estimate(spec, read_checkpoint(spec), cuda_total=SPARK_CUDA, others=others)
    assert result.verdict is Verdict.WILL_NOT_START
    assert result.reasons == ("vLLM wants 0.7 × 119.6 GiB = 83.7 GiB free at launch; beside coder: 119.6 - 56 = "
                              "63.6 GiB is free",)


# --- SGLang: a share of what is free when it launches ---

@pytest.fixture
def qwen3_4b(tmp_path: Path) -> Path:
    return model_dir(tmp_path / "qwen3-4b", QWEN3_4B_INSTRUCT_2507, 1, int(7.5 * GIB))


def utility(path: Path, fraction: float, *args: str, memory_gb: float = 15) -> ModelSpec:
    return entry(name="utility", engine="sglang", model=str(path), args=["--context-length", "32768", *args],
                 gpu_memory_utilization=fraction, memory_gb=memory_gb)


def test_sglang_at_0_08_alone_cuts_the_context_and_beside_the_brain_will_not_start(qwen3_4b: Path) -> None:
    spec = utility(qwen3_4b, 0.08)
    checkpoint = read_checkpoint(spec)
    alone_ = estimate(spec, checkpoint, cuda_total=SPARK_CUDA)
    assert alone_.verdict is Verdict.CONTEXT_CUT
    # the pool: 0.08 x 119.6 - 7.5 = 2.07 GiB at 144 KiB a token, less than one 32768-token request (4.5 GiB)
    assert alone_.reasons == ("weights 7.5 GiB + KV for one 32768-token request 4.5 GiB > 0.08 × 119.6 GiB free at "
                              "launch = 9.6 GiB: the KV pool holds 15058 tokens, so longer requests are refused",)
    beside = estimate(spec, checkpoint, cuda_total=SPARK_CUDA, others=[entry(name="brain", model="x", memory_gb=86)])
    assert beside.verdict is Verdict.WILL_NOT_START
    assert beside.reasons[0].startswith("weights 7.5 GiB > 0.08 × 33.6 GiB free at launch (beside brain: 119.6 - 86)")
    assert "no room for the KV pool" in beside.reasons[0]


def test_sglang_with_its_pool_capped_takes_the_same_alone_and_beside_others(qwen3_4b: Path) -> None:
    spec = utility(qwen3_4b, 0.5, "--max-total-tokens", "32768")
    checkpoint = read_checkpoint(spec)
    lone = estimate(spec, checkpoint, cuda_total=SPARK_CUDA)
    beside = estimate(spec, checkpoint, cuda_total=SPARK_CUDA, others=[entry(name="b", model="x", memory_gb=94)])
    assert lone.verdict is beside.verdict is Verdict.FITS
    assert round(lone.gives_gb or 0, 1) == round(beside.gives_gb or 0, 1) == 14.0  # 7.5 + 4.5 + 2
    capped = utility(qwen3_4b, 0.5, "--max-total-tokens", "16384")
    result = estimate(capped, checkpoint, cuda_total=SPARK_CUDA)
    assert result.verdict is Verdict.CONTEXT_CUT
    assert result.reasons[0].startswith("--max-total-tokens 16384 caps the KV pool below one 32768-token request")


def test_sglang_without_any_fraction_cant_be_told(qwen3_4b: Path) -> None:
    spec = utility(qwen3_4b, 0.5).model_copy(update={"gpu_memory_utilization": None})
    result = estimate(spec, read_checkpoint(spec), cuda_total=SPARK_CUDA)
    assert result.verdict is Verdict.CANT_TELL and "SGLang picks one" in result.reasons[0]


# --- TensorRT-LLM and llama.cpp ---

def test_trtllm_gives_its_kv_cache_a_share_of_what_is_left_after_the_weights(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "llama", LLAMA_3_1_8B, 1, 6 * 10**9)
    spec = entry(name="fast", engine="trtllm", model=str(directory), args=["--max_seq_len", "32768"],
                 gpu_memory_utilization=0.2, memory_gb=32)
    result = estimate(spec, read_checkpoint(spec), cuda_total=SPARK_CUDA)
    assert result.verdict is Verdict.FITS
    weights = 6 * 10**9 / GIB
    assert result.gives_gb == pytest.approx(weights + 2 + 0.2 * (SPARK_CUDA - weights - 2))
    squeezed = estimate(spec, read_checkpoint(spec), cuda_total=SPARK_CUDA,
                        others=[entry(name="b", model="x", memory_gb=100)])
    assert squeezed.verdict is Verdict.CONTEXT_CUT  # 0.2 x (19.6 - 5.6 - 2) = 2.4 GiB < 4 GiB for 32768 tokens
    assert "the longest request it holds is 19" in squeezed.reasons[0]


def test_llamacpp_allocates_the_whole_context_of_all_its_slots(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "coder-1.5b-q8_0.gguf", QWEN2_5_CODER_1_5B_GGUF, int(1.6e9))
    spec = entry(name="autocomplete", engine="llamacpp", model=str(gguf), memory_gb=4,
                 args=["--n-gpu-layers", "999", "--ctx-size", "8192", "--parallel", "2"])
    result = estimate(spec, read_checkpoint(spec), cuda_total=SPARK_CUDA)
    assert result.verdict is Verdict.FITS
    assert result.kv_tokens == "8192, 2 slots"
    assert result.kv_gb == pytest.approx(28 * 2 * 128 * 2 * 2 * 8192 / GIB)  # 224 MiB
    q8 = spec.model_copy(update={"args": (*spec.args, "-ctk", "q8_0", "-ctv", "q8_0")})
    assert estimate(q8, read_checkpoint(q8), cuda_total=SPARK_CUDA).kv_gb == pytest.approx(
        (result.kv_gb or 0) * 34 / 64)
    full = estimate(spec, read_checkpoint(spec), cuda_total=SPARK_CUDA,
                    others=[entry(name="b", model="x", memory_gb=118.5)])
    assert full.verdict is Verdict.WILL_NOT_START
    assert full.reasons[0].startswith("weights 1.5 GiB + KV for 8192 tokens (2 slots of 4096) 0.2 GiB + overhead "
                                      "0.5 GiB > 1.1 GiB free at launch")


# --- what is on disk ---

def test_weights_are_found_in_the_hf_cache_through_the_volume_and_copies_under_original_are_not_counted(
        tmp_path: Path) -> None:
    hub = tmp_path / "hf" / "hub"
    snapshot = hf_cache_repo(hub, "openai/gpt-oss-120b", GPT_OSS_120B, 15, int(60.8 * GIB),
                             extra={"original/model--00001-of-00007.safetensors": 30 * GIB})
    spec = entry(name="brain", runtime="docker", image="vllm", model="openai/gpt-oss-120b",
                 volumes=[f"{tmp_path / 'hf'}:/root/.cache/huggingface"])
    checkpoint = read_checkpoint(spec, environ={})
    assert checkpoint.problem is None, checkpoint.problem
    assert checkpoint.where == snapshot
    assert checkpoint.weights_bytes == pytest.approx(60.8 * GIB, rel=1e-6)


def test_hf_home_in_the_entrys_env_moves_the_cache_inside_the_container(tmp_path: Path) -> None:
    hf_cache_repo(tmp_path / "cache" / "hub", "Qwen/Qwen3-4B-Instruct-2507", QWEN3_4B_INSTRUCT_2507, 1, 8 * 10**9)
    spec = entry(engine="sglang", runtime="docker", image="sglang", model="Qwen/Qwen3-4B-Instruct-2507",
                 env={"HF_HOME": "/hf"}, volumes=[f"{tmp_path / 'cache'}:/hf"])
    assert read_checkpoint(spec, environ={}).weights_bytes == 8 * 10**9
    process = entry(engine="sglang", model="Qwen/Qwen3-4B-Instruct-2507")
    assert read_checkpoint(process, environ={"HF_HUB_CACHE": str(tmp_path / "cache" / "hub")}).weights_bytes == 8e9


def test_a_partial_download_cant_be_told(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    hf_cache_repo(hub, "openai/gpt-oss-120b", GPT_OSS_120B, 15, int(60.8 * GIB), missing=3)
    spec = entry(model="openai/gpt-oss-120b", gpu_memory_utilization=0.7, memory_gb=86)
    checkpoint = read_checkpoint(spec, environ={"HF_HUB_CACHE": str(hub)})
    assert checkpoint.problem == "weights not downloaded yet: 3 of 15 shards missing"
    result = estimate(spec, checkpoint, cuda_total=SPARK_CUDA)
    assert result.verdict is Verdict.CANT_TELL and result.reasons == (checkpoint.problem,)
    hf_cache_repo(hub, "Qwen/Qwen3-4B-Instruct-2507", QWEN3_4B_INSTRUCT_2507, 1, 8 * 10**9, incomplete=1)
    downloading = read_checkpoint(entry(model="Qwen/Qwen3-4B-Instruct-2507"), environ={"HF_HUB_CACHE": str(hub)})
    assert downloading.problem == "download not finished: 1 file(s) still marked .incomplete"


def test_weights_not_downloaded_or_out_of_reach_cant_be_told(tmp_path: Path) -> None:
    nothing = read_checkpoint(entry(model="openai/gpt-oss-120b"), environ={"HF_HUB_CACHE": str(tmp_path)})
    assert nothing.problem is not None and nothing.problem.startswith("weights not downloaded yet: no ")
    sealed = entry(runtime="docker", image="vllm", model="openai/gpt-oss-120b")
    assert "no volume mounts /root/.cache/huggingface" in (read_checkpoint(sealed, environ={}).problem or "")
    inside = entry(runtime="docker", image="vllm", model="/models/m")
    assert "inside the container" in (read_checkpoint(inside, environ={}).problem or "")
    no_config = tmp_path / "bare"
    write_safetensors(no_config / "model.safetensors", 10**6)
    assert "no config.json" in (read_checkpoint(entry(model=str(no_config))).problem or "")


def test_memory_gb_auto_cant_be_told(gpt_oss_120b: Path) -> None:
    spec = brain(gpt_oss_120b, 0.55).model_copy(update={"memory_auto": True})
    result = estimate(spec, read_checkpoint(spec), cuda_total=SPARK_CUDA)
    assert result.verdict is Verdict.CANT_TELL and result.reasons[0].startswith("memory_gb auto")


def test_a_llamacpp_model_named_in_its_args_through_a_volume_is_read(tmp_path: Path) -> None:
    write_gguf(tmp_path / "gguf" / "coder.gguf", QWEN2_5_CODER_1_5B_GGUF, 10**9)
    spec = entry(engine="llamacpp", runtime="docker", image="llama.cpp", model="/models/other.gguf",
                 args=["-m", "/models/coder.gguf"], volumes=[f"{tmp_path / 'gguf'}:/models:ro"])
    checkpoint = read_checkpoint(spec, environ={})
    assert checkpoint.weights_bytes == 10**9 and checkpoint.kv is not None and checkpoint.kv.kv_heads == 2


def test_a_split_gguf_counts_every_part_and_a_missing_part_cant_be_told(tmp_path: Path) -> None:
    first = write_gguf(tmp_path / "m-00001-of-00002.gguf", QWEN2_5_CODER_1_5B_GGUF, 10**9)
    spec = entry(engine="llamacpp", model=str(first))
    assert read_checkpoint(spec).problem == "weights not downloaded yet: 1 of 2 GGUF parts missing"
    write_gguf(tmp_path / "m-00002-of-00002.gguf", {"split.count": 2}, 5 * 10**8)
    assert read_checkpoint(spec).weights_bytes == 15 * 10**8


def test_the_gguf_reader_reads_what_the_gguf_package_writes(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_gguf.py"), str(path)], check=True,
                   capture_output=True)
    metadata = read_gguf_metadata(path)
    assert metadata["general.architecture"] == "llama"
    assert (metadata["llama.block_count"], metadata["llama.attention.head_count_kv"]) == (2, 2)
    assert "tokenizer.ggml.tokens" in metadata  # 396 tokens: short enough to be kept
    checkpoint = read_checkpoint(entry(engine="llamacpp", model=str(path)))
    assert checkpoint.kv is not None
    kv = checkpoint.kv
    assert (kv.full_layers, kv.kv_heads, kv.key_dim, kv.max_context) == (2, 2, 16, 2048)  # 64 / 4 heads
    assert checkpoint.weights_bytes == path.stat().st_size


# --- scenarios ---

def test_the_cuda_total_of_unified_memory_is_the_node_total_less_2_1_gib() -> None:
    assert cuda_total_gb(SPARK) == pytest.approx(119.6)
    assert cuda_total_gb(NodeConfig(total_gb=80, unified_memory=False)) == 80
    assert cuda_total_gb(NodeConfig(total_gb=121.7, unified_memory=True, cuda_total_gb=119.56)) == 119.56


def test_a_group_is_checked_with_each_member_started_last_and_its_memory_gb_against_the_budget(
        gpt_oss_120b: Path, qwen3_4b: Path) -> None:
    big, small = brain(gpt_oss_120b, 0.7), utility(qwen3_4b, 0.08, memory_gb=12)
    checkpoints = {s.name: read_checkpoint(s) for s in (big, small)}

    def read(spec: ModelSpec) -> Checkpoint:
        return checkpoints[spec.name]

    report = alone([big, small], {"local": SPARK}, {"gpt-oss-120b": ("local",), "utility": ("local",)}, read)
    assert [e.verdict for e in report.scenarios[0].estimates] == [Verdict.FITS, Verdict.CONTEXT_CUT]
    assert not report.fails
    report = together([big, small], "local", SPARK, report, read)
    group = report.scenarios[1]
    assert group.title == ("together on node 'local': gpt-oss-120b, utility (memory_gb 98 of a 113.7 GiB budget), "
                           "each started last")
    assert [e.verdict for e in group.estimates] == [Verdict.FITS, Verdict.WILL_NOT_START]
    assert report.fails and "utility" in report.warnings()
    over = together([big, big.model_copy(update={"name": "twin"})], "local", SPARK, report, read=lambda s: checkpoints[
        "gpt-oss-120b"])
    assert over.scenarios[-1].problems == ("memory_gb 172 > the node's budget 113.7 GiB (121.7 - reserve 8): the "
                                           "scheduler never runs them together",)


def test_what_cant_be_told_for_a_remote_node_says_its_disk_is_not_read(tmp_path: Path) -> None:
    spec = entry(name="far", model=str(tmp_path / "absent"), gpu_memory_utilization=0.5, memory_gb=60)
    remote = NodeConfig(docker_host="ssh://me@spark2", total_gb=121.7, unified_memory=True)
    report = alone([spec], {"spark2": remote}, {"far": ("spark2",)}, read_checkpoint)
    (result,) = report.scenarios[0].estimates
    assert result.verdict is Verdict.CANT_TELL
    assert result.reasons[0].endswith("does not exist (on this machine: node 'spark2' is a remote Docker host, its "
                                      "disk is not read)")
