"""The experts: routing and SwiGLU experts held in one place.

Routing (`Routing`, from the config) is softmax over all experts (float32), top-k, and, where the
family does it (Mixtral, Qwen3-MoE: `norm_topk_prob`), the k weights renormalised to sum to 1;
DeepSeek-V2's picks within the best groups of experts (`group_limited_greedy`), and DeepSeek-V3's
scores each expert by a sigmoid, adds a correction bias for the choice only, and picks within
the groups whose two best experts score highest (`noaux_tc`); both scale the weights by
`routed_scaling_factor`.
A set of experts held in one place (one shard) is `LocalExperts`: per MoE layer, the stacked weights
of the experts it holds and an `expert_map` (global expert id → local index, -1 where the expert
lives elsewhere, as vLLM's expert parallelism does it). Which shard holds which expert, and how
a batch is split between shards and added back, is moe.expert_parallel.placement's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe.checkpoint.quantization import QuantizationConfig
from moe.checkpoint.reader import CheckpointReader, expert_prefix, expert_shapes
from moe.config import ModelConfig
from moe.layers.fp8 import w8a8_supported
from moe.layers.weights import Weight, cat_rows, grouped_mm, nbytes, prepare, select, stack


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] → (weights [T, K] float32, expert ids [T, K] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@dataclass(frozen=True)
class Routing:
    """How a layer's gate logits choose each token's experts and weigh them."""

    top_k: int
    renormalize: bool = True
    scoring: str = "softmax"  # or "sigmoid"
    method: str = "greedy"  # or "group_limited_greedy", "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0  # routed_scaling_factor

    @classmethod
    def of(cls, cfg: ModelConfig) -> Routing:
        return cls(
            cfg.num_experts_per_tok,
            cfg.norm_topk_prob,
            cfg.scoring_func,
            cfg.topk_method,
            cfg.n_group,
            cfg.topk_group,
            cfg.routed_scaling_factor,
        )

    def select(
        self, router_logits: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits [T, E] (bias [E]: noaux_tc's correction) → (weights [T, K] float32,
        expert ids [T, K] int64)."""
        if self.method == "greedy" and self.scoring == "softmax":
            weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        else:
            logits = router_logits.float()
            scores = torch.sigmoid(logits) if self.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
            if self.method == "greedy":
                weights, ids = torch.topk(scores, self.top_k, dim=-1)
            else:
                weights, ids = self._grouped(scores, bias)
            if self.renormalize:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scale if self.scale != 1.0 else weights), ids

    def _grouped(self, scores: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k within the topk_group best of n_group groups: a group scored by its best expert
        (group_limited_greedy) or by its two best after the bias (noaux_tc: the bias chooses,
        the unbiased scores weigh)."""
        t, e = scores.shape
        choice = scores if bias is None else scores + bias.float()  # [T, E]
        grouped = choice.view(t, self.n_group, e // self.n_group)  # [T, G, E/G]
        if self.method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.amax(dim=-1)  # [T, G]
        best = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
        keep = keep[:, :, None].expand_as(grouped).reshape(t, e)  # [T, E]
        if self.method == "noaux_tc":
            ids = choice.masked_fill(~keep, float("-inf")).topk(self.top_k, dim=-1).indices  # [T, K]
            return scores.gather(1, ids), ids
        return scores.masked_fill(~keep, 0.0).topk(self.top_k, dim=-1)


def grouped_gemm_misaligned(cfg: ModelConfig, dtype: torch.dtype, fp8: bool = False) -> str | None:
    """Why torch's CUDA grouped GEMM would refuse these experts' shapes, or None: it wants every
    row's stride a multiple of 16 bytes (hidden and intermediate sizes in the compute dtype), and
    the FP8 one (fp8: W8A8 experts, one byte an element) sizes that are multiples of 16 elements."""
    elem = 1 if fp8 else torch.tensor([], dtype=dtype).element_size()
    kind = "FP8" if fp8 else str(dtype).removeprefix("torch.")
    for name, size in (("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.expert_intermediate_size)):
        if size * elem % 16:
            return (
                f"{name} {size} x {elem} bytes ({kind}) is not a multiple of 16 bytes "
                "(the CUDA grouped GEMM's row stride)"
            )
    return None


class LocalExperts:
    """The experts with the given global ids, for every MoE layer, held in this process.

    Per MoE layer (its index in cfg.moe_layers): gate_up [n, 2I, H] (gate stacked over up, one
    GEMM for both) and down [n, H, I], held as moe.layers.weights holds a weight: plain, FP8 with
    their scales, or packed for oneDNN on a CPU where that is faster (`gemm`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        expert_ids: list[int],
        gate_up: list[Weight],
        down: list[Weight],
        w8a8: bool = False,
        dtype: torch.dtype | None = None,
        gemm: str = "torch",
    ):
        """dtype: what they compute in (needed with FP8 or packed weights; default: the
        weights' dtype); gemm: the kernel the weights were prepared for (moe.layers.cpu_gemm)."""
        self.cfg = cfg
        self.expert_ids = list(expert_ids)
        self.gate_up = gate_up
        self.down = down
        self.w8a8 = w8a8  # FP8 weights computed as FP8 GEMMs (moe.layers.fp8.w8a8_supported)
        self.gemm = gemm
        w0 = gate_up[0]
        self.dtype: torch.dtype = dtype or (w0.dtype if isinstance(w0, torch.Tensor) else torch.float32)
        if w0.device.type == "cuda" and (why := grouped_gemm_misaligned(cfg, self.dtype, fp8=w8a8)):
            raise ValueError(f"the experts cannot run on this GPU: {why}")
        expert_map = torch.full((cfg.num_local_experts,), -1, dtype=torch.long)
        expert_map[self.expert_ids] = torch.arange(len(self.expert_ids))
        self.expert_map = expert_map.to(gate_up[0].device)

    @classmethod
    def from_checkpoint(
        cls,
        reader: CheckpointReader,
        cfg: ModelConfig,
        expert_ids: list[int],
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        quant: QuantizationConfig | None = None,
        gemm: str = "torch",
    ) -> LocalExperts:
        """Read these experts of every layer (FP8 where stored so, or quantized at load when
        quant.method is "online"), and nothing else; prepared for the `gemm` kernel."""
        if not expert_ids:  # a shard waiting for experts (elastic resizing)
            return cls.empty(cfg, dtype, device)
        style = reader.expert_style(cfg)
        t = reader.load_linears(expert_shapes(cfg, expert_ids, style), dtype, device, quant, quantize=True)
        gate_up: list[Weight] = []
        down: list[Weight] = []
        for layer in cfg.moe_layers:
            names = {
                w: [expert_prefix(cfg, layer, e, w, style) for e in expert_ids]
                for w in ("gate", "up", "down")
            }
            pairs = zip(names["gate"], names["up"], strict=True)
            gate_up.append(prepare(stack([cat_rows([t[a], t[b]]) for a, b in pairs]), gemm))
            down.append(prepare(stack([t[w] for w in names["down"]]), gemm))
            for name in names["gate"] + names["up"] + names["down"]:  # free the per-expert copies as we go
                del t[name]
        w8a8 = w8a8_supported(torch.device(device), dtype, grouped=True)
        return cls(cfg, expert_ids, gate_up, down, w8a8, dtype, gemm)

    @classmethod
    def empty(cls, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> LocalExperts:
        h, i, layers = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_moe_layers
        gate_up: list[Weight] = [torch.empty(0, 2 * i, h, dtype=dtype, device=device) for _ in range(layers)]
        down: list[Weight] = [torch.empty(0, h, i, dtype=dtype, device=device) for _ in range(layers)]
        return cls(cfg, [], gate_up, down)

    def regroup(
        self, reader: CheckpointReader, expert_ids: list[int], quant: QuantizationConfig | None = None
    ) -> LocalExperts:
        """The same kind of holder for another set of experts: those already held are reused,
        the others read from the checkpoint (hot-expert replication adds and drops replicas)."""
        dtype = self.dtype
        if not expert_ids:
            return LocalExperts.empty(self.cfg, dtype, self.device)
        missing = [e for e in expert_ids if e not in self.expert_ids]
        fresh = (
            LocalExperts.from_checkpoint(reader, self.cfg, missing, dtype, self.device, quant, self.gemm)
            if missing
            else None
        )

        def pick(layer: int, e: int, which: str) -> Weight:
            if e in self.expert_ids:
                src, j = self, self.expert_ids.index(e)
            else:
                assert fresh is not None
                src, j = fresh, fresh.expert_ids.index(e)
            return select((src.gate_up if which == "gate_up" else src.down)[layer], j)

        layers = range(self.cfg.num_moe_layers)
        gate_up = [stack([pick(layer, e, "gate_up") for e in expert_ids]) for layer in layers]
        down = [stack([pick(layer, e, "down") for e in expert_ids]) for layer in layers]
        w8a8 = w8a8_supported(self.device, dtype, grouped=True)
        return LocalExperts(self.cfg, expert_ids, gate_up, down, w8a8, dtype, self.gemm)

    def num_parameters(self) -> int:
        return sum(w.shape.numel() for w in self.gate_up) + sum(w.shape.numel() for w in self.down)

    def nbytes(self) -> int:
        """Bytes of the weights held (FP8 with their scales: about half of bf16's)."""
        return sum(nbytes(w) for w in self.gate_up) + sum(nbytes(w) for w in self.down)

    @property
    def device(self) -> torch.device:
        return self.gate_up[0].device

    def forward(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The layer's MoE output when this holds every expert routed to: `partial` in x's dtype."""
        return self.partial(layer, x, expert_ids, weights).to(x.dtype)

    def partial(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x [n, H], expert_ids [n, K] (global; -1: computed elsewhere), weights [n, K] → sum over
        the held experts of weight × SwiGLU(x) [n, H] float32; experts held elsewhere contribute
        nothing (their part comes from another shard, added in float32: `combine`).

        The (token, expert) assignments are sorted by expert and each projection is one grouped
        GEMM over them, with the group offsets counted and summed on the device: no host sync and
        a fixed number of launches whatever the routing (the per-expert loop it replaces is the
        reference in tests/test_experts.py). The weighted sum accumulates in float32.
        """
        n, k = expert_ids.shape
        e = len(self.expert_ids)
        inter = self.cfg.expert_intermediate_size
        if e == 0 or n == 0:
            return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        local = self.expert_map[expert_ids.clamp(min=0)]  # [n, K] local index, -1: not held
        local = torch.where((expert_ids < 0) | (local < 0), e, local).flatten()  # [nK]; e: not here
        order = torch.argsort(local, stable=True)  # [nK] assignments grouped by expert, others last
        counts = torch.zeros(e + 1, dtype=torch.int32, device=x.device)
        counts.index_add_(0, local, torch.ones_like(local, dtype=torch.int32))  # [e+1], no sync
        offs = counts[:e].cumsum(0, dtype=torch.int32)  # [e] end row of each expert's group
        rows = order // k  # [nK] token of each sorted assignment
        group = local[order]  # [nK] local expert of each sorted assignment (e: not here)
        gu = grouped_mm(x[rows], self.gate_up[layer], offs, group, self.w8a8)  # [nK, 2I]
        h = F.silu(gu[:, :inter]) * gu[:, inter:]  # [nK, I]
        y = grouped_mm(h, self.down[layer], offs, group, self.w8a8)  # [nK, H]
        # rows past offs[-1] (assignments not held here) are unwritten: they go to a spare row
        dest = torch.where(group < e, rows, n)  # [nK]
        out = torch.zeros(n + 1, x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, dest, y.float() * weights.flatten()[order, None])
        return out[:n]  # [n, H] float32
