"""Reading a Hugging Face checkpoint of a family raymix serves (moe.models): one
`model.safetensors` or a sharded set with `model.safetensors.index.json`.

Only the tensors asked for are read (safetensors maps the file and copies just those), so a
router loads the dense part alone and an expert shard loads only its experts of every layer.
Every tensor read is recorded in `CheckpointReader.tensors_read`, which is how the tests check
that a shard never touches another shard's experts. Only safetensors is accepted: no pickle.

`CheckpointReader.check` reads the files' headers only (names, dtypes, shapes) and refuses, in
one line, any tensor raymix cannot use as it is stored, before a weight is read. Linear layers
load as plain tensors or, stored FP8 (or quantized at load), as moe.layers.fp8 tensors with their scales.
Tensors are named as the family's checkpoints name them (`dense_tensor_shapes`, `expert_prefix`);
Mixtral's experts as the Hub's files name them (`experts.{e}.w1/w3/w2`) or as llm-compressor
writes them under transformers 5 (`experts.{e}.gate_proj/up_proj/down_proj`).
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

from moe.checkpoint.quantization import QuantizationConfig
from moe.config import ModelConfig
from moe.errors import CheckpointError
from moe.layers.fp8 import Fp8Tensor
from moe.layers.weights import Weight
from moe.models import family

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PLAIN = ("F32", "BF16", "F16")  # safetensors dtypes read as they are (cast to the compute dtype)
FP8_STORED = "F8_E4M3"  # a linear weight with its scale (moe.layers.fp8)
WEIGHT_SCALES = ("weight_scale", "weight_scale_inv")  # compressed-tensors and AutoFP8; block FP8's
INPUT_SCALES = ("input_scale", "act_scale")  # AutoFP8 wrote act_scale before June 2024


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[key]


def dense_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor the router holds: all but the routed experts (attention, norms,
    the gates, shared experts and dense layers' MLPs, embeddings, LM head), as the family names them."""
    h = cfg.hidden_size
    moe_block = family(cfg.model_type).moe_block
    moe_layers = set(cfg.moe_layers)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        shapes |= mla_shapes(cfg, p + "self_attn.") if cfg.is_mla else attention_shapes(cfg, p + "self_attn.")
        if layer in moe_layers:
            shapes[p + moe_block + ".gate.weight"] = (cfg.num_local_experts, h)
            if cfg.topk_method == "noaux_tc":
                shapes[p + moe_block + ".gate.e_score_correction_bias"] = (cfg.num_local_experts,)
            if cfg.shared_expert_intermediate_size:
                shared = f"{p}mlp.{family(cfg.model_type).shared_expert}."
                shapes |= mlp_shapes(shared, h, cfg.shared_expert_intermediate_size)
                if cfg.shared_expert_gate:
                    shapes[p + "mlp.shared_expert_gate.weight"] = (1, h)
        else:
            shapes |= mlp_shapes(p + "mlp.", h, cfg.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def attention_shapes(cfg: ModelConfig, a: str) -> dict[str, tuple[int, ...]]:
    """GQA attention's weights under `a` (q/k/v/o projections, biases and q/k norms as the family has them)."""
    h, d = cfg.hidden_size, cfg.attn_head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        a + "q_proj.weight": (q, h),
        a + "k_proj.weight": (kv, h),
        a + "v_proj.weight": (kv, h),
        a + "o_proj.weight": (h, q),
    }
    if cfg.qkv_bias:
        shapes |= {a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)}
    if cfg.o_bias:
        shapes[a + "o_proj.bias"] = (h,)
    if cfg.qk_norm is not None:
        per_head = cfg.qk_norm == "head"
        shapes[a + "q_norm.weight"] = (d,) if per_head else (q,)
        shapes[a + "k_norm.weight"] = (d,) if per_head else (kv,)
    return shapes


def mla_shapes(cfg: ModelConfig, a: str) -> dict[str, tuple[int, ...]]:
    """Multi-head latent attention's weights under `a` (moe.layers.mla), as DeepSeek names them."""
    h, nh, r, rq = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.q_lora_rank
    qk, dr = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim
    shapes: dict[str, tuple[int, ...]] = {
        a + "kv_a_proj_with_mqa.weight": (r + dr, h),
        a + "kv_a_layernorm.weight": (r,),
        a + "kv_b_proj.weight": (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), r),
        a + "o_proj.weight": (h, nh * cfg.v_head_dim),
    }
    if rq:
        shapes |= {
            a + "q_a_proj.weight": (rq, h),
            a + "q_a_layernorm.weight": (rq,),
            a + "q_b_proj.weight": (nh * qk, rq),
        }
    else:
        shapes[a + "q_proj.weight"] = (nh * qk, h)
    if cfg.qkv_bias:
        shapes[a + "kv_a_proj_with_mqa.bias"] = (r + dr,)
        if rq:
            shapes[a + "q_a_proj.bias"] = (rq,)
    if cfg.o_bias:
        shapes[a + "o_proj.bias"] = (h,)
    return shapes


