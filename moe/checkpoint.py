"""Reading a Hugging Face Mixtral checkpoint: one `model.safetensors` or a sharded set with
`model.safetensors.index.json`.

Only the tensors asked for are read (safetensors maps the file and copies just those), so a
router loads the dense part alone and an expert shard loads only its experts of every layer.
Every tensor read is recorded in `CheckpointReader.tensors_read`, which is how the tests check
that a shard never touches another shard's experts. Only safetensors is accepted: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from moe.config import MixtralConfig
from moe.errors import CheckpointError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[key]


def dense_tensor_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor of the dense part (all but the experts)."""
    h, d = cfg.hidden_size, cfg.attn_head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "block_sparse_moe.gate.weight": (cfg.num_local_experts, h),
        }
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def expert_tensor_name(layer: int, expert: int, w: str) -> str:
    """w is w1 (gate proj), w3 (up proj) or w2 (down proj), as in the Hub layout."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


def expert_tensor_shapes(cfg: MixtralConfig, expert_ids: Iterable[int]) -> dict[str, tuple[int, ...]]:
    """Name → shape of the given experts' weights in every layer."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(cfg.num_hidden_layers):
        for e in expert_ids:
            shapes[expert_tensor_name(layer, e, "w1")] = (i, h)
            shapes[expert_tensor_name(layer, e, "w3")] = (i, h)
            shapes[expert_tensor_name(layer, e, "w2")] = (h, i)
    return shapes


REVISION_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def checkpoint_revision(model_dir: str | Path) -> str:
    """A content hash naming what is served (16 hex digits): the config, generation config and
    tokenizer files, and the weights' index (or, for unindexed safetensors files, each file's
    header: its tensor names, dtypes, shapes and offsets). It changes when any of them does and
    costs no read of the weights."""
    d = Path(model_dir)
    h = hashlib.sha256()
    names = [*REVISION_FILES, *sorted(p.name for p in d.glob("tokenizer.model*")), INDEX_FILE]
    for name in names:
        f = d / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    if not (d / INDEX_FILE).is_file():
        for f in sorted(d.glob("*.safetensors")):
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(f.name.encode() + b"\0" + fh.read(min(n, 100_000_000)) + b"\0")
    return h.hexdigest()[:16]


class CheckpointReader:
    """Maps tensor names to the safetensors file holding them and reads chosen tensors."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: model directory does not exist")
        self.tensors_read: list[str] = []
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                raw = json.loads(index.read_text())
                entries = raw["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed index, expected a 'weight_map' ({e})") from None
            wm = {name: self.model_dir / fname for name, fname in entries.items()}
            for f in sorted(set(wm.values())):
                if not f.is_file():
                    raise CheckpointError(f"{f}: listed in {INDEX_FILE} but the file is missing")
            return wm
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.model_dir.glob("*.bin")] + [
                p.name for p in self.model_dir.glob("*.pt")
            ]
            hint = (
                f" (found {pickles[0]}: pickle checkpoints are refused, convert to safetensors)"
                if pickles
                else ""
            )
            raise CheckpointError(f"{self.model_dir}: no *.safetensors weights{hint}")
        wm = {}
        for f in files:
            for name in self._open(f).keys():  # noqa: SIM118 (safe_open is not iterable)
                wm[name] = f
        return wm

    def _open(self, path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    def load(
        self,
        shapes: dict[str, tuple[int, ...]],
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Read exactly the named tensors, checking each against its expected shape."""
        missing = [n for n in shapes if n not in self.weight_map]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"{self.model_dir}: tensor {missing[0]!r} is missing from the checkpoint{more}"
            )
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in shapes:
            by_file[self.weight_map[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        start, total = time.perf_counter(), len(by_file)
        for k, (path, names) in enumerate(sorted(by_file.items()), 1):
            f = self._open(path)
            with f:
                for name in names:
                    try:
                        t = f.get_tensor(name)
                    except Exception as e:
                        raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None
                    if tuple(t.shape) != tuple(shapes[name]):
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shapes[name])}"
                        )
                    if not t.is_floating_point():
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has dtype {t.dtype}, expected a float type"
                        )
                    out[name] = t.to(device=device, dtype=dtype or t.dtype)
                    self.tensors_read.append(name)
            log.info(
                "loaded %d tensors from %s (%d/%d files, %.1fs)",
                len(names),
                path.name,
                k,
                total,
                time.perf_counter() - start,
            )
        return out
