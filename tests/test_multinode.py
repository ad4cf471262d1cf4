"""Over several nodes: on a simulated 3-node Ray cluster (ray.cluster_utils.Cluster, every node
on 127.0.0.1), the expert shards spread over the nodes (one placement-group bundle each), the
router and ingress share a node, the data plane crosses nodes (a TCP store), and greedy
answers over HTTP are the in-process engine's, token for token."""

from __future__ import annotations

import openai
import pytest

from moe.checkpoint.tiny import default_model_dir
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.sampling import SamplingParams
from tests.cluster_harness import free_port, greedy_answers

QUESTIONS = ["Hi", "What is a mixture of experts?", "Count from one to ten.", "x"]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"node_ip_address": "127.0.0.1", "num_cpus": 2, "include_dashboard": False},
    )
    for _ in range(2):
        c.add_node(node_ip_address="127.0.0.1", num_cpus=2)
    # ray.init(address=...) would turn 127.0.0.1 into the machine's address; keep it on loopback
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # "localhost stays localhost", as on a laptop
    ray.init(address=c.address, _node_ip_address="127.0.0.1")
    try:
        yield c
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            c.shutdown()


def test_shards_spread_over_nodes_and_serve_correctly(cluster):
    import ray
    from ray import serve

    from cluster.config import RaymixSettings
    from deployments.app import build_app
    from launch import bringup

    port = free_port()
    s = RaymixSettings(
        port=port,
        expert_shards=3,
        placement_strategy="STRICT_SPREAD",
        max_model_len=256,
        kv_cache_memory_mb=32,
        torch_threads=1,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    serve.run(build_app(s), name=bringup.APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    bringup.wait_healthy(url, timeout=300)

    infos = [
        serve.get_deployment_handle(f"ExpertShard{k}", app_name="raymix").info.remote().result()
        for k in range(3)
    ]
    nodes = {i.node_id for i in infos}
    assert len(nodes) == 3 == len({n["NodeID"] for n in ray.nodes() if n["Alive"]})  # one shard per node
    assert sorted(e for i in infos for e in i.expert_ids) == list(range(8))

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)

    answers = greedy_answers(client, QUESTIONS, 12)
    eng = LLMEngine.from_pretrained(default_model_dir(), EngineConfig(max_model_len=256))
    prompts = [eng.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    want = [seq.text for seq in eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]
    assert answers == want
