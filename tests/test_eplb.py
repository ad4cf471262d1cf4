"""Hot-expert replication, without Ray: the plan lowers the busiest shard's work and stays
within its slots; a shard's regrouped experts compute what freshly loaded ones do."""

from __future__ import annotations

import pytest
import torch

from moe.checkpoint.reader import CheckpointReader
from moe.config import ModelConfig
from moe.expert_parallel.eplb import balancedness, plan_replicas, shard_loads
from moe.layers.experts import LocalExperts, select_experts

GROUPS = [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_a_hot_expert_gets_replicas_and_the_busiest_shard_less_work():
    load = [400.0, 40, 30, 30, 20, 20, 10, 10]
    plan = plan_replicas(load, GROUPS, num_redundant=4)
    assert [p[0] for p in plan] == [0, 0, 1, 1, 2, 2, 3, 3]  # primaries first, unchanged
    assert len(plan[0]) > 1  # the hot expert is replicated
    assert all(len(set(p)) == len(p) for p in plan)  # never twice on one shard
    used = [sum(s in p[1:] for p in plan) for s in range(4)]
    assert sum(used) <= 4 and max(used) <= 1  # ceil(4 / 4) slots per shard
    before, after = balancedness(load, [[p[0]] for p in plan], 4), balancedness(load, plan, 4)
    assert after > before
    assert max(shard_loads(load, plan, 4)) < max(shard_loads(load, [[p[0]] for p in plan], 4))


def test_no_replica_when_it_would_not_help_or_there_is_no_room():
    even = [10.0] * 8
    assert plan_replicas(even, GROUPS, num_redundant=4) == [[s] for s in (0, 0, 1, 1, 2, 2, 3, 3)]
    assert plan_replicas([100.0, 0, 0, 0, 0, 0, 0, 0], GROUPS, num_redundant=0)[0] == [0]
    assert plan_replicas([0.0] * 8, GROUPS, num_redundant=4) == [[s] for s in (0, 0, 1, 1, 2, 2, 3, 3)]


def test_regrouped_experts_compute_what_fresh_ones_do(tiny_dir):
    cfg = ModelConfig.from_pretrained(tiny_dir)
    reader = CheckpointReader(tiny_dir)
    held = LocalExperts.from_checkpoint(reader, cfg, [0, 1], torch.float32)
    grown = held.regroup(reader, [0, 1, 5])
    fresh = LocalExperts.from_checkpoint(CheckpointReader(tiny_dir), cfg, [0, 1, 5], torch.float32)
    x = torch.randn(12, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    w, ids = select_experts(
        torch.randn(12, cfg.num_local_experts, generator=torch.Generator().manual_seed(1)), 2
    )
    for layer in range(cfg.num_hidden_layers):
        torch.testing.assert_close(grown.forward(layer, x, ids, w), fresh.forward(layer, x, ids, w))
    shrunk = grown.regroup(reader, [5])
    assert shrunk.expert_ids == [5] and shrunk.num_parameters() * 3 == fresh.num_parameters()


@pytest.mark.parametrize(("name", "shards", "redundant"), [("qwen3_moe", 4, 16), ("deepseek_v3_256", 8, 32)])
def test_replicas_over_many_experts_top8_balance_and_change_no_output(family_dirs, name, shards, redundant):
    """Qwen3-MoE's shape (128 experts, 8 a token, over 4 shards with 16 replica slots) and
    DeepSeek-V3's (256 experts, 8 a token in 8 groups, over 8 shards with 32), under a skewed
    load (a few hot experts, as real traffic has): the busiest shard gets less work, and the
    replicated placement computes what one shard holding every expert does, for tokens routed
    as the family routes them."""
    from moe.checkpoint.reader import open_checkpoint
    from moe.expert_parallel.backend import InProcessExperts
    from moe.expert_parallel.placement import partition_experts
    from moe.layers.experts import Routing

    cfg, _, reader = open_checkpoint(family_dirs(name))
    groups = partition_experts(cfg.num_local_experts, shards)
    load = [1000.0 / (1 + e) for e in range(cfg.num_local_experts)]  # the hot ones on shard 0
    plan = plan_replicas(load, groups, num_redundant=redundant)
    primaries = [[s] for s, g in enumerate(groups) for _ in g]
    assert balancedness(load, plan, shards) > balancedness(load, primaries, shards)
    assert sum(len(p) - 1 for p in plan) <= redundant and all(len(set(p)) == len(p) for p in plan)
    held = [[e for e, p in enumerate(plan) if s in p] for s in range(shards)]
    replicated = InProcessExperts(
        [LocalExperts.from_checkpoint(reader, cfg, g, torch.float32) for g in held], cfg.num_local_experts
    )
    whole = InProcessExperts.from_checkpoint(reader, cfg, torch.float32)
    torch.manual_seed(0)
    x = torch.randn(40, cfg.hidden_size)
    bias = torch.randn(cfg.num_local_experts) if cfg.topk_method == "noaux_tc" else None
    weights, ids = Routing.of(cfg).select(torch.randn(40, cfg.num_local_experts), bias)
    for layer in range(cfg.num_moe_layers):
        torch.testing.assert_close(
            replicated.forward(layer, x, ids, weights), whole.forward(layer, x, ids, weights)
        )
