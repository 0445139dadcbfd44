"""What a model's checkpoint on disk says about its memory: the weights' size and what a token costs in the KV cache.

The reader side of ``sparkgate check``'s fit check (waker/config/fit_check.py): it finds the weights the engine
will load, from this machine, and reads only what the estimate needs:

* **where**: the entry's model (or the model flag in its args: ``-m`` for llama.cpp, ``--model`` / ``--model-path``)
  as a path, read through the entry's volume for a Docker engine (:func:`host_path`); or a hub id
  (``org/name``) in the Hugging Face cache the engine uses: ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else
  ``~/.cache/huggingface/hub`` (``/root/.cache/huggingface/hub`` in a container), with the entry's env first. In a
  container the cache must come from a volume; the snapshot is ``models--org--name/snapshots/<refs/main>``.
* **weights**: the sizes of the ``*.safetensors`` directly in the snapshot or directory (``original/`` and
  ``metal/`` hold copies in other formats and are never loaded), else ``*.gguf``, else ``*.bin`` / ``*.pt``; or the
  model file itself (a split GGUF counts all its parts). A shard the index (``model.safetensors.index.json``)
  lists that is absent, or a download still marked ``.incomplete``, means the size can't be told yet.
* **KV per token**: from ``config.json`` (its ``text_config`` for multimodal checkpoints): the layers with full
  attention (``layer_types``: ``full_attention`` layers count every token, ``sliding_attention`` ones only
  ``sliding_window`` tokens, other kinds (linear attention, convolutions) hold no KV cache that grows; without
  ``layer_types`` a ``sliding_window`` applies to every layer unless ``use_sliding_window`` is false),
  ``num_key_value_heads`` and ``head_dim`` (or ``hidden_size / num_attention_heads``); MLA checkpoints
  (``kv_lora_rank``) cache one latent of ``kv_lora_rank + qk_rope_head_dim`` per layer. From a GGUF: its metadata
  (``<arch>.block_count``, ``<arch>.attention.head_count_kv``, ``key_length`` / ``value_length`` or
  ``embedding_length / head_count``), read by a small reader of the header and its key-value pairs (no tensor data
  and no dependency).

Nothing here is an error: what can't be found or read becomes :attr:`Checkpoint.problem`, which the fit check shows
as "can't tell". The environment is passed in (``environ``), so tests read their own cache.
"""

import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from waker.config.args import flag_value
from waker.config.spec import EngineKind, ModelSpec, RuntimeKind

CONTAINER_HF_HOME = "/root/.cache/huggingface"
"""Where the engine images keep the Hugging Face cache (vLLM, SGLang and TensorRT-LLM images run as root)."""

MODEL_FLAGS = {
    EngineKind.VLLM: ("--model",),
    EngineKind.SGLANG: ("--model-path", "--model"),
    EngineKind.LLAMACPP: ("--model", "-m"),
}
"""The flags in an entry's args that name the weights instead of its ``model`` (the adapters let the user's win)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SPLIT_GGUF = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<parts>\d{5})\.gguf$")
_SKIPPED_DIRS = ("original", "metal")  # gpt-oss ships full copies there; engines load the top level


@dataclass(frozen=True, slots=True)
class KvShape:
    """What one token costs in the KV cache, per layer, before the engine picks the cache's dtype.

    ``full_layers`` keep every token of the context; each ``(layers, window)`` of ``windowed`` keeps at most
    ``window`` tokens. ``key_dim``/``value_dim`` are per KV head. ``dtype_bytes``: the checkpoint's own dtype (what an
    engine's "auto" KV dtype follows), 2 unless the config says float32 (engines serve those in 16 bits by default,
    so 2 as well) or something else."""

    full_layers: int
    windowed: tuple[tuple[int, int], ...]
    kv_heads: int
    key_dim: int
    value_dim: int
    max_context: int | None
    dtype_bytes: float = 2.0
    source: str = "config.json"

    def kv_bytes(self, tokens: int, key_bytes: float, value_bytes: float) -> float:
        """The KV cache of one sequence of `tokens` tokens, K and V elements of the given sizes."""
        per_layer_token = self.kv_heads * (self.key_dim * key_bytes + self.value_dim * value_bytes)
        cached = self.full_layers * tokens + sum(layers * min(window, tokens) for layers, window in self.windowed)
        return cached * per_layer_token


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What was found on disk for one entry: where, the weights' size and KV shape, or why they can't be told."""

    where: Path | None = None
    weights_bytes: int | None = None
    kv: KvShape | None = None
    problem: str | None = None


