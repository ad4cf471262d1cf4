"""FP8 weights in memory: E4M3 values with their scales, and the matmuls that read them.

An `Fp8Tensor` is one linear layer's weight, or a stack of them (one per expert): `data`
[..., N, K] in float8_e4m3fn, one byte a value (half of bf16), and `scale` in float32, per output
row [..., N] (a per-tensor scale is kept expanded to its rows: exact, and lets w1 and w3 stack
into one gate_up) or per block [..., ceil(N/bn), ceil(K/bk)]. `input_scale` [...] is a static
activation scale (None: activations are scaled per token at run time).

Two ways to compute with it, chosen once per process from the device (`w8a8_supported`):
- W8A8 where the GPU has FP8 tensor cores and the model runs in bf16: activations quantized per
  token (or with the static scale), `torch._scaled_mm` for a linear (SM89 and newer) and
  `torch._scaled_grouped_mm` for the experts (SM90, SM100). Block-scaled weights go weight-only.
- weight-only everywhere else (CPU, older GPUs): the FP8 values cast to the compute dtype on the
  fly, the matmul in that dtype and the per-row scale applied to its output, which is the same
  product: (x Wq^T) * s = x (Wq * s)^T. On the CPU the cast is compiled (`cast`): eager PyTorch
  converts FP8 one element at a time, 10x slower than inductor's vectorized loop (measured:
  5.6 vs 0.54 ms for a 3584 x 512 weight, one thread), which made FP8 decode 15x slower than
  float32 there.
The reference in the tests is every weight dequantized up front, then the unquantized model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe.errors import CheckpointError

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


@dataclass
class Fp8Tensor:
    data: torch.Tensor  # [..., N, K] float8_e4m3fn
    scale: torch.Tensor  # [..., N] per row, or [..., ceil(N/bn), ceil(K/bk)] per block; float32
    input_scale: torch.Tensor | None = None  # [...] static activation scale; None: per token
    block: tuple[int, int] | None = None  # (bn, bk) when the scales are per block

    @classmethod
    def from_checkpoint(
        cls,
        name: str,
        weight: torch.Tensor,  # [N, K] float8_e4m3fn
        scale: torch.Tensor,  # [] or [1] per tensor, [N] or [N, 1] per channel, [N/bn, K/bk] per block
        input_scale: torch.Tensor | None,  # [] or [1], static activations only
        block: tuple[int, int] | None,
    ) -> Fp8Tensor:
        n, k = weight.shape
        s = scale.float()
        if block is not None:
            want = (-(-n // block[0]), -(-k // block[1]))
            if tuple(s.shape) != want:
                raise CheckpointError(
                    f"tensor {name!r}: block scales of shape {tuple(s.shape)}, expected {want}"
                )
        elif s.numel() == 1:
            s = s.reshape(1).expand(n).contiguous()
        elif s.numel() == n and s.shape[0] == n:
            s = s.reshape(n)
        else:
            raise CheckpointError(
                f"tensor {name!r}: weight scale of shape {tuple(s.shape)} is neither per tensor nor per channel"
            )
        return cls(weight, s, None if input_scale is None else input_scale.float().reshape(()), block)

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Fp8Tensor:
        """w [..., N, K] → FP8 with one scale per output row (what `--quantization fp8` does)."""
        w32 = w.float()
        scale = w32.abs().amax(-1).clamp(min=1e-12) / FP8_MAX  # [..., N]
        return cls((w32 / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight it stands for, [..., N, K] in `dtype` (computed in float32)."""
        n, k = self.data.shape[-2:]
        if self.block is None:
            s = self.scale[..., None]  # [..., N, 1]
        else:
            s = self.scale.repeat_interleave(self.block[0], -2)[..., :n, :]
            s = s.repeat_interleave(self.block[1], -1)[..., :k]  # [..., N, K]
        return (cast(self.data, torch.float32) * s).to(dtype)

    def row_blocks(self) -> Fp8Tensor:
        """The same weight with its block scales repeated per row (blocks of 1 x bk): exact, and
        weights whose row counts are not a multiple of the block's stack along their rows."""
        if self.block is None:
            return self
        n = self.data.shape[-2]
        scale = self.scale.repeat_interleave(self.block[0], -2)[..., :n, :]
        return Fp8Tensor(self.data, scale.contiguous(), self.input_scale, (1, self.block[1]))

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        parts = [self.data, self.scale] + ([self.input_scale] if self.input_scale is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


class _Cast:
    """FP8 values → `dtype`: compiled on the CPU (eager falls back, with one warning, where
    inductor cannot build: no C++ compiler), plain `.to` on GPUs, where it is fast already."""

    def __init__(self) -> None:
        self.compiled: Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None = None
        self.failed = False

    def __call__(self, data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if data.device.type != "cpu" or self.failed:
            return data.to(dtype)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(lambda t, dt: t.to(dt), dynamic=True)
            return self.compiled(data, dtype)
        except Exception as e:  # inductor's build failed (dynamo raises many kinds)
            log.warning("FP8 weights: compiled cast unavailable (%s); casting eagerly, ~10x slower", e)
            self.failed = True
            return data.to(dtype)


cast = _Cast()


def w8a8_supported(device: torch.device, dtype: torch.dtype, grouped: bool = False) -> bool:
    """Whether FP8 matmuls (activations quantized too) run here: a CUDA GPU with FP8 tensor cores
    (SM89+ for `_scaled_mm`, SM90/SM100 for `_scaled_grouped_mm`) and a bf16 model (the row-wise
    scaled kernels write bf16)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return False
    cap = torch.cuda.get_device_capability(device)
    if grouped:
        return cap in ((9, 0), (10, 0)) and hasattr(torch, "_scaled_grouped_mm")
    return cap >= (8, 9)


def quantize_activations(
    x: torch.Tensor, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → (x_q [M, K] float8_e4m3fn, scale [M, 1] float32), x ≈ x_q * scale: per token
    (each row's largest value maps to 448), or the static input_scale ([] or one per row [M])."""
    if input_scale is None:
        s = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [M, 1]
    else:
        s = input_scale.float().reshape(-1, 1).expand(x.shape[0], 1).contiguous()  # [M, 1]
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def linear(x: torch.Tensor, w: Fp8Tensor, w8a8: bool = False) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T → [M, N] in x's dtype."""
    if w8a8 and w.block is None:
        xq, sa = quantize_activations(x, w.input_scale)
        # the weight [N, K] row-major is the column-major [K, N] _scaled_mm wants
        return torch._scaled_mm(xq, w.data.t(), scale_a=sa, scale_b=w.scale[None, :], out_dtype=x.dtype)
    if w.block is not None:
        return F.linear(x, w.dequantize(x.dtype))
    return F.linear(x, cast(w.data, x.dtype)) * w.scale.to(x.dtype)


def grouped_mm(
    x: torch.Tensor,  # [M, K] rows sorted by group
    w: Fp8Tensor,  # [G, N, K]
    offs: torch.Tensor,  # [G] int32 end row of each group; rows past offs[-1] are left unwritten
    group: torch.Tensor,  # [M] each row's group (≥ G past the last group)
    w8a8: bool = False,
) -> torch.Tensor:
    """Row r times w[group[r]]^T → [M, N] in x's dtype, one grouped GEMM."""
    g = group.clamp(max=w.data.shape[0] - 1)  # [M]
    if w8a8 and w.block is None:
        xq, sa = quantize_activations(x, None if w.input_scale is None else w.input_scale[g])
        return torch._scaled_grouped_mm(
            xq, w.data.transpose(-2, -1), sa.reshape(-1), w.scale, offs=offs, out_dtype=x.dtype
        )
    if x.device.type == "cpu":  # cast only the groups with rows (a host read, free on the CPU):
        hit = torch.diff(offs, prepend=offs.new_zeros(1)) > 0  # [G]  # a decode step hits few
        if not bool(hit.all()):
            if not bool(hit.any()):
                return x.new_zeros(x.shape[0], w.data.shape[-2])  # no row here: all are unwritten
            idx = hit.nonzero().squeeze(1)  # dropping empty groups keeps the others' end rows
            sub = Fp8Tensor(w.data[idx], w.scale[idx], None, w.block)
            return grouped_mm(x, sub, offs[idx], torch.searchsorted(idx, g), w8a8)
    if w.block is not None:
        return F.grouped_mm(x, w.dequantize(x.dtype).transpose(-2, -1), offs=offs)
    return F.grouped_mm(x, cast(w.data, x.dtype).transpose(-2, -1), offs=offs) * w.scale[g].to(x.dtype)
