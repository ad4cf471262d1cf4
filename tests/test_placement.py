"""Placement on a (simulated) GPU cluster: with `ray.init(num_gpus=4)` on this CPU machine, four
expert shards land on four distinct GPU ids, and each holds exactly its own experts."""

from __future__ import annotations

import pytest

from moe.checkpoint import expert_tensor_shapes
from moe.config import MixtralConfig
from moe.tiny import default_model_dir
from tests.cluster_harness import Raymix, free_port, ray_cluster


@pytest.fixture(scope="module")
def raymix():
    with ray_cluster(num_gpus=4):
        yield Raymix(free_port())


def test_four_shards_on_four_gpus_each_with_its_experts(raymix):
    import httpx
    from ray import serve

    # Four GPUs, four shards: the router gets none here (router_gpus=0), so everything fits.
    url = raymix.deploy(expert_shards=4, router_gpus=0, max_model_len=256, kv_cache_memory_mb=32)
    cfg = MixtralConfig.from_pretrained(default_model_dir())
    infos = [
        serve.get_deployment_handle(f"ExpertShard{k}", app_name="raymix").info.remote().result()
        for k in range(4)
    ]
    gpu_ids = [i["gpu_ids"] for i in infos]
    assert all(len(g) == 1 for g in gpu_ids)
    assert len({g[0] for g in gpu_ids}) == 4  # four distinct devices
    assert sorted(i["cuda_visible_devices"] for i in infos) == sorted(g[0] for g in gpu_ids)
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size * cfg.num_hidden_layers
    for k, info in enumerate(infos):
        assert info["expert_ids"] == [2 * k, 2 * k + 1]
        assert info["experts_read"] == [2 * k, 2 * k + 1]  # never read another shard's experts
        assert info["tensors_read"] == len(expert_tensor_shapes(cfg, [2 * k, 2 * k + 1]))
        assert info["num_parameters"] == 2 * per_expert
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "placed", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert (
        sum(
            i["batches_served"]
            for i in (
                serve.get_deployment_handle(f"ExpertShard{k}", app_name="raymix").info.remote().result()
                for k in range(4)
            )
        )
        > 0
    )
