"""Checkpoints on disk for the fit check's tests, of real architectures and real sizes, costing nothing.

Weight files are sparse: a valid safetensors header (or GGUF header) at the start, then ``os.truncate`` to the size
the real checkpoint has, so a 61 GiB gpt-oss-120b takes a few kilobytes of disk. Hugging Face cache repos are laid
out as ``hf download`` leaves them: ``models--org--name/{blobs,refs/main,snapshots/<rev>/}`` with the snapshot's
files symlinked to their blobs.

The configs are the real ones, trimmed to what matters (the attention):
- gpt-oss-120b: https://huggingface.co/openai/gpt-oss-120b/raw/main/config.json as quoted in a public test
  (layer_types 18 x [sliding, full], sliding_window 128, 8 KV heads, head_dim 64; no torch_dtype);
- gpt-oss-20b: the same with 24 layers (its config.json, quoted in public docs of the repo's topology);
- Qwen3-Coder-30B-A3B-Instruct: its config.json (fastllm's copy): 48 layers, 4 KV heads, head_dim 128,
  max_position_embeddings 262144, sliding_window null; the FP8 checkpoint shares it plus a quantization_config;
- Llama-3.1-8B: its config.json (quoted in public tests): 32 layers, 8 KV heads, hidden 4096 / 32 heads;
- Qwen3-4B-Instruct-2507 (36 layers, 32 heads, 8 KV heads, head_dim 128, 262144 context) and Qwen3-Embedding-0.6B
  (Qwen3-0.6B's config: 28 layers, 16 heads, 8 KV heads, head_dim 128; 32768 tokens per the model card): from the
  model cards and the Qwen3 configs quoted in public code, not read from the hub here;
- Qwen2.5-Coder-1.5B-Instruct GGUF: qwen2, 28 blocks, 12 heads, 2 KV heads, embedding 1536, context 32768 (its
  config.json values as llama.cpp's converter writes them).
"""

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

GIB = 1024**3

GPT_OSS_120B: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "head_dim": 64, "hidden_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18, "max_position_embeddings": 131072,
    "num_attention_heads": 64, "num_hidden_layers": 36, "num_key_value_heads": 8, "num_local_experts": 128,
    "quantization_config": {"quant_method": "mxfp4"}, "sliding_window": 128, "vocab_size": 201088,
}
GPT_OSS_20B: dict[str, Any] = {**GPT_OSS_120B, "layer_types": ["sliding_attention", "full_attention"] * 12,
                               "num_hidden_layers": 24, "num_local_experts": 32}
QWEN3_CODER_30B_A3B_FP8: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": 128, "hidden_size": 2048,
    "max_position_embeddings": 262144, "max_window_layers": 28, "num_attention_heads": 32, "num_experts": 128,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "sliding_window": None, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
LLAMA_3_1_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
QWEN3_4B_INSTRUCT_2507: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 128, "hidden_size": 2560,
    "max_position_embeddings": 262144, "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
    "sliding_window": None, "use_sliding_window": False, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
QWEN3_EMBEDDING_0_6B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 128, "hidden_size": 1024,
    "max_position_embeddings": 32768, "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "sliding_window": None, "use_sliding_window": False, "torch_dtype": "bfloat16",
}
WHISPER_LARGE_V3_TURBO: dict[str, Any] = {  # openai/whisper-large-v3-turbo's config.json (its model card's figures)
    "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", "d_model": 1280,
    "decoder_attention_heads": 20, "decoder_layers": 4, "encoder_attention_heads": 20, "encoder_layers": 32,
    "num_hidden_layers": 32, "max_source_positions": 1500, "max_target_positions": 448, "torch_dtype": "float16",
}
QWEN2_5_CODER_1_5B_GGUF: dict[str, Any] = {
    "general.architecture": "qwen2", "qwen2.block_count": 28, "qwen2.context_length": 32768,
    "qwen2.embedding_length": 1536, "qwen2.attention.head_count": 12, "qwen2.attention.head_count_kv": 2,
}


def write_safetensors(path: Path, size: int) -> Path:
    """A safetensors file of `size` bytes: a valid header declaring one tensor filling the rest, sparse after it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = b""
    for _ in range(2):  # the header's length changes the data's, which changes the header
        data = max(size - 8 - len(header), 2)
        header = json.dumps({"__metadata__": {"format": "pt"},
                             "model.weight": {"dtype": "U8", "shape": [data], "data_offsets": [0, data]}}).encode()
        header += b" " * (-len(header) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
    os.truncate(path, max(size, 8 + len(header)))
    return path


def write_gguf(path: Path, metadata: dict[str, Any], size: int) -> Path:
    """A GGUF (version 3) with `metadata` (ints as uint32, strings) and no tensors, sparse up to `size` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    body = b""
    for key, value in metadata.items():
        body += string(key)
        if isinstance(value, str):
            body += struct.pack("<I", 8) + string(value)
        elif isinstance(value, list):
            body += struct.pack("<IIQ", 9, 4, len(value)) + b"".join(struct.pack("<I", v) for v in value)
        else:
            body += struct.pack("<II", 4, value)
    with path.open("wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata)) + body)
    os.truncate(path, max(size, path.stat().st_size))
    return path


def model_dir(path: Path, config: dict[str, Any], shards: int, total: int, *, missing: int = 0) -> Path:
    """A plain checkpoint directory (``hf download --local-dir``): config.json, `shards` safetensors of `total`
    bytes together with their index, `missing` of them left out."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = _shard_names(shards)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {f"layer.{i}": n for i, n in enumerate(names)}}))
    for name in names[missing:]:
        write_safetensors(path / name, total // shards)
    return path


def hf_cache_repo(hub: Path, repo_id: str, config: dict[str, Any], shards: int, total: int, *, missing: int = 0,
                  incomplete: int = 0, extra: dict[str, int] | None = None) -> Path:
    """A repo in a Hugging Face hub cache (`hub` = ``.../huggingface/hub``), as ``hf download`` leaves it; returns
    the snapshot. `missing` shards not downloaded yet, `incomplete` blobs still downloading; `extra`: more files
    (path in the repo -> size), e.g. ``original/model.safetensors``."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    blobs = repo / "blobs"
    snapshot.mkdir(parents=True, exist_ok=True)
    blobs.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    names = _shard_names(shards)
    files: dict[str, bytes | int] = {
        "config.json": json.dumps(config).encode(),
        "model.safetensors.index.json": json.dumps(
            {"metadata": {"total_size": total}, "weight_map": {f"layer.{i}": n for i, n in enumerate(names)}}).encode(),
    }
    files.update({name: total // shards for name in names[missing:]})
    files.update(extra or {})
    for name, content in files.items():
        blob = blobs / hashlib.sha256(f"{repo_id}/{name}".encode()).hexdigest()
        if isinstance(content, bytes):
            blob.write_bytes(content)
        else:
            write_safetensors(blob, content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for i in range(incomplete):
        (blobs / f"{i:064x}.incomplete").write_bytes(b"partial")
    return snapshot


def _shard_names(shards: int) -> list[str]:
    if shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