def mlp_shapes(prefix: str, h: int, i: int) -> dict[str, tuple[int, ...]]:
    """A SwiGLU MLP's weights under `prefix`: gate_proj and up_proj [I, H], down_proj [H, I]."""
    return {
        prefix + "gate_proj.weight": (i, h),
        prefix + "up_proj.weight": (i, h),
        prefix + "down_proj.weight": (h, i),
    }


def expert_prefix(cfg: ModelConfig, layer: int, expert: int, w: str, style: int = 0) -> str:
    """The module name of an expert's projection w ("gate", "up" or "down") in the family's
    naming `style` (an index into Family.expert_names: Mixtral's 0 is the Hub's w1/w3/w2, 1
    transformers' gate_proj/up_proj/down_proj), e.g. `model.layers.0.block_sparse_moe.experts.3.w1`."""
    f = family(cfg.model_type)
    name = f.expert_names[style][("gate", "up", "down").index(w)]
    return f"model.layers.{layer}.{f.moe_block}.experts.{expert}.{name}"


def expert_shapes(cfg: ModelConfig, expert_ids: Iterable[int], style: int = 0) -> dict[str, tuple[int, int]]:
    """Module name → weight shape [N, K] of the given experts' projections in every MoE layer."""
    h, i = cfg.hidden_size, cfg.expert_intermediate_size
    shapes: dict[str, tuple[int, int]] = {}
    for layer in cfg.moe_layers:
        for e in expert_ids:
            shapes[expert_prefix(cfg, layer, e, "gate", style)] = (i, h)
            shapes[expert_prefix(cfg, layer, e, "up", style)] = (i, h)
            shapes[expert_prefix(cfg, layer, e, "down", style)] = (h, i)
    return shapes


def expert_tensor_shapes(
    cfg: ModelConfig, expert_ids: Iterable[int], style: int = 0
) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of the given experts' weights in every MoE layer."""
    return {p + ".weight": shape for p, shape in expert_shapes(cfg, expert_ids, style).items()}


def linear_modules(cfg: ModelConfig) -> set[str]:
    """The router's linear layers (attention projections, MLPs, gates, LM head): their weights may
    be stored FP8. An expert's projections are linear layers too (`expert_shapes`)."""
    shapes = dense_tensor_shapes(cfg)
    linear = ("_proj.weight", "gate.weight", "_proj_with_mqa.weight")
    names = {n.removesuffix(".weight") for n in shapes if n.endswith(linear)}
    return names | ({"lm_head"} if not cfg.tie_word_embeddings else set())


