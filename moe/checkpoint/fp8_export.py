"""FP8 checkpoints written as llm-compressor and AutoFP8 write them, for the tests and benchmarks.

raymix serves the FP8 checkpoints those tools make (moe.checkpoint.quantization); this writes the same
layouts from an unquantized checkpoint, with no calibration data, so that every variant can be
tested against a reference: `write_fp8` (compressed-tensors `float-quantized` or AutoFP8's
`fp8`; weight scales per tensor, per channel or per block; dynamic or static activations; an
ignore list; experts named `w1/w3/w2` or `gate_proj/up_proj/down_proj`) and `write_dequantized`
(every FP8 weight replaced by the float32 values it stands for: the model transformers runs
as the reference). Layouts as measured on llm-compressor 0.14 and read in AutoFP8's source:
compressed-tensors scales are [N, 1] per channel, [1] per tensor and [N/bn, K/bk] per block, in
the source's dtype; AutoFP8's are 0-dim float32; static activation scales are `input_scale`.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe.checkpoint.quantization import QuantizationConfig
from moe.checkpoint.reader import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointReader,
    expert_prefix,
    expert_shapes,
    linear_modules,
)
from moe.config import ModelConfig
from moe.layers.fp8 import FP8, FP8_MAX, Fp8Tensor
from moe.models import family

STATIC_INPUT_SCALE = 8.0 / FP8_MAX  # activations up to |8| (normed inputs of unit variance)


def _ignored(module: str, ignore: list[str]) -> bool:
    """compressed-tensors' and AutoFP8's rule: an exact name, or "re:" and a pattern."""
    return any(re.match(p[3:], module) if p.startswith("re:") else module == p for p in ignore)


def quantize_as_stored(
    w: torch.Tensor, strategy: str, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] → (FP8 values [N, K], scale: [] per tensor, [N, 1] per channel, [N/bn, K/bk] per block)."""
    w32 = w.float()
    if strategy == "channel":
        scale = w32.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # [N, 1]
        expanded = scale
    elif strategy == "tensor":
        scale = w32.abs().amax().clamp(min=1e-12) / FP8_MAX  # []
        expanded = scale
    else:
        n, k = w32.shape
        bn, bk = block
        padded = torch.zeros(-(-n // bn) * bn, -(-k // bk) * bk)
        padded[:n, :k] = w32.abs()
        scale = padded.view(-(-n // bn), bn, -(-k // bk), bk).amax((1, 3)).clamp(min=1e-12) / FP8_MAX
        expanded = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (w32 / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def write_fp8(
    src: str | Path,
    out: str | Path,
    fmt: str = "compressed-tensors",
    strategy: str = "channel",
    activations: str | None = "dynamic",
    expert_names: int = 0,
    ignore: tuple[str, ...] | None = None,
    block: tuple[int, int] = (128, 128),
) -> Path:
    """An FP8 copy of the unquantized checkpoint `src` in `out` (tokenizer and configs copied).

    fmt: "compressed-tensors" (strategy "tensor", "channel" or "block"; activations "dynamic",
    "static" or None) or "fp8" (AutoFP8: strategy "tensor", activations "dynamic" or "static";
    strategy "block" with dynamic activations is the `weight_block_size` variant). expert_names:
    which of the family's namings the experts are written in (Mixtral: 0 the Hub's w1/w3/w2, 1
    gate_proj/up_proj/down_proj as llm-compressor writes them under transformers 5). ignore:
    modules left unquantized (default: the LM head and the routers' gates, as published)."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_FILE:
            shutil.copyfile(f, out / f.name)
    cfg = ModelConfig.from_pretrained(src)
    if ignore is None:
        ignore = ("lm_head", f"re:.*{family(cfg.model_type).moe_block}.gate$", "re:.*shared_expert_gate$")
    reader = CheckpointReader(src)
    style = reader.expert_style(cfg)
    linears = linear_modules(cfg) | set(expert_shapes(cfg, range(cfg.num_local_experts), style))
    renamed = {}  # an expert's module (as stored) → the name written
    if expert_names != style:
        for layer, e, w in itertools.product(
            cfg.moe_layers, range(cfg.num_local_experts), ("gate", "up", "down")
        ):
            renamed[expert_prefix(cfg, layer, e, w, style)] = expert_prefix(cfg, layer, e, w, expert_names)
    tensors: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    for name in reader.weight_map:
        with safe_open(str(reader.weight_map[name]), framework="pt") as f:
            t = f.get_tensor(name)
        module = name.removesuffix(".weight")
        target = renamed.get(module, module)
        if module not in linears or _ignored(target, list(ignore)):
            tensors[target + name[len(module) :]] = t
            continue
        data, scale = quantize_as_stored(t, strategy, block)
        tensors[target + ".weight"] = data
        if fmt == "fp8":
            key = "weight_scale_inv" if strategy == "block" else "weight_scale"
            tensors[f"{target}.{key}"] = scale.float()
        else:
            tensors[target + ".weight_scale"] = (
                scale.reshape(1) if strategy == "tensor" else scale.to(t.dtype)
            )
        if activations == "static":
            tensors[target + ".input_scale"] = torch.tensor(STATIC_INPUT_SCALE).reshape(
                1 if fmt != "fp8" else ()
            )
        quantized.append(target)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out / SINGLE_FILE), metadata={"format": "pt"}
    )
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = _config(fmt, strategy, activations, list(ignore), block, quantized, renamed)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    QuantizationConfig.parse(raw["quantization_config"])  # what is written is what raymix reads
    return out


def _config(
    fmt: str,
    strategy: str,
    activations: str | None,
    ignore: list[str],
    block: tuple[int, int],
    quantized: list[str],
    renamed: dict[str, str],
) -> dict:
    if fmt == "fp8":
        cfg: dict = {"quant_method": "fp8", "activation_scheme": activations or "dynamic"}
        cfg["ignored_layers"] = sorted(ignore)
        if strategy == "block":
            cfg["weight_block_size"] = list(block)
        return cfg
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    if strategy == "block":
        weights["block_structure"] = list(block)
    acts = None
    if activations is not None:
        acts = {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "token" if activations == "dynamic" else "tensor",
            "dynamic": activations == "dynamic",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
        "ignore": ignore,
    }


def write_dequantized(fp8_dir: str | Path, out: str | Path) -> Path:
    """The reference of an FP8 checkpoint: every FP8 weight as the float32 values it stands for,
    experts under the family's first names (the Hub's), no quantization_config (transformers runs
    it in float32)."""
    fp8_dir, out = Path(fp8_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in fp8_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_FILE:
            shutil.copyfile(f, out / f.name)
    raw = json.loads((fp8_dir / "config.json").read_text())
    quant = QuantizationConfig.parse(raw.pop("quantization_config"))
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    names = family(ModelConfig.from_pretrained(out).model_type).expert_names
    reader = CheckpointReader(fp8_dir)
    tensors = {}
    scales = {n for n in reader.weight_map if n.endswith(("_scale", "_scale_inv"))}
    for name in reader.weight_map:
        if name in scales:
            continue
        with safe_open(str(reader.weight_map[name]), framework="pt") as f:
            t = f.get_tensor(name)
        module = name.removesuffix(".weight")
        if t.dtype == FP8:
            weight_scale, _ = reader.scale_names(module)
            assert weight_scale is not None
            with safe_open(str(reader.weight_map[weight_scale]), framework="pt") as f:
                scale = f.get_tensor(weight_scale)
            t = Fp8Tensor.from_checkpoint(name, t, scale, None, quant.weight_block).dequantize(torch.float32)
        for written in names[1:]:  # back to the first naming
            for proj, first in zip(written, names[0], strict=True):
                name = re.sub(rf"(\.experts\.\d+)\.{proj}\.", rf"\1.{first}.", name)
        tensors[name] = t.float() if t.is_floating_point() else t
    save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
    return out