CheckpointReader = Callable[[ModelSpec], Checkpoint]
"""Reads an entry's checkpoint (:func:`read_checkpoint`); tests pass their own."""


def read_checkpoint(spec: ModelSpec, environ: Mapping[str, str] | None = None) -> Checkpoint:
    """`spec`'s checkpoint as this machine sees it (see the module doc). `environ`: the gateway's environment
    (default ``os.environ``), under the entry's own env for a process engine."""
    model = weights_argument(spec)
    if not model:
        return Checkpoint(problem="no model given")
    try:
        where, problem = _locate(spec, model, os.environ if environ is None else environ)
        if where is None:
            return Checkpoint(problem=problem)
        return _read(where, spec)
    except OSError as exc:
        return Checkpoint(problem=f"can't read the weights: {exc}")


def weights_argument(spec: ModelSpec) -> str | None:
    """The weights the engine will load: a model flag in the entry's args (the last one, as argparse keeps it), else
    its ``model``."""
    names = MODEL_FLAGS.get(spec.engine, ())
    found = flag_value(spec.args, names) if names else None
    return found or spec.model


def _locate(spec: ModelSpec, model: str, environ: Mapping[str, str]) -> tuple[Path | None, str]:
    """The weights' file or directory on this machine, or None and why not."""
    # A container sees only its volumes: its paths mean nothing on this machine otherwise (and a relative one is
    # relative to its own working directory).
    path = mounted_path(spec, model) if spec.runtime is RuntimeKind.DOCKER else host_path(spec, model)
    if path is not None and path.exists():
        return path, ""
    if path is None and PurePosixPath(model).is_absolute():
        return None, f"{model} is inside the container (no volume mounts it): not readable from here"
    if not _HUB_ID.match(model):
        return None, f"weights not downloaded yet: {path or model} does not exist"
    cache = hub_cache(spec, environ)
    if cache is None:
        return None, (f"the Hugging Face cache is inside the container (no volume mounts {CONTAINER_HF_HOME}): "
                      "not readable from here")
    repo = cache / ("models--" + model.replace("/", "--"))
    if not repo.is_dir():
        return None, f"weights not downloaded yet: no {repo}"
    snapshot = _snapshot(repo, flag_value(spec.args, ("--revision",)) or "main")
    if snapshot is None:
        return None, f"weights not downloaded yet: no snapshot in {repo / 'snapshots'}"
    return snapshot, ""


