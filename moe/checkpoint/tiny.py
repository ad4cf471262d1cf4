"""The embedded default model: a tiny Mixtral-format checkpoint generated from a seed (and tiny
dense Mistral ones for the tests).

`make_tiny(dir)` writes what a Hugging Face Mixtral checkpoint holds — config.json,
generation_config.json, safetensors under the Hub tensor names (one file, or several with
model.safetensors.index.json), the tokenizer (tokenizer.model + tokenizer.json +
tokenizer_config.json with a chat template) — so transformers' `MixtralForCausalLM` loads the
same directory. The tokenizer is Mistral's real one, shipped in the mistral-common package:
v3 (Mixtral 8x22B's, with the tool-call control tokens) by default, or v1 (Mixtral 8x7B's). The
v3 file is also written as `tokenizer.model.v3`, which selects the mistral-common chat format.
Nothing is downloaded. The weights are random, scaled so that routing spreads over all experts
and greedy choices are well separated (token-exact comparisons are meaningful).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moe.checkpoint.reader import INDEX_FILE, SINGLE_FILE, dense_tensor_shapes, expert_tensor_shapes
from moe.config import ModelConfig

log = logging.getLogger(__name__)

TOKENIZER_FILES = {
    "v1": "tokenizer.model.v1",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
}
VOCAB_SIZES = {"v1": 32000, "v3": 32768}
FORMAT_VERSION = 2  # of the files make_tiny writes; part of the cached default model's name

# Mistral's instruct format: [INST] user [/INST] answer</s>; a system prompt goes in front of
# the last user message, as mistral-common does it. No spaces after the control tokens: the
# tokenizer gives every run of text between them its leading "▁" (see _sentencepiece_spaces).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', last_user=-1) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}"
    "{%- elif m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if loop.index0 == ns.last_user and ns.system -%}"
    "{{ '[INST]' + ns.system + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{%- else -%}{{ '[INST]' + m['content'] + '[/INST]' }}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + eos_token }}"
    "{%- elif m['role'] != 'system' -%}{{ raise_exception('unsupported role: ' + m['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

TINY = ModelConfig(
    vocab_size=32768,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    rope_theta=1e6,
    rms_norm_eps=1e-5,
    sliding_window=None,
    torch_dtype="float32",
)


def tokenizer_source(version: str) -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / TOKENIZER_FILES[version]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the installed mistral-common does not ship the {version} tokenizer")
    return path


def random_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights: the same (config, seed) always gives the same tensors."""
    g = torch.Generator().manual_seed(seed)
    shapes = dense_tensor_shapes(cfg) | expert_tensor_shapes(cfg, range(cfg.num_local_experts))
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        else:  # linear weights [out, in]: unit-variance outputs for unit-variance inputs
            t = torch.randn(shape, generator=g) / shape[1] ** 0.5
            if name == "lm_head.weight":
                t *= 3.0  # logits of std ~3: a peaked, well-separated next-token distribution
        out[name] = t.to(getattr(torch, cfg.torch_dtype)).contiguous()
    return out


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json a Hugging Face Mixtral (or dense Mistral) checkpoint carries."""
    keys = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "sliding_window",
        "tie_word_embeddings",
        "hidden_act",
        "bos_token_id",
        "eos_token_id",
        "torch_dtype",
    ]
    if cfg.is_moe:
        keys += ["num_local_experts", "num_experts_per_tok"]
    d = {k: getattr(cfg, k) for k in keys if k != "head_dim" or cfg.head_dim is not None}
    arch = "MixtralForCausalLM" if cfg.is_moe else "MistralForCausalLM"
    return d | {"architectures": [arch], "attention_dropout": 0.0}


def write_weights(tensors: dict[str, torch.Tensor], out: Path, num_files: int) -> None:
    if num_files == 1:
        save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
        return
    names = list(tensors)
    per = -(-len(names) // num_files)
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(num_files):
        fname = f"model-{k + 1:05d}-of-{num_files:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * per : (k + 1) * per]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))


def write_tokenizer(out: Path, version: str, mistral_file: bool = True) -> None:
    """mistral_file: also write tokenizer.model.{version}, which selects mistral-common's chat
    format; without it the checkpoint's own chat_template is used (as for Mistral-7B-v0.2)."""
    from transformers import AutoTokenizer

    src = tokenizer_source(version)
    shutil.copyfile(src, out / "tokenizer.model")
    if mistral_file:
        shutil.copyfile(src, out / f"tokenizer.model.{version}")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "model_max_length": 1_000_000,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    # Convert the SentencePiece model to tokenizer.json once here, so loading is fast later.
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    _sentencepiece_spaces(out / "tokenizer.json")


