"""A linear layer's weight as it is held, and the matmuls that read it: one place decides how.

A weight [N, K] (or a stack of them, [E, N, K], one per expert) is held as one of:
- a plain tensor in the compute dtype: torch's GEMM (`F.linear`, `F.grouped_mm`); the reference;
- an `Fp8Tensor` (moe.layers.fp8): FP8 values with their scales, W8A8 on FP8 GPUs, weight-only elsewhere;
- a `PackedTensor` (moe.layers.cpu_gemm): reordered once for oneDNN, on a CPU where that is the faster
  kernel (`prepare`, after load).
`linear` and `grouped_mm` dispatch on it; `Linear` is the module over one. The rest is what the
experts' holder needs to regroup weights (`select`, `stack`, `cat_rows`) and count them (`nbytes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.errors import CheckpointError
from moe.layers import cpu_gemm, fp8
from moe.layers.cpu_gemm import PackedTensor
from moe.layers.fp8 import Fp8Tensor

Weight = torch.Tensor | Fp8Tensor | PackedTensor


def prepare(w: Weight, gemm: str) -> Weight:
    """The weight as the chosen kernel reads it: packed for oneDNN (`gemm` "onednn", a plain
    CPU tensor), else as it is."""
    if gemm == "onednn" and isinstance(w, torch.Tensor) and w.device.type == "cpu":
        return PackedTensor.pack(w)
    return w


def linear(x: torch.Tensor, w: Weight, w8a8: bool = False) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T → [M, N] in x's dtype."""
    if isinstance(w, PackedTensor):
        return cpu_gemm.linear(x, w)
    if isinstance(w, Fp8Tensor):
        return fp8.linear(x, w, w8a8)
    return F.linear(x, w)


def grouped_mm(
    x: torch.Tensor,  # [M, K] rows sorted by group
    w: Weight,  # [G, N, K]
    offs: torch.Tensor,  # [G] int32 end row of each group; rows past offs[-1] are left unwritten
    group: torch.Tensor,  # [M] each row's group (≥ G past the last group)
    w8a8: bool = False,
) -> torch.Tensor:
    """Row r times w[group[r]]^T → [M, N] in x's dtype."""
    if isinstance(w, PackedTensor):
        return cpu_gemm.grouped_mm(x, w, offs)
    if isinstance(w, Fp8Tensor):
        return fp8.grouped_mm(x, w, offs, group, w8a8)
    return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)


class Linear(nn.Module):
    """A linear layer over a held weight [N, K] that is not a plain parameter: FP8, or packed for
    oneDNN. The weight is an attribute, not a parameter: it is loaded where it lives; a bias [N]
    (q/k/v's in Qwen2-MoE) stays a plain parameter, loaded with the model's state."""

    def __init__(self, weight: Weight, w8a8: bool = False, bias: bool = False):
        super().__init__()
        self.held = weight
        self.w8a8 = w8a8
        self.bias = nn.Parameter(torch.empty(weight.shape[0], device="meta")) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.held, self.w8a8)
        return y if self.bias is None else y + self.bias


def nbytes(w: Weight) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes


def select(w: Weight, j: int) -> Weight:
    """One of a stack of weights: [E, N, K] → [N, K]."""
    if isinstance(w, torch.Tensor):
        return w[j]
    if isinstance(w, PackedTensor):
        return PackedTensor([w.mats[j]], w.shape[1:], w.dtype)
    return Fp8Tensor(w.data[j], w.scale[j], None if w.input_scale is None else w.input_scale[j], w.block)


def stack(ws: list[Weight]) -> Weight:
    """[N, K] each → [E, N, K]."""
    if all(isinstance(w, torch.Tensor) for w in ws):
        return torch.stack(ws)  # type: ignore[arg-type]
    if all(isinstance(w, PackedTensor) for w in ws):
        packed = [w for w in ws if isinstance(w, PackedTensor)]
        return PackedTensor(
            [m for w in packed for m in w.mats], torch.Size([len(ws), *ws[0].shape]), packed[0].dtype
        )
    fs = _all_fp8(ws)
    ins = [f.input_scale for f in fs]
    input_scale = None if any(s is None for s in ins) else torch.stack(ins)  # type: ignore[arg-type]
    return Fp8Tensor(
        torch.stack([f.data for f in fs]), torch.stack([f.scale for f in fs]), input_scale, fs[0].block
    )


def cat_rows(ws: list[Weight]) -> Weight:
    """Weights of the same input concatenated along their output rows ([N_i, K] → [ΣN_i, K]): w1
    over w3 into one gate_up GEMM (before any packing). Their static input scales become the
    largest of them (one scale quantizes the shared input, as vLLM does)."""
    if all(isinstance(w, torch.Tensor) for w in ws):
        return torch.cat(ws)  # type: ignore[arg-type]
    fs = _all_fp8(ws)
    block = fs[0].block
    if block is not None and any(f.data.shape[-2] % block[0] for f in fs[:-1]):
        fs = [f.row_blocks() for f in fs]  # blocks of one row: exact, and they always stack
    ins = [f.input_scale for f in fs]
    input_scale = None if any(s is None for s in ins) else torch.stack(ins).amax(0)  # type: ignore[arg-type]
    return Fp8Tensor(
        torch.cat([f.data for f in fs]), torch.cat([f.scale for f in fs]), input_scale, fs[0].block
    )


def _all_fp8(ws: list[Weight]) -> list[Fp8Tensor]:
    if not all(isinstance(w, Fp8Tensor) for w in ws):
        raise CheckpointError("weights stacked into one GEMM mix FP8 and unquantized ones")
    fs = [w for w in ws if isinstance(w, Fp8Tensor)]
    if len({f.block for f in fs}) != 1:
        raise CheckpointError("weights stacked into one GEMM mix scale block sizes")
    return fs
