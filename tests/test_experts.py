"""Routing, dispatch and combine against a plain per-token, per-expert reference loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe.config import ModelConfig
from moe.expert_parallel.backend import InProcessExperts
from moe.expert_parallel.placement import Placement, assign, dispatch, dispatch_whole, partition_experts
from moe.layers.experts import LocalExperts, select_experts


def reference_moe(x, router_logits, w1, w3, w2, top_k):
    """Mixtral's MoE the obvious way: for every token, for each of its top-k experts."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(router_logits[t].float(), -1)
        weights, ids = torch.topk(probs, top_k)
        weights = weights / weights.sum()
        for w, e in zip(weights, ids, strict=True):
            out[t] += w * (F.silu(x[t] @ w1[e].T) * (x[t] @ w3[e].T)) @ w2[e].T
    return out


@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_sharded_moe_matches_reference(tokens, num_experts, top_k, num_shards):
    g = torch.Generator().manual_seed(tokens * 100 + num_experts)
    h, i = 32, 48
    cfg = ModelConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=1, num_local_experts=num_experts)
    w1, w3 = torch.randn(num_experts, i, h, generator=g), torch.randn(num_experts, i, h, generator=g)
    w2 = torch.randn(num_experts, h, i, generator=g)
    x, logits = torch.randn(tokens, h, generator=g), torch.randn(tokens, num_experts, generator=g)
    shards = [
        LocalExperts(cfg, ids, [torch.cat([w1[ids], w3[ids]], dim=1)], [w2[ids]])
        for ids in partition_experts(num_experts, num_shards)
    ]
    weights, ids = select_experts(logits, top_k)
    got = InProcessExperts(shards, num_experts).forward(0, x, ids, weights)
    torch.testing.assert_close(got, reference_moe(x, logits, w1, w3, w2, top_k), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_shards", [2, 4, 8])
def test_a_bf16_output_does_not_depend_on_how_the_experts_are_split(num_shards):
    """Each shard's part stays float32 until the parts are added: rounding to bf16 once, after
    the sum, gives the same bits as one shard holding both of a token's experts (rounding each
    part first did not: it failed here before the parts were float32)."""
    g = torch.Generator().manual_seed(num_shards)
    e, h, i = 8, 64, 96
    cfg = ModelConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=1, num_local_experts=e)
    w1, w3, w2 = (torch.randn(e, *shape, generator=g).bfloat16() / 8 for shape in ((i, h), (i, h), (h, i)))
    x, logits = torch.randn(64, h, generator=g).bfloat16(), torch.randn(64, e, generator=g)
    weights, ids = select_experts(logits, 2)

    def split(n: int) -> InProcessExperts:
        groups = partition_experts(e, n)
        return InProcessExperts(
            [LocalExperts(cfg, g, [torch.cat([w1[g], w3[g]], dim=1)], [w2[g]]) for g in groups], e
        )

    one, many = split(1).forward(0, x, ids, weights), split(num_shards).forward(0, x, ids, weights)
    assert one.dtype == many.dtype == torch.bfloat16
    assert torch.equal(one, many)


def test_dispatch_sends_each_token_once_per_shard():
    ids = torch.tensor([[0, 1], [0, 5], [6, 7], [2, 4]])
    w = torch.full((4, 2), 0.5)
    placement = Placement.from_groups([[0, 1], [2, 3], [4, 5], [6, 7]])
    batches = dispatch(ids, w, placement)
    assert [b.token_index.tolist() for b in batches] == [[0, 1], [3], [1, 3], [2]]
    assert batches[2].expert_ids.tolist() == [[-1, 5], [-1, 4]]  # only what this shard computes


def test_replicas_split_a_hot_experts_tokens_and_compute_each_assignment_once():
    ids = torch.tensor([[0, 1]] * 6 + [[2, 3]])  # expert 0 is hot
    w = torch.full((7, 2), 0.5)
    placement = Placement.from_groups([[0, 1], [2, 3], [0]])  # expert 0 also on shard 2
    batches = dispatch(ids, w, placement)
    zeros = [int((b.expert_ids == 0).sum()) for b in batches]
    assert zeros == [3, 0, 3]  # split evenly between its two holders
    ones = [int((b.expert_ids == 1).sum()) for b in batches]
    assert ones == [6, 0, 0]
    assigned = sum(int((b.expert_ids >= 0).sum()) for b in batches)
    assert assigned == ids.numel()  # every (token, expert) exactly once