def hub_cache(spec: ModelSpec, environ: Mapping[str, str]) -> Path | None:
    """The hub cache directory the engine uses, on this machine (None: in a container with no volume for it)."""
    if spec.runtime is RuntimeKind.DOCKER:
        env = spec.env
        inside = env.get("HF_HUB_CACHE") or str(PurePosixPath(env.get("HF_HOME", CONTAINER_HF_HOME)) / "hub")
        return mounted_path(spec, inside)
    env = {**environ, **spec.env}
    if env.get("HF_HUB_CACHE"):
        return host_path(spec, env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return host_path(spec, env["HF_HOME"]) / "hub"
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path("~/.cache").expanduser()
    return base / "huggingface" / "hub"


def _snapshot(repo: Path, revision: str) -> Path | None:
    """The snapshot a revision (a branch or tag in refs/, or a commit) points at; the newest one if refs/ is
    absent."""
    snapshots = repo / "snapshots"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    if (snapshots / commit).is_dir():
        return snapshots / commit
    if ref.is_file() or not snapshots.is_dir():
        return None
    candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _read(where: Path, spec: ModelSpec) -> Checkpoint:
    if where.is_file():
        if where.suffix == ".gguf":
            return _read_gguf(where)
        return Checkpoint(where, problem=f"{where.name} is neither a directory nor a .gguf file")
    size, problem, ggufs = _weights_in(where)
    if problem:
        return Checkpoint(where, problem=problem)
    if ggufs:
        return _read_gguf(ggufs[0])
    kv, problem = _kv_from_config(where / "config.json")
    return Checkpoint(where, size, kv, problem or None)


def _weights_in(directory: Path) -> tuple[int, str, list[Path]]:
    """The size of the weights directly in `directory`, what keeps it from being told, and its GGUF files."""
    files = [f for f in directory.iterdir() if not f.is_dir()]
    incomplete = _incomplete(directory)
    if incomplete:
        return 0, f"download not finished: {incomplete} file(s) still marked .incomplete", []
    for suffixes, index_name in (((".safetensors",), "model.safetensors.index.json"),
                                 ((".bin", ".pt"), "pytorch_model.bin.index.json")):
        index = directory / index_name
        listed = _index_shards(index) if index.is_file() else set()
        present = [f for f in files if f.suffix in suffixes and f.exists()]  # exists(): a symlink's blob is there
        missing = sorted(listed - {f.name for f in present})
        if missing:
            return 0, f"weights not downloaded yet: {len(missing)} of {len(listed)} shards missing", []
        if present:
            return sum(f.stat().st_size for f in present), "", []
    ggufs = sorted(f for f in files if f.suffix == ".gguf" and f.exists())
    if ggufs:
        return 0, "", ggufs[:1]
    return 0, f"weights not downloaded yet: no weight files in {directory}", []


def _incomplete(directory: Path) -> int:
    """Downloads in progress or interrupted: ``blobs/*.incomplete`` of an HF cache repo (a snapshot's grandparent's
    sibling), or ``.cache/huggingface/download/**/*.incomplete`` of an ``hf download --local-dir``."""
    count = 0
    if directory.parent.name == "snapshots":
        blobs = directory.parent.parent / "blobs"
        if blobs.is_dir():
            count += sum(1 for _ in blobs.glob("*.incomplete"))
    local = directory / ".cache" / "huggingface" / "download"
    if local.is_dir():
        count += sum(1 for _ in local.rglob("*.incomplete"))
    return count


def _index_shards(index: Path) -> set[str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return set()
    return {str(f) for f in weight_map.values() if "/" not in str(f)} if isinstance(weight_map, dict) else set()


def _kv_from_config(path: Path) -> tuple[KvShape | None, str]:
    """The KV shape `config.json` describes, or None and why."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"no config.json in {path.parent}: can't tell the KV cache"
    except (OSError, ValueError) as exc:
        return None, f"{path} can't be read: {exc}"
    if not isinstance(config, dict):
        return None, f"{path} is not a JSON object"
    text = config.get("text_config")
    if "num_hidden_layers" not in config and isinstance(text, dict):
        config = {"torch_dtype": config.get("torch_dtype"), **text}
    try:
        return kv_shape_of(config), ""
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        return None, f"{path} doesn't describe the attention (missing or bad {exc}): can't tell the KV cache"


def kv_shape_of(config: Mapping[str, object]) -> KvShape:
    """The KV shape of a transformers ``config.json`` (see the module doc). Raises KeyError / ValueError when the
    config lacks what it takes."""
    if config.get("decoder_layers") and config.get("d_model"):
        return _encoder_decoder(config)
    layers = _int(config, "num_hidden_layers")
    heads = _int(config, "num_attention_heads")
    kv_heads = _int(config, "num_key_value_heads") if config.get("num_key_value_heads") else heads
    head_dim = _int(config, "head_dim") if config.get("head_dim") else _int(config, "hidden_size") // heads
    key_dim = value_dim = head_dim
    if config.get("kv_lora_rank"):  # MLA (DeepSeek): one compressed latent and the rope part, no separate V
        kv_heads, key_dim, value_dim = 1, _int(config, "kv_lora_rank") + int(config.get("qk_rope_head_dim") or 0), 0
    window = config.get("sliding_window")
    types = config.get("layer_types")
    windowed: tuple[tuple[int, int], ...] = ()
    if isinstance(types, list) and types:
        sliding = sum(1 for t in types if t == "sliding_attention")
        # Layers of a kind not known to hold no KV cache count in full: an over-estimate, on the safe side.
        full = sum(1 for t in types if t != "sliding_attention" and t not in _NO_KV_LAYERS)
        if sliding:
            if not isinstance(window, int) or window <= 0:
                raise ValueError("sliding_window")
            windowed = ((sliding, window),)
    elif isinstance(window, int) and window > 0 and config.get("use_sliding_window", True):
        full, windowed = 0, ((layers, window),)
    else:
        full = layers
    context = config.get("max_position_embeddings")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return KvShape(full, windowed, kv_heads, key_dim, value_dim, context if isinstance(context, int) else None,
                   _DTYPE_BYTES.get(dtype, 2.0))


def _encoder_decoder(config: Mapping[str, object]) -> KvShape:
    """Whisper-style encoder-decoder configs (``d_model``, ``decoder_layers``, ``decoder_attention_heads``): only the
    decoder caches keys and values, its self-attention for the tokens it writes (``max_target_positions``) and its
    cross-attention for the encoder's output (``max_source_positions`` frames, counted as a window: an
    approximation, never more than the tokens asked for; small either way)."""
    layers = _int(config, "decoder_layers")
    heads = _int(config, "decoder_attention_heads")
    head_dim = _int(config, "d_model") // heads
    context = config.get("max_target_positions")
    source = config.get("max_source_positions")
    windowed = ((layers, source),) if isinstance(source, int) and source > 0 else ()
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return KvShape(layers, windowed, heads, head_dim, head_dim, context if isinstance(context, int) else None,
                   _DTYPE_BYTES.get(dtype, 2.0))


_NO_KV_LAYERS = frozenset({"linear_attention", "conv", "mamba", "recurrent"})
"""Layer kinds of hybrid models whose state doesn't grow with the context (Qwen3-Next, LFM2, Jamba...)."""

_DTYPE_BYTES = {"bfloat16": 2.0, "float16": 2.0, "float32": 2.0, "float8_e4m3fn": 1.0, "float8_e5m2": 1.0}
"""A checkpoint dtype's KV element size under an engine's "auto": float32 checkpoints are served in 16 bits."""


def _int(config: Mapping[str, object], key: str) -> int:
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(key)
    return value


# GGUF ---------------------------------------------------------------------------------------------------------------
# The header (ggml-org/ggml docs/gguf.md): magic "GGUF", uint32 version, then tensor and key-value counts (uint64;
# uint32 in version 1), then the key-value pairs: a string key, a uint32 type, the value. Little-endian.

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_ARRAY_KEPT = 4096  # per-layer arrays are kept; vocabularies (150k strings) are skipped


def read_gguf_metadata(path: Path) -> dict[str, object]:
    """The key-value metadata of a GGUF file (arrays longer than a few thousand entries, i.e. the vocabulary, are
    skipped and left out). Raises ValueError for a file that is not GGUF, OSError when it can't be read."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path.name} is not a GGUF file")
        (version,) = _unpack(f, "<I")
        count_format = "<I" if version == 1 else "<Q"
        _unpack(f, count_format)  # tensors
        (pairs,) = _unpack(f, count_format)
        metadata: dict[str, object] = {}
        for _ in range(pairs):
            key = _gguf_string(f, version)
            (kind,) = _unpack(f, "<I")
            value = _gguf_value(f, kind, version)
            if value is not _SKIPPED:
                metadata[key] = value
        return metadata


_SKIPPED = object()


def _gguf_value(f: BinaryIO, kind: int, version: int) -> object:
    if kind in _GGUF_SCALARS:
        return _unpack(f, _GGUF_SCALARS[kind])[0]
    if kind == _GGUF_STRING:
        return _gguf_string(f, version)
    if kind == _GGUF_ARRAY:
        (item_kind,) = _unpack(f, "<I")
        (count,) = _unpack(f, "<I" if version == 1 else "<Q")
        if count > _GGUF_MAX_ARRAY_KEPT:
            if item_kind in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[item_kind]), os.SEEK_CUR)
            else:
                for _ in range(count):
                    _gguf_value(f, item_kind, version)
            return _SKIPPED
        return [_gguf_value(f, item_kind, version) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {kind}")


def _gguf_string(f: BinaryIO, version: int) -> str:
    (length,) = _unpack(f, "<I" if version == 1 else "<Q")
    data = f.read(length)
    if len(data) != length:
        raise ValueError("truncated GGUF header")
    return data.decode("utf-8", errors="replace")


def _unpack(f: BinaryIO, fmt: str) -> tuple[object, ...]:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)


def _read_gguf(path: Path) -> Checkpoint:
    parts, missing = _gguf_parts(path)
    if missing:
        return Checkpoint(path, problem=f"weights not downloaded yet: {missing} of {len(parts) + missing} GGUF parts "
                                        "missing")
    size = sum(p.stat().st_size for p in parts)
    try:
        metadata = read_gguf_metadata(parts[0])
        return Checkpoint(path, size, kv_shape_of_gguf(metadata))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        return Checkpoint(path, size, problem=f"{path.name}: can't tell the KV cache from its metadata ({exc})")


def _gguf_parts(path: Path) -> tuple[list[Path], int]:
    """A split GGUF's parts present (``x-00001-of-00003.gguf``: llama.cpp loads them all from the first) and the
    number missing; otherwise the file alone."""
    split = _SPLIT_GGUF.match(path.name)
    if not split:
        return [path], 0
    total = int(split["parts"])
    names = [f"{split['stem']}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]
    present = [path.parent / n for n in names if (path.parent / n).exists()]
    return present, total - len(present)


def kv_shape_of_gguf(metadata: Mapping[str, object]) -> KvShape:
    """The KV shape GGUF metadata describes (f16 cache elements unless the engine's flags say otherwise).

    A per-layer ``head_count_kv`` (an array) is summed over the layers; sliding-window layers are counted as full
    (llama.cpp's own SWA cache is smaller): an over-estimate, on the safe side."""
    arch = str(metadata["general.architecture"])
    layers = int(_number(metadata[f"{arch}.block_count"]))
    heads_meta = metadata.get(f"{arch}.attention.head_count")
    heads = int(_number(heads_meta[0] if isinstance(heads_meta, list) else heads_meta or 0))
    kv_meta = metadata.get(f"{arch}.attention.head_count_kv", heads_meta)
    embedding = int(_number(metadata[f"{arch}.embedding_length"]))
    key_dim = int(_number(metadata.get(f"{arch}.attention.key_length") or embedding // heads))
    value_dim = int(_number(metadata.get(f"{arch}.attention.value_length") or embedding // heads))
    context = metadata.get(f"{arch}.context_length")
    if isinstance(kv_meta, list):  # per layer: fold into one head count over all layers
        total = sum(int(_number(v)) for v in kv_meta)
        return KvShape(1, (), total, key_dim, value_dim, int(_number(context)) if context else None, 2.0,
                       "GGUF metadata")
    return KvShape(layers, (), int(_number(kv_meta)), key_dim, value_dim,
                   int(_number(context)) if context else None, 2.0, "GGUF metadata")


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not a number: {value!r}")
    return value


def host_path(spec: ModelSpec, path: str | None = None) -> Path:
    """Where `path` (default: the entry's model), as its engine sees it, is on this machine: a Docker entry's path
    inside the container through its volume; a process's relative path from its workdir. engine_memory reads the
    weights' size through it too."""
    model = spec.model if path is None else path
    assert model is not None
    mounted = mounted_path(spec, model)
    if mounted is not None:
        return mounted
    found = Path(model).expanduser()
    if not found.is_absolute() and spec.workdir and spec.runtime is RuntimeKind.PROCESS:
        # Where the process runtime starts the engine (its workdir, relative to the models.d file); without one,
        # the gateway's own directory, as here.
        base = Path(spec.workdir).expanduser()
        if not base.is_absolute() and spec.source is not None:
            base = spec.source.parent / base
        found = base / found
    return found


def mounted_path(spec: ModelSpec, inside: str) -> Path | None:
    """The host path a volume of `spec` puts at `inside` (a path in the container), or None when none does."""
    for volume in spec.volumes:  # host:/container[:mode], checked by ModelSpec
        host, mount = volume.split(":")[:2]
        mount_path, inside_path = PurePosixPath(mount), PurePosixPath(inside)
        if inside_path == mount_path or mount_path in inside_path.parents:
            return Path(host).expanduser() / inside_path.relative_to(mount_path)
    return None


__all__ = ["CONTAINER_HF_HOME", "MODEL_FLAGS", "Checkpoint", "CheckpointReader", "KvShape", "host_path", "hub_cache",
           "kv_shape_of", "kv_shape_of_gguf", "mounted_path", "read_checkpoint", "read_gguf_metadata",
           "weights_argument"]
