"""Placement on a (simulated) GPU cluster: with `ray.init(num_gpus=4)` on this CPU machine, four
expert shards land on four distinct GPU ids, and each holds exactly its own experts; with the
router asking for one too (five processes), they share the four devices."""

from __future__ import annotations

import pytest

from moe.checkpoint.reader import expert_tensor_shapes
from moe.checkpoint.tiny import default_model_dir
from moe.config import ModelConfig
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
    cfg = ModelConfig.from_pretrained(default_model_dir())
    infos = [
        serve.get_deployment_handle(f"ExpertShard{k}", app_name="raymix").info.remote().result()
        for k in range(4)
    ]
    gpu_ids = [i.gpu_ids for i in infos]
    assert all(len(g) == 1 for g in gpu_ids)
    assert len({g[0] for g in gpu_ids}) == 4  # four distinct devices
    assert sorted(i.cuda_visible_devices for i in infos) == sorted(g[0] for g in gpu_ids)
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size * cfg.num_hidden_layers
    for k, info in enumerate(infos):
        assert info.expert_ids == [2 * k, 2 * k + 1]
        assert info.experts_read == [2 * k, 2 * k + 1]  # never read another shard's experts
        assert info.tensors_read == len(expert_tensor_shapes(cfg, [2 * k, 2 * k + 1]))
        assert info.num_parameters == 2 * per_expert
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "placed", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert (
        sum(
            i.batches_served
            for i in (
                serve.get_deployment_handle(f"ExpertShard{k}", app_name="raymix").info.remote().result()
                for k in range(4)
            )
        )
        > 0
    )


def test_more_processes_than_gpus_share_them_and_serve(raymix):
    """Router and four shards on four GPUs (five processes): each asks for half a GPU, so some
    share a device, and the app serves. Before, the fifth `num_gpus=1` process could not be
    placed. (Which pair then talks gloo rather than NCCL is tests/test_config.py's.)"""
    import httpx
    from ray import serve

    # the app of the test before holds every GPU: its placement is reserved before it goes
    serve.delete("raymix")
    raymix.settings = None
    url = raymix.deploy(expert_shards=4, max_model_len=256, kv_cache_memory_mb=32)
    infos = [
        serve.get_deployment_handle(f"ExpertShard{k}", app_name="raymix").info.remote().result()
        for k in range(4)
    ]
    stats = raymix.router_stats()
    assert len(stats.gpu_ids) == 1  # the router got a GPU too
    devices = stats.gpu_ids + [g for i in infos for g in i.gpu_ids]
    assert len(devices) == 5 and len(set(devices)) < 5  # five processes, some on one device
    assert stats.data_plane_transports == ["gloo"] * 4  # no CUDA in these processes: gloo
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "shared", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