REVISION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


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
        self._headers: dict[str, tuple[str, tuple[int, ...]]] | None = None

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

    def header(self, name: str) -> tuple[str, tuple[int, ...]]:
        """A tensor's safetensors dtype ("BF16", "F8_E4M3", ...) and shape, from its file's header:
        no data is read."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint")
        if self._headers is None:
            self._headers = {}
            for path in sorted(set(self.weight_map.values())):
                with self._open(path) as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        sl = f.get_slice(key)
                        self._headers[key] = (sl.get_dtype(), tuple(sl.get_shape()))
        if name not in self._headers:
            raise CheckpointError(f"{self.weight_map[name]}: tensor {name!r} is missing from the file")
        return self._headers[name]

    def expert_style(self, cfg: ModelConfig) -> int:
        """Which of its family's namings this checkpoint gives the experts (see `expert_prefix`)."""
        if not cfg.is_moe:
            return 0
        layer, names = cfg.moe_layers[0], family(cfg.model_type).expert_names
        found = (
            s
            for s in range(len(names))
            if expert_prefix(cfg, layer, 0, "gate", s) + ".weight" in self.weight_map
        )
        return next(found, 0)

    def scale_names(self, module: str) -> tuple[str | None, str | None]:
        """The weight scale's and the static input scale's tensor names of an FP8 linear (None: absent)."""
        weight = next((f"{module}.{s}" for s in WEIGHT_SCALES if f"{module}.{s}" in self.weight_map), None)
        inputs = next((f"{module}.{s}" for s in INPUT_SCALES if f"{module}.{s}" in self.weight_map), None)
        return weight, inputs

    def check(self, cfg: ModelConfig, quant: QuantizationConfig | None) -> None:
        """Every tensor the model reads is present, of its shape, and stored in a dtype raymix
        uses as it is: bf16/fp16/fp32, or, for a linear layer's weight in a checkpoint whose
        config says FP8, FP8 E4M3 with its scale (and its input scale when activations are
        static). Headers only; a CheckpointError names the first tensor that is not."""
        style = self.expert_style(cfg)
        linears = {m + ".weight" for m in linear_modules(cfg)}
        expected = dense_tensor_shapes(cfg) | expert_tensor_shapes(cfg, range(cfg.num_local_experts), style)
        for name, shape in expected.items():
            dtype, stored = self.header(name)
            where = self.weight_map[name]
            if stored != tuple(shape):
                raise CheckpointError(f"{where}: tensor {name!r} has shape {stored}, expected {tuple(shape)}")
            if dtype in PLAIN:
                continue
            module = name.removesuffix(".weight")
            linear = name in linears or ".experts." in name
            if dtype != FP8_STORED or not linear:
                raise CheckpointError(
                    f"{where}: tensor {name!r} is stored as {dtype}; raymix reads "
                    "F32, BF16 or F16 tensors, and F8_E4M3 linear weights with their scales"
                )
            if quant is None or quant.method == "online":
                raise CheckpointError(
                    f"{where}: tensor {name!r} is FP8 but config.json has no quantization_config "
                    "saying how to read it"
                )
            weight_scale, input_scale = self.scale_names(module)
            if weight_scale is None:
                raise CheckpointError(
                    f"{where}: FP8 tensor {name!r} has no scale ({module}.weight_scale is missing)"
                )
            if quant.activation == "static" and input_scale is None:
                raise CheckpointError(
                    f"{where}: FP8 tensor {name!r} has no static activation scale "
                    f"({module}.input_scale is missing; the config says activations are static)"
                )

    def load_linears(
        self,
        shapes: dict[str, tuple[int, int]],
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        quant: QuantizationConfig | None = None,
        quantize: bool = False,
    ) -> dict[str, Weight]:
        """Module name → its weight [N, K]: a plain tensor in `dtype`, or an Fp8Tensor where it is
        stored FP8 (with its scales) or, with `quantize` and `--quantization fp8` (quant.method
        "online"), quantized here per output channel, from the stored precision."""
        static = quant is not None and quant.activation == "static"
        fp8: dict[str, tuple[str, str | None]] = {}  # module → (weight scale, static input scale)
        names: dict[str, tuple[int, ...]] = {m + ".weight": shapes[m] for m in shapes}
        for m in shapes:
            if self.header(m + ".weight")[0] == FP8_STORED:
                weight_scale, input_scale = self.scale_names(m)
                assert weight_scale is not None  # check() refused it otherwise
                fp8[m] = (weight_scale, input_scale if static else None)
                names |= {n: self.header(n)[1] for n in fp8[m] if n is not None}
        out: dict[str, Weight] = {}
        for layer in _by_layer(shapes):  # a layer at a time: the host holds one layer's raw tensors
            raw = self.load(
                {n: names[n] for m in layer for n in (m + ".weight", *fp8.get(m, ())) if n}, None, "cpu"
            )
            for m in layer:
                w = raw.pop(m + ".weight").to(device)  # the device holds one raw tensor beyond the result
                if m in fp8:
                    weight_scale, input_scale = fp8[m]
                    block = quant.weight_block if quant is not None else None
                    s_in = raw.pop(input_scale).to(device) if input_scale else None
                    out[m] = Fp8Tensor.from_checkpoint(m, w, raw.pop(weight_scale).to(device), s_in, block)
                elif quantize and quant is not None and quant.method == "online":
                    out[m] = Fp8Tensor.quantize(w)
                else:
                    out[m] = w.to(dtype)
        return out

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
                    if not t.is_floating_point() or (dtype is not None and t.dtype == torch.float8_e4m3fn):
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has dtype {t.dtype}, expected bf16, fp16 or fp32"
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


def _by_layer(modules: Iterable[str]) -> list[list[str]]:
    """Module names grouped by their layer (`model.layers.{l}.`; the rest together), in order."""
    groups: dict[str, list[str]] = {}
    for m in modules:
        key = ".".join(m.split(".")[:3]) if m.startswith("model.layers.") else ""
        groups.setdefault(key, []).append(m)
    return list(groups.values())


def open_checkpoint(
    model_dir: str | Path, quantization: str | None = None
) -> tuple[ModelConfig, QuantizationConfig | None, CheckpointReader]:
    """A checkpoint's config, its quantization (or `quantization`, "fp8": quantized at load) and a
    reader, every tensor's header checked: what raymix cannot serve is refused here, in one line,
    before any weight is read."""
    cfg = ModelConfig.from_pretrained(model_dir)
    quant = QuantizationConfig.from_pretrained(model_dir, quantization)
    reader = CheckpointReader(model_dir)
    reader.check(cfg, quant)
    return cfg, quant, reader
