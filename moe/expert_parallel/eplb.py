"""Hot-expert replication (expert-parallel load balancing, EPLB).

From the measured assignments per expert, copy the hottest experts onto spare room of other
shards so that no shard computes far more than the mean; `dispatch` then deals a replicated
expert's tokens out evenly over its holders. As vLLM's EPLB does with redundant experts, but
for raymix's layout: a shard holds an expert in every MoE layer, so a replica is a whole expert
(all layers) and the load that decides is summed over layers. It plans over any expert count
(Mixtral's 8, Qwen3-MoE's 128: tests/test_eplb.py).

Greedy, and only while it pays: take the busiest shard, the expert on it with the most work
per holder, and give that expert one more holder (the least busy shard with a free slot that
does not hold it yet); stop when the busiest shard would not get less busy, or the slots run
out. Outputs never change: every (token, expert) assignment is still computed exactly once.
"""

from __future__ import annotations


def shard_loads(load: list[float], expert_shards: list[list[int]], num_shards: int) -> list[float]:
    """Work per shard when each expert's load is split evenly over the shards holding it."""
    out = [0.0] * num_shards
    for e, holders in enumerate(expert_shards):
        for s in holders:
            out[s] += load[e] / len(holders)
    return out


def balancedness(load: list[float], expert_shards: list[list[int]], num_shards: int) -> float:
    """Mean / max work per shard: 1.0 is perfectly even (the metric raymix:shard_balancedness)."""
    per = shard_loads(load, expert_shards, num_shards)
    return sum(per) / len(per) / max(per) if max(per) > 0 else 1.0


def plan_replicas(load: list[float], groups: list[list[int]], num_redundant: int) -> list[list[int]]:
    """load[e]: recent assignments of expert e; groups[s]: the experts shard s holds as primary;
    num_redundant: replica slots in all, at most ceil(num_redundant / shards) per shard.
    → per expert, the shards holding it (its primary first)."""
    num_shards = len(groups)
    primary = {e: s for s, g in enumerate(groups) for e in g}
    holders = [[primary[e]] for e in range(len(load))]
    slots = [-(-num_redundant // num_shards)] * num_shards
    left = num_redundant
    per = shard_loads(load, holders, num_shards)
    while left > 0:
        busiest = max(range(num_shards), key=per.__getitem__)
        mine = [e for e in range(len(load)) if busiest in holders[e] and load[e] > 0]
        best = None
        for e in sorted(mine, key=lambda e: load[e] / len(holders[e]), reverse=True):
            free = [s for s in range(num_shards) if slots[s] > 0 and s not in holders[e]]
            if free:
                best = (e, min(free, key=per.__getitem__))
                break
        if best is None:
            break
        e, target = best
        trial = shard_loads(load, [[*h, target] if i == e else h for i, h in enumerate(holders)], num_shards)
        if max(trial) >= max(per) - 1e-9:  # the busiest shard would not get less busy
            break
        holders[e].append(target)
        slots[target] -= 1
        left -= 1
        per = trial
    return holders
