#!/usr/bin/env python3
"""Write a tiny, random-weight llama GGUF model for end-to-end tests of the real engine.

Usage::

    python scripts/make_tiny_gguf.py OUTPUT_PATH

The file (~0.5 MB, written in well under a second) is loaded by the real ``llama-cpp-python[server]``
(pinned 0.3.36) and served through its OpenAI-compatible API, streaming and non-streaming::

    python -m llama_cpp.server --model OUTPUT_PATH --model_alias tiny \\
        --host 127.0.0.1 --port 8001 --interrupt_requests false

The script is idempotent: when OUTPUT_PATH already holds a GGUF whose ``sparkgate.tiny_model.version``
key equals :data:`CONTENT_VERSION`, nothing is written.  Either way the path is printed on stdout.  Bump
:data:`CONTENT_VERSION` whenever anything below changes, so cached copies get regenerated.  The file is
written to a temporary name and renamed into place, so concurrent runs never see a half-written model.
Only ``numpy`` and the PyPI ``gguf`` package are needed: no torch, no network, no hub downloads.  Weights
come from a seeded ``numpy.random.RandomState`` (whose stream NumPy keeps stable across releases), so the
bytes are identical on every run.

How the model is made
---------------------
* Architecture ``llama`` with every key llama.cpp requires: context length 2048, ``n_embd`` 64, 2 blocks,
  4 query heads and 2 KV heads (GQA, head dim 16, RoPE over the whole head), FFN width 128, RMS-norm
  epsilon 1e-5.  All tensors are F32 (the file is tiny anyway, and F32 keeps the logit mask below exact).
  Separate ``output.weight`` (no tied embeddings), because the mask needs different values there.
* Tokenizer model ``gpt2`` (byte-level BPE) with pre-tokenizer ``gpt-2``.  The vocabulary (396 tokens)
  is ASCII only: three control tokens (``<|endoftext|>`` = BOS, ``<|im_start|>``, ``<|im_end|>`` = EOS),
  the 95 printable ASCII characters plus newline (in GPT-2's byte-to-unicode spelling: ``Ġ`` is a space,
  ``Ċ`` a newline), and a few hundred English word pieces (`` the``, `` model``, ...) built by a chain
  of merges so the BPE tokenizer actually produces them.
* A ChatML-style ``tokenizer.chat_template``.  llama-cpp-python renders it with its Jinja2 formatter
  ("chat_template.default"), stops on ``<|im_end|>``, and ``/v1/chat/completions`` works without any
  ``--chat_format`` flag.  List-of-parts message content and ``content: null`` are accepted too.

Why an ASCII-only vocabulary
----------------------------
A random model samples tokens without regard to UTF-8 structure.  With the usual SPM ("llama") vocab and
its 256 byte-fallback tokens ``<0x00>``..``<0xFF>``, it emits lone bytes >= 0x80, i.e. invalid or
incomplete UTF-8.  llama-cpp-python's streaming path then holds text back waiting for the multi-byte
sequence to complete and re-decodes the growing tail on every token, which turns quadratic: 1024 tokens
took 180 s.  Here no token decodes to anything but printable ASCII or ``\\n``, so every token is complete
text on its own: a 256-token stream takes ~0.5 s on a 2-core machine.  (llama-cpp-python still re-detokenizes
the whole completion after each token, so very long completions slow down somewhat: 1024 tokens ~3.7 s.)

Byte-level BPE also keeps non-ASCII *prompts* harmless: llama.cpp looks up each unknown piece's raw bytes
and silently drops those with no token (unlike SPM, whose byte fallback throws for a missing
``<0xNN>``).  So ``"héllo ✓"`` tokenizes to ``h l l o`` + space and the server answers normally.

Why generation always runs to ``max_tokens``
--------------------------------------------
The control tokens (including EOS) can never be sampled, so every completion ends with
``finish_reason == "length"`` after exactly ``max_tokens`` tokens, or when the context is full (a chat
request without ``max_tokens`` generates ~2000 tokens; the server caps larger ``max_tokens`` the same way).
This makes lengths in tests deterministic.  Tests that want a natural stop can send
``"logit_bias": {"2": 100}`` (2 = ``<|im_end|>``: empty content, ``finish_reason == "stop"``) or a ``stop``
string.  The mask is built into the weights (a random model cannot be told "never say X" otherwise):

* dimension 0 of the residual stream is a constant "bias channel": every token embedding has
  ``BIAS_CHANNEL`` there, and the attention and FFN output projections have a zero row 0, so the final
  hidden state keeps exactly that value (and dominates the RMS norm, giving ``~sqrt(n_embd)`` after it);
* ``output.weight`` rows of the control tokens get ``-SUPPRESS`` in column 0 and every other row gets 0,
  so control-token logits sit about 70 below the rest: their probability is ~1e-30, i.e. zero in F32.

The remaining weights are small Gaussians, so the next-token distribution mostly depends on the last
token: the output is gibberish built from English words, which is all the gateway tests need.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

CONTENT_VERSION = "1"
VERSION_KEY = "sparkgate.tiny_model.version"
SEED = 20240611

N_CTX = 2048
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
RMS_EPS = 1e-5
ROPE_BASE = 10000.0

BIAS_CHANNEL = 1.0  # constant value of residual dimension 0 for every token
SUPPRESS = 10.0  # weight of the bias channel in the control tokens' output rows
EMBD_STD = 0.05
OUTPUT_STD = 0.5
LAYER_STD = 0.02

BOS, EOS = "<|endoftext|>", "<|im_end|>"
CONTROL_TOKENS = (BOS, "<|im_start|>", EOS)

# Rendered by llama-cpp-python's Jinja2ChatFormatter (trim_blocks/lstrip_blocks on); the rendered prompt
# is tokenized with special=True, so the ChatML markers become the control tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is iterable %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = (
    "the of and to in is that it for was on are as with be at by this have from or one had not but what all"
    " were when we there can an your which their said if do will each about how up out them then she many"
    " some so these would other into has more her two like him see time could no make than first been its"
    " who now people my made over did down only way find use may water long little very after words called"
    " just where most know model token stream engine server memory request answer gateway test random tiny"
    " hello world data local fast slow start stop wait ready load"
).split()


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]

    @property
    def size(self) -> int:
        return len(self.tokens)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_vocab() -> Vocab:
    """Control tokens, printable ASCII + newline, then word pieces reachable through chained merges."""
    b2u = byte_to_unicode()
    tokens = list(CONTROL_TOKENS)
    types = [gguf.TokenType.CONTROL] * len(CONTROL_TOKENS)
    for b in [ord("\n"), *range(0x20, 0x7F)]:
        tokens.append(b2u[b])
        types.append(gguf.TokenType.NORMAL)
    known = set(tokens)
    merges: list[str] = []
    for word in WORDS:
        pieces = [b2u[b] for b in f" {word}".encode("ascii")]
        current = pieces[0]
        for nxt in pieces[1:]:
            merged = current + nxt
            if merged not in known:
                known.add(merged)
                tokens.append(merged)
                types.append(gguf.TokenType.NORMAL)
                merges.append(f"{current} {nxt}")
            current = merged
    return Vocab(tokens=tokens, types=[int(t) for t in types], merges=merges)


def gaussian(rng: np.random.RandomState, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def make_tensors(vocab: Vocab, rng: np.random.RandomState) -> dict[str, np.ndarray]:
    """All weights, in GGUF order; numpy shapes are (out, in), i.e. GGUF's ne reversed."""
    head_dim = N_EMBD // N_HEAD
    n_control = len(CONTROL_TOKENS)
    embd = gaussian(rng, (vocab.size, N_EMBD), EMBD_STD)
    embd[:, 0] = BIAS_CHANNEL
    output = gaussian(rng, (vocab.size, N_EMBD), OUTPUT_STD)
    output[:, 0] = 0.0
    output[:n_control, 0] = -SUPPRESS
    tensors = {"token_embd.weight": embd}
    for i in range(N_LAYER):
        tensors.update(make_block(i, head_dim, rng))
    tensors["output_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
    tensors["output.weight"] = output
    return tensors


def make_block(i: int, head_dim: int, rng: np.random.RandomState) -> dict[str, np.ndarray]:
    """One transformer block; row 0 of both output projections is zero to keep the bias channel fixed."""
    attn_out = gaussian(rng, (N_EMBD, N_HEAD * head_dim), LAYER_STD)
    ffn_down = gaussian(rng, (N_EMBD, N_FF), LAYER_STD)
    attn_out[0, :] = 0.0
    ffn_down[0, :] = 0.0
    ones = np.ones(N_EMBD, dtype=np.float32)
    return {
        f"blk.{i}.attn_norm.weight": ones,
        f"blk.{i}.attn_q.weight": gaussian(rng, (N_HEAD * head_dim, N_EMBD), LAYER_STD),
        f"blk.{i}.attn_k.weight": gaussian(rng, (N_HEAD_KV * head_dim, N_EMBD), LAYER_STD),
        f"blk.{i}.attn_v.weight": gaussian(rng, (N_HEAD_KV * head_dim, N_EMBD), LAYER_STD),
        f"blk.{i}.attn_output.weight": attn_out,
        f"blk.{i}.ffn_norm.weight": ones.copy(),
        f"blk.{i}.ffn_gate.weight": gaussian(rng, (N_FF, N_EMBD), LAYER_STD),
        f"blk.{i}.ffn_up.weight": gaussian(rng, (N_FF, N_EMBD), LAYER_STD),
        f"blk.{i}.ffn_down.weight": ffn_down,
    }


def add_metadata(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_name("sparkgate tiny random llama")
    writer.add_description("Random weights, ASCII-only vocab; for tests only (scripts/make_tiny_gguf.py).")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_string(VERSION_KEY, CONTENT_VERSION)
    writer.add_vocab_size(vocab.size)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    add_tokenizer(writer, vocab)


def add_tokenizer(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.tokens.index(BOS))
    writer.add_eos_token_id(vocab.tokens.index(EOS))
    writer.add_pad_token_id(vocab.tokens.index(BOS))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_model(path: Path) -> None:
    """Write the model to a temporary file next to ``path`` and rename it into place."""
    vocab = build_vocab()
    tensors = make_tensors(vocab, np.random.RandomState(SEED))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, "llama")
        add_metadata(writer, vocab)
        for name, data in tensors.items():
            writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def existing_version(path: Path) -> str | None:
    """The content version stored in an existing file, or None if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        field = gguf.GGUFReader(path).fields.get(VERSION_KEY)
        if field is None:
            return None
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception:  # a truncated or foreign file is simply regenerated
        return None


def ensure_model(path: Path) -> bool:
    """Make sure ``path`` holds the current model; return True if it had to be (re)written."""
    if existing_version(path) == CONTENT_VERSION:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_model(path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight llama GGUF for engine tests.")
    parser.add_argument("output", type=Path, help="where to write the .gguf file")
    args = parser.parse_args(argv)
    path: Path = args.output.resolve()
    ensure_model(path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