def test_whole_batch_dispatch_computes_what_dispatch_computes():
    """A GPU router's dispatch (every shard gets all T tokens) asks each shard for exactly the
    (token, expert) assignments the sparse one does, replicas included."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (40, 2), generator=g)
    w = torch.rand(40, 2, generator=g)
    placement = Placement.from_groups([[0, 1, 2], [3, 4, 5], [6, 7, 0]])  # expert 0 replicated
    shard_of = assign(ids, placement)
    whole, sparse = dispatch_whole(ids, w, placement, shard_of), dispatch(ids, w, placement, shard_of)

    def assignments(b):
        return {
            (int(t), int(e))
            for t, row in zip(b.token_index, b.expert_ids, strict=True)
            for e in row
            if e >= 0
        }

    for wb, sb in zip(whole, sparse, strict=True):
        assert wb.token_index.tolist() == list(range(40)) and torch.equal(wb.weights, w)
        assert assignments(wb) == assignments(sb)
    assert sum(len(assignments(b)) for b in whole) == len({(t, int(e)) for t in range(40) for e in ids[t]})


@pytest.mark.parametrize(
    "groups", [[[0, 1, 2, 3], [4, 5, 6, 7], [0, 5]], [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]]]
)
def test_replicated_experts_give_the_same_output(groups):
    """Hot-expert replication only moves work: the MoE output equals the plain reference."""
    torch.manual_seed(0)
    num_experts, hidden, inter, top_k = 8, 32, 48, 2
    cfg = ModelConfig(
        hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts, num_hidden_layers=1
    )
    w1, w3, w2 = (
        torch.randn(num_experts, inter, hidden),
        torch.randn(num_experts, inter, hidden),
        torch.randn(num_experts, hidden, inter),
    )

    def holder(ids):
        return LocalExperts(
            cfg,
            ids,
            [torch.stack([torch.cat([w1[e], w3[e]]) for e in ids])],
            [torch.stack([w2[e] for e in ids])],
        )

    x, logits = torch.randn(40, hidden), torch.randn(40, num_experts)
    weights, ids = select_experts(logits, top_k)
    got = InProcessExperts([holder(g) for g in groups], num_experts).forward(0, x, ids, weights)
    torch.testing.assert_close(got, reference_moe(x, logits, w1, w3, w2, top_k), rtol=1e-4, atol=1e-4)


def test_partition_experts():
    assert partition_experts(8, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert partition_experts(8, 8) == [[e] for e in range(8)]
    with pytest.raises(ValueError):
        partition_experts(8, 9)


def loop_experts(experts: LocalExperts, layer, x, expert_ids, weights):
    """The per-expert loop grouped GEMMs replaced: for each held expert, its tokens (a host sync
    each), one matmul per projection, the weighted output added back."""
    out = torch.zeros_like(x)
    local = experts.expert_map[expert_ids.clamp(min=0)].masked_fill(expert_ids < 0, -1)
    inter = experts.cfg.intermediate_size
    for j in range(len(experts.expert_ids)):
        rows, slot = (local == j).nonzero(as_tuple=True)
        gu = x[rows] @ experts.gate_up[layer][j].t()
        y = (F.silu(gu[:, :inter]) * gu[:, inter:]) @ experts.down[layer][j].t()
        out.index_add_(0, rows, (y * weights[rows, slot, None]).to(x.dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_grouped_gemm_experts_match_the_per_expert_loop(device, dtype, tokens):
    """Held experts 1, 4, 6 of 8 (one held but never routed here), ids held elsewhere and -1
    (computed by another shard) mixed in: the grouped path adds exactly what the loop adds."""
    g = torch.Generator().manual_seed(tokens)
    cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_local_experts=8)
    held = [1, 4, 6]
    gate_up = torch.randn(3, 192, 64, generator=g).to(device, dtype)
    down = torch.randn(3, 64, 96, generator=g).to(device, dtype)
    experts = LocalExperts(cfg, held, [gate_up], [down])
    x = torch.randn(tokens, 64, generator=g).to(device, dtype)
    ids = torch.randint(0, 6, (tokens, 2), generator=g)  # never 6: a held expert with no tokens
    ids[::3, 1] = -1
    ids, weights = ids.to(device), torch.rand(tokens, 2, generator=g).to(device)
    got = experts.forward(0, x, ids, weights)
    want = loop_experts(experts, 0, x, ids, weights)
    assert got.dtype == dtype and got.device == x.device
    if dtype == torch.float32:
        torch.testing.assert_close(got, want)
    else:  # the grouped path sums in float32, the loop in bf16: they differ by bf16 rounding
        torch.testing.assert_close(
            got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.float().abs().max().item()
        )
    empty = LocalExperts.empty(cfg, dtype, device)
    assert torch.equal(empty.forward(0, x, ids, weights), torch.zeros_like(x))