def _sentencepiece_spaces(path: Path) -> None:
    """Make tokenizer.json encode as SentencePiece (and the server) does: every run of text
    starts with "▁", SentencePiece's dummy prefix (transformers' conversion drops it, so "The"
    would lose its "▁"; its Metaspace pre-tokenizer would not add it before " leading", where
    SentencePiece does), words are split and merged as SentencePiece does (see below), and
    decoding strips that one space (the normalizer and decoder of Mistral's own tokenizer.json
    files). Runs between control tokens get the "▁" too, as in theirs, so the chat template
    writes "[INST]" + content."""
    from sentencepiece import SentencePieceProcessor

    spec = json.loads(path.read_text())
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    # SentencePiece's words: a run of whitespace with the text after it ("▁▁▁three"), byte-pair
    # merged by piece score, best first; transformers' conversion ranks the whitespace merges
    # ("▁▁", score -1e9) first, so "   three" became "▁▁" + "▁▁" + "three", not "▁▁▁" + "▁three".
    spec["pre_tokenizer"] = {
        "type": "Split",
        "pattern": {"Regex": "\u2581+[^\u2581]*|[^\u2581]+"},
        "behavior": "Isolated",
        "invert": False,
    }
    sp = SentencePieceProcessor(model_file=str(path.parent / "tokenizer.model"))
    vocab = spec["model"]["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
    merges.sort(key=lambda m: (-sp.get_score(vocab[m[0] + m[1]]), vocab[m[0] + m[1]]))
    spec["model"]["merges"] = merges
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    path.write_text(json.dumps(spec, ensure_ascii=False))


def make_tiny(
    out_dir: str | Path,
    seed: int = 0,
    tokenizer: str = "v3",
    num_files: int = 1,
    mistral_tokenizer_file: bool = True,
    **overrides,
) -> Path:
    """Write a tiny Mixtral checkpoint to `out_dir`; `overrides` change ModelConfig fields
    (model_type="mistral": a dense Mistral). mistral_tokenizer_file: see `write_tokenizer`."""
    if tokenizer not in TOKENIZER_FILES:
        raise ValueError(f"tokenizer must be one of {sorted(TOKENIZER_FILES)}, got {tokenizer!r}")
    if overrides.get("model_type") == "mistral":
        overrides["num_local_experts"] = 0  # its MLP is the router's
    cfg = replace(TINY, vocab_size=VOCAB_SIZES[tokenizer], **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info(
        "writing a tiny %s checkpoint (seed %d, tokenizer %s) to %s", cfg.model_type, seed, tokenizer, out
    )
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2)
    )
    write_weights(random_weights(cfg, seed), out, num_files)
    write_tokenizer(out, tokenizer, mistral_tokenizer_file)
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("RAYMIX_CACHE", Path.home() / ".cache" / "raymix"))


def default_model_dir() -> Path:
    """The embedded default model, generated once into the cache and reused after."""
    key = hashlib.sha256(
        json.dumps([hf_config(TINY), CHAT_TEMPLATE, 0, "v3", FORMAT_VERSION]).encode()
    ).hexdigest()[:12]
    target = cache_dir() / f"tiny-mixtral-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    make_tiny(tmp)
    try:
        tmp.rename(target)  # atomic: concurrent processes agree on one complete copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
