"""A checkpoint's `quantization_config`: what raymix serves, and a one-line refusal for the rest.

raymix serves FP8 E4M3 weights (moe.layers.fp8) in the two formats the published FP8 Mixtrals use:
compressed-tensors `float-quantized` (llm-compressor's; parsed with the compressed-tensors
library: weight scales per tensor, per channel or per block, activations quantized per token at
run time or with a static `input_scale`) and `quant_method: fp8` (AutoFP8's per-tensor scales,
and the block-scaled `weight_block_size` variant). `--quantization fp8` (vLLM's flag) quantizes
a bf16/fp32 checkpoint's linear layers per output channel at load (`online`). Every other method
or scheme (GPTQ, AWQ, bitsandbytes, int8/int4, NVFP4, ...) is refused before a weight is read.

Which tensors are FP8 is read off the checkpoint itself (a weight stored as F8_E4M3 with its
scale), not off the config's ignore lists: the first AutoFP8 Mixtral's config has none, although
its gates are unquantized. The config says how activations are treated and the block size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe.errors import CheckpointError

SUPPORTED = (
    "supported: FP8 E4M3 as compressed-tensors 'float-quantized' (tensor, channel or block weight scales) "
    "or quant_method 'fp8' (AutoFP8), and unquantized bf16/fp16/fp32"
)
WEIGHT_STRATEGIES = ("tensor", "channel", "block")


@dataclass(frozen=True)
class QuantizationConfig:
    """FP8 weights, and how the checkpoint means activations to be treated."""

    method: str  # "compressed-tensors" | "fp8" (AutoFP8 / block FP8) | "online" (--quantization fp8)
    activation: str | None  # "dynamic" (per token at run time) | "static" (input_scale) | None (weight-only)
    weight_block: tuple[int, int] | None = None  # [rows, cols] of a weight scale's block, if block-scaled

    @property
    def name(self) -> str:
        """What /v1/models and /version call it."""
        return "fp8"

    def describe(self) -> str:
        acts = {"dynamic": "activations per token", "static": "static activation scales", None: "weight-only"}
        block = f", {self.weight_block[0]}x{self.weight_block[1]} blocks" if self.weight_block else ""
        return f"fp8 ({self.method}{block}, {acts[self.activation]})"

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, requested: str | None = None
    ) -> QuantizationConfig | None:
        """The checkpoint's quantization (None: unquantized), or `requested` ("fp8": quantize an
        unquantized checkpoint at load). Raises CheckpointError for what raymix cannot serve."""
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raw = {}  # ModelConfig.from_pretrained says what is wrong with it
        found = raw.get("quantization_config") or raw.get("compression_config")
        parsed = cls.parse(found, path) if found is not None else None
        if requested not in (None, "fp8"):
            raise CheckpointError(f"--quantization {requested!r} is not supported (only fp8)")
        if parsed is None and requested == "fp8":
            return cls("online", "dynamic")
        return parsed

    @classmethod
    def parse(cls, raw: Any, path: Path | str = "config.json") -> QuantizationConfig:
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: quantization_config is not an object")
        method = str(raw.get("quant_method", "")).replace("_", "-")
        if method == "compressed-tensors":
            return cls._compressed_tensors(raw, path)
        if method == "fp8":
            return cls._fp8(raw, path)
        raise CheckpointError(
            f"{path}: quantization method {raw.get('quant_method')!r} is not supported ({SUPPORTED})"
        )

    @classmethod
    def _fp8(cls, raw: dict[str, Any], path: Path | str) -> QuantizationConfig:
        """AutoFP8 (`activation_scheme` static or dynamic, per-tensor scales) and its block-scaled
        variant (`weight_block_size`, `weight_scale_inv`, dynamic activations)."""
        scheme = raw.get("activation_scheme", "dynamic")
        if scheme not in ("static", "dynamic"):
            raise CheckpointError(f"{path}: fp8 activation_scheme {scheme!r} is not supported ({SUPPORTED})")
        if raw.get("fmt", "e4m3") != "e4m3":
            raise CheckpointError(f"{path}: fp8 format {raw['fmt']!r} is not supported (only e4m3)")
        block = raw.get("weight_block_size")
        if block is not None and (len(block) != 2 or scheme != "dynamic"):
            raise CheckpointError(
                f"{path}: weight_block_size {block} needs two sizes and dynamic activations"
            )
        return cls("fp8", scheme, tuple(block) if block else None)

    @classmethod
    def _compressed_tensors(cls, raw: dict[str, Any], path: Path | str) -> QuantizationConfig:
        """llm-compressor's format: every config group must be FP8 E4M3 weights (tensor, channel
        or block scales, symmetric) with FP8 activations per token or per tensor, or none."""
        from compressed_tensors.quantization import QuantizationConfig as CTConfig

        try:
            ct = CTConfig.model_validate(raw)
        except Exception as e:  # pydantic's ValidationError: name the first problem only
            first = str(e).splitlines()[1:3]
            raise CheckpointError(
                f"{path}: malformed compressed-tensors config ({' '.join(first)})"
            ) from None
        fmt = str(ct.format or "")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise CheckpointError(f"{path}: compressed-tensors format {fmt!r} is not supported ({SUPPORTED})")
        schemes = set()
        for name, group in (ct.config_groups or {}).items():
            w, a = group.weights, group.input_activations
            what = f"{path}: compressed-tensors group {name!r}"
            if w is None or str(w.type) != "float" or w.num_bits != 8 or not w.symmetric or w.dynamic:
                desc = "none" if w is None else f"{w.type}{w.num_bits} {w.strategy}"
                raise CheckpointError(f"{what}: weights {desc} are not supported ({SUPPORTED})")
            if str(w.strategy) not in WEIGHT_STRATEGIES:
                raise CheckpointError(
                    f"{what}: weight strategy {w.strategy!r} is not supported ({SUPPORTED})"
                )
            if group.output_activations is not None:
                raise CheckpointError(
                    f"{what}: output activation quantization is not supported ({SUPPORTED})"
                )
            if a is None:
                act = None
            elif (
                str(a.type) == "float"
                and a.num_bits == 8
                and a.dynamic
                and str(a.strategy) in ("token", "tensor", "group")
            ):
                act = "dynamic"
            elif str(a.type) == "float" and a.num_bits == 8 and not a.dynamic and str(a.strategy) == "tensor":
                act = "static"
            else:
                raise CheckpointError(
                    f"{what}: input activations {a.type}{a.num_bits} {a.strategy}"
                    f"{' dynamic' if a.dynamic else ''} are not supported ({SUPPORTED})"
                )
            block = tuple(w.block_structure) if str(w.strategy) == "block" and w.block_structure else None
            schemes.add((act, block))
        if len(schemes) != 1:
            raise CheckpointError(
                f"{path}: compressed-tensors groups with different schemes are not supported"
            )
        ((act, block),) = schemes
        return cls("compressed-tensors", act, block)  # type: ignore[arg-type]
