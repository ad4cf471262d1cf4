"""CPU GEMMs over weights prepacked for oneDNN: the fast kernel where PyTorch's default is slow.

PyTorch's fp32 GEMM on the CPU is MKL's sgemm; on AMD CPUs MKL takes a generic code path, 2.5-2.9x
slower than oneDNN's over a weight reordered once into its blocked layout (an expert's gate_up at
M = 8 rows: 0.74 vs 0.29 ms on one Zen 5 thread; the LM head at M = 32: 14.1 vs 5.4 ms; see
docs/performance.md). PyTorch ships oneDNN's linear as private ops, the ones inductor's CPU
passes use: `torch.ops.mkldnn._reorder_linear_weight` packs a weight, `_linear_pointwise`
multiplies by it. Their public route, `torch.compile` with weight freezing, packs fp32 weights
for MKL instead (`mkl._mkl_linear`: 0.69 ms, no gain), so the private ops are used directly,
behind a check that they exist (`AVAILABLE`) and with PyTorch's own GEMM as the fallback.

Which kernel a process uses is decided once (`choose`), by capability, then by measurement:
oneDNN's packed path must exist for the dtype on this CPU (`unsupported`: fp32 everywhere oneDNN
runs; bf16 only with AVX512-BW/VL/DQ or AVX-NE-CONVERT, so not on an AVX2-only Zen 3 or Haswell,
where the reorder raises), else torch's GEMM is used with one log line saying why; where it can
run, both run the same GEMM and the faster is kept (on an Intel CPU where MKL's fast path runs,
that may be MKL), unless a setting says which. `--cpu-gemm onednn` where it cannot run is an
error (`CpuGemmError`) at start-up.
A `PackedTensor` holds one weight [N, K] or a stack of them [E, N, K] (one per expert), each
matrix an opaque oneDNN tensor (the unpacked copy is not kept: the same bytes as the weight);
moe.layers.weights dispatches a layer's matmul to `linear` or, for the experts, `grouped_mm`, one GEMM
per expert with tokens: reading the group bounds on the host costs nothing on the CPU.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

log = logging.getLogger(__name__)

BATCH_HINT = 8  # rows the layout is tuned for (a decode step's tokens per expert)


def available() -> bool:
    """Whether this torch has oneDNN's packed linear ops (private: a pinned torch's)."""
    mkldnn = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


@dataclass
class PackedTensor:
    """A weight [N, K], or a stack [E, N, K], each matrix reordered once for oneDNN."""

    mats: list[torch.Tensor]  # E opaque oneDNN tensors (one for a single matrix)
    shape: torch.Size
    dtype: torch.dtype

    @classmethod
    def pack(cls, w: torch.Tensor) -> PackedTensor:
        flat = w.reshape(-1, *w.shape[-2:])
        mats = [torch.ops.mkldnn._reorder_linear_weight(m.contiguous(), BATCH_HINT) for m in flat]
        return cls(mats, w.shape, w.dtype)

    def unpack(self) -> torch.Tensor:
        return torch.stack([m.to_dense() for m in self.mats]).reshape(self.shape)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.mats)


def linear(x: torch.Tensor, w: PackedTensor) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T → [M, N]."""
    return torch.ops.mkldnn._linear_pointwise(x, w.mats[0], None, "none", [], "")


def grouped_mm(x: torch.Tensor, w: PackedTensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows sorted by group: rows [offs[g-1], offs[g]) times w[g]^T → [M, N]; rows past
    offs[-1] are left unwritten (as torch's grouped GEMM leaves them). One GEMM per group with
    rows, its bounds read on the host (free on the CPU)."""
    out = x.new_empty(x.shape[0], w.shape[-2])  # [M, N]
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = torch.ops.mkldnn._linear_pointwise(x[start:end], w.mats[g], None, "none", [], "")
        start = end
    return out


class CpuGemmError(ValueError):
    """`cpu_gemm onednn` asked for where oneDNN's packed path cannot run."""


def unsupported(dtype: torch.dtype) -> str | None:
    """Why oneDNN's packed linear cannot run in `dtype` on this CPU, or None when it can."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN's packed linear is used for float32 and bfloat16, not {_name(dtype)}"
    if not available():
        return "this torch has no mkldnn._linear_pointwise"
    return _trial(dtype)


@cache
def _trial(dtype: torch.dtype) -> str | None:
    """Pack and multiply a small weight once: the error torch raises where this CPU lacks the
    path (bf16 without AVX512-BW/VL/DQ or AVX-NE-CONVERT), as one line, else None."""
    bf16_query = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # honours ONEDNN_MAX_CPU_ISA
    if dtype == torch.bfloat16 and bf16_query is not None and not bf16_query():
        return "oneDNN's packed bfloat16 path needs AVX512-BW/VL/DQ or AVX-NE-CONVERT, which this CPU lacks"
    try:
        w = PackedTensor.pack(torch.ones(16, 16, dtype=dtype))
        linear(torch.ones(2, 16, dtype=dtype), w)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def kernel_for(setting: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The GEMM a process's weights are prepared for (moe.layers.weights.prepare): "onednn" or
    "torch"; GPUs always "torch" (their grouped GEMM and cuBLAS)."""
    return choose(setting, dtype) if torch.device(device).type == "cpu" else "torch"


@cache
def choose(setting: str, dtype: torch.dtype) -> str:
    """ "onednn" or "torch": torch's where oneDNN's packed path cannot run in `dtype` on this
    CPU (logged once with the reason; with the setting "onednn" a CpuGemmError), else the
    setting's, or with "auto" the faster of the two, timed once per process on an expert-sized
    GEMM (8 x 1024 @ 1024 x 4096) and an LM-head-sized one (32 x 1024 @ 1024 x 16384). The
    choice and its numbers are logged."""
    if setting == "torch":
        return "torch"
    why = unsupported(dtype)
    if why is not None:
        if setting == "onednn":
            raise CpuGemmError(f"--cpu-gemm onednn cannot run in {_name(dtype)} on this CPU: {why}")
        log.warning("CPU GEMM (%s): torch's, as %s", _name(dtype), why)
        return "torch"
    if setting == "onednn":
        return "onednn"
    g = torch.Generator().manual_seed(0)
    times = {"torch": 0.0, "onednn": 0.0}
    for m, k, n in ((8, 1024, 4096), (32, 1024, 16384)):
        w = torch.randn(n, k, generator=g).to(dtype)
        x = torch.randn(m, k, generator=g).to(dtype)
        times["torch"] += _seconds(torch.nn.functional.linear, x, w)
        times["onednn"] += _seconds(linear, x, PackedTensor.pack(w))
    best = min(times, key=times.__getitem__)
    log.info(
        "CPU GEMM (%s): onednn %.2f ms, torch %.2f ms on the probe GEMMs: using %s",
        _name(dtype),
        1e3 * times["onednn"],
        1e3 * times["torch"],
        best,
    )
    return best


def _seconds(f: Callable[..., torch.Tensor], *args: object, runs: int = 5) -> float:
    """Median seconds of f(*args) after one warm-up call."""
    f(*args)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
