"""Settings (CLI, environment, YAML from one object), placement and the capacity model."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from cluster.capacity import MIXTRAL_8X7B, MIXTRAL_8X22B, capacity_plan, gpus_needed
from cluster.config import RaymixSettings
from cluster.placement import deployment_plan as placement
from launch.cli import add_settings_flags, settings_from
from moe.config import ModelConfig


def parse(argv: list[str]) -> RaymixSettings:
    p = argparse.ArgumentParser()
    add_settings_flags(p)
    return settings_from(p.parse_args(argv))


def test_cli_over_env_over_yaml(tmp_path, monkeypatch):
    cfg = tmp_path / "raymix.yaml"
    cfg.write_text("expert_shards: 3\nport: 9100\nmax-num-seqs: 7\napi_key: [a, b]\n")
    monkeypatch.setenv("RAYMIX_PORT", "9200")
    s = parse(["--config", str(cfg), "--max-num-seqs", "9", "--api-key", "c", "--no-overlap"])
    assert (s.expert_shards, s.port, s.max_num_seqs, s.api_key, s.overlap) == (3, 9200, 9, ["c"], False)
    monkeypatch.setenv("RAYMIX_API_KEY", "k1,k2")
    assert parse([]).api_key == ["k1", "k2"]


def test_every_setting_is_a_flag_with_help():
    p = argparse.ArgumentParser()
    add_settings_flags(p)
    flags = {a.dest: a for a in p._actions}
    for name, field in RaymixSettings.model_fields.items():
        assert name in flags and field.description and field.description in flags[name].help


@pytest.mark.parametrize(
    "bad",
    [{"port": 0}, {"expert_shards": -1}, {"dtype": "int4"}, {"attention_backend": "flash"}, {"nonsense": 1}],
)
def test_out_of_range_settings_are_refused(bad):
    with pytest.raises(ValidationError):
        RaymixSettings(**bad)


def test_attention_backend_reaches_the_router_engine():
    assert RaymixSettings().engine_config().attention_backend == "auto"
    assert RaymixSettings(attention_backend="sdpa").engine_config().attention_backend == "sdpa"


def test_placement_asks_for_gpus_only_when_there_are_some():
    cfg = ModelConfig(num_local_experts=8)
    cpu = placement(RaymixSettings(expert_shards=3), cfg, gpus=0)
    assert cpu.expert_groups == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert "num_gpus" not in cpu.shard_options and cpu.router_options["num_gpus"] == 0
    gpu = placement(RaymixSettings(expert_shards=4), cfg, gpus=8)
    assert gpu.shard_options["num_gpus"] == 1 and gpu.router_options["num_gpus"] == 1
    with pytest.raises(ValueError, match="only 8 experts"):
        placement(RaymixSettings(expert_shards=9), cfg, gpus=0)


def test_capacity_model_knows_mixtrals_sizes():
    # public figures: Mixtral 8x7B has 46.7B parameters, 8x22B 141B
    for cfg, total in ((MIXTRAL_8X7B, 46.7e9), (MIXTRAL_8X22B, 141e9)):
        p = capacity_plan(cfg, 8)
        assert sum(p.shard_params) + p.dense_params == pytest.approx(total, rel=0.01)
    assert capacity_plan(MIXTRAL_8X7B, 8).kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert gpus_needed(MIXTRAL_8X22B, 80e9) == 9  # 8 shards of 33.8 GB + the router


def test_generation_defaults_come_from_the_checkpoint_then_the_overrides(tmp_path):
    import json

    from api.protocol import ChatCompletionRequest
    from moe.engine.generation import generation_defaults

    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.3, "top_p": 0.8, "max_new_tokens": 50, "bos_token_id": 1})
    )
    d = generation_defaults(tmp_path, "auto", {"top_p": 0.5})
    assert d == {"temperature": 0.3, "top_p": 0.5, "max_new_tokens": 50}
    assert generation_defaults(tmp_path, "none", {}) == {}
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], temperature=0.9)
    p = req.sampling_params(16, None, 0, d)
    assert (p.temperature, p.top_p, p.repetition_penalty) == (0.9, 0.5, 1.0)  # the request's own wins
    with pytest.raises(ValueError, match="unknown keys"):
        RaymixSettings(override_generation_config='{"temprature": 1}')
    assert RaymixSettings(override_generation_config='{"temperature": 0}').override_generation_config == {
        "temperature": 0
    }


def first_fit(shares: list[float], gpus: int) -> bool:
    """Whether Ray can place processes asking these GPU fractions on `gpus` devices (a fraction
    below 1 must fit on one device)."""
    free = [1.0] * gpus
    for share in shares:
        for d, room in enumerate(free):
            if share <= room + 1e-9:
                free[d] -= share
                break
        else:
            return False
    return True


@pytest.mark.parametrize(
    "gpus,shards", [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (3, 8), (4, 4), (8, 8), (16, 4)]
)
def test_router_and_shards_share_gpus_when_there_are_too_few(gpus, shards):
    """A one-GPU workstation (or any cluster with fewer GPUs than processes) still places the
    router and every shard: each asks for an even fraction; with enough GPUs, one each."""
    p = placement(RaymixSettings(expert_shards=shards), ModelConfig(num_local_experts=8), gpus=gpus)
    asks = [p.router_options["num_gpus"]] + [p.shard_gpus] * shards
    assert first_fit(asks, gpus)
    assert all(a > 0 for a in asks)
    if gpus >= shards + 1:
        assert asks == [1] * (shards + 1)
    else:
        assert all(a < 1 for a in asks)
    # an explicit router_gpus is kept, and the shards share the rest
    cpu_router = placement(RaymixSettings(expert_shards=shards, router_gpus=0), ModelConfig(), gpus=gpus)
    assert cpu_router.router_options["num_gpus"] == 0
    assert first_fit([cpu_router.shard_gpus] * shards, gpus)


def test_a_shard_on_the_routers_gpu_talks_gloo_others_nccl():
    from deployments.shard_pool import link_transport

    router = ("node-a", ("0",))
    assert link_transport("nccl", router, ("node-a", ("0",))) == "gloo"  # same device
    assert link_transport("nccl", router, ("node-a", ("1",))) == "nccl"  # another device
    assert link_transport("nccl", router, ("node-b", ("0",))) == "nccl"  # device 0 of another node
    assert link_transport("gloo", router, ("node-b", ("1",))) == "gloo"
    assert link_transport("nccl", ("node-a", ()), ("node-a", ())) == "nccl"  # no GPUs known: as asked


def test_no_expert_shards_puts_the_experts_in_the_router_with_every_core():
    """--expert-shards 0: no shard deployments; the router alone gets the node's cores (threads)
    and, with a GPU, the whole GPU."""
    import os

    cfg = ModelConfig(num_local_experts=8)
    p = placement(RaymixSettings(expert_shards=0), cfg, gpus=0)
    assert p.expert_groups == [] and p.router_threads == (os.cpu_count() or 1)
    assert placement(RaymixSettings(expert_shards=0), cfg, gpus=1).router_options["num_gpus"] == 1.0


@pytest.mark.parametrize(
    "shards,overlap,threads,want",
    [
        (1, None, None, (16, 16)),  # router and shard take turns: each computes on every core
        (4, None, None, (16, 4)),  # the 4 shards compute a layer together
        (3, None, None, (16, 5)),
        (16, None, None, (16, 1)),  # more shards than cores: one thread each
        (1, True, None, (8, 8)),  # with overlap they compute at once: the cores are shared
        (3, True, None, (4, 4)),
        (4, None, 3, (3, 3)),  # --torch-threads: as given
    ],
)
def test_torch_threads_are_the_cores_each_process_has_while_it_computes(shards, overlap, threads, want):
    from cluster.placement import cpu_threads

    s = RaymixSettings(expert_shards=shards, overlap=overlap, torch_threads=threads)
    assert cpu_threads(s, shards, cores=16) == want


def test_plan_splits_gpus_into_routers_and_shards(capsys):
    """The M:N step model: more routers pay while the shards have time to spare, then the shards
    (computing every router's batches in turn) become the bottleneck; `raymix plan --gpus`
    prints every split and marks the best."""
    from cluster.capacity import MIXTRAL_8X7B, best_split, disaggregated_split
    from launch.cli import main

    splits = {(s.routers, s.shards): s for s in best_split(MIXTRAL_8X7B, 8)}
    assert (7, 1) not in splits  # 8 experts of 8x7B do not fit one 80 GB shard
    one, best = splits[(1, 7)], best_split(MIXTRAL_8X7B, 8)[0]
    assert best.routers > 1 and best.tok_s_per_gpu > 2 * one.tok_s_per_gpu
    assert one.router_s > one.shard_s  # one router: the shards wait for it
    assert splits[(6, 2)].shard_s > splits[(6, 2)].router_s  # six: the router waits for the shards
    assert disaggregated_split(MIXTRAL_8X7B, 1, 7, context=10**7) is None  # not one sequence fits
    assert main(["plan", "--model", "mixtral-8x7b", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert f"<- best: --routers {best.routers} --expert-shards {best.shards}" in out and "1:7" in out


def test_plan_for_deepseek_v3_counts_its_671b_parameters_and_its_latent_kv_cache(capsys):
    """DeepSeek-V3's published shape: 671B parameters (the MTP layer aside), 37B active (the
    dense part and 8 routed experts a token), and a KV cache of 576 values per token and layer
    (61 x 576 x 2 bytes = 70.3 KB), 71x less than per-head K and V; in FP8, shards that fit 80 GB."""
    from cluster.capacity import DEEPSEEK_V3, capacity_plan, gpus_needed
    from launch.cli import main

    p = capacity_plan(DEEPSEEK_V3, 16, dtype_bytes=2, fp8=True)
    total = p.dense_params + 256 * p.params_per_expert
    active = p.dense_params + 8 * p.params_per_expert
    assert abs(total / 671e9 - 1) < 0.01 and abs(active / 37e9 - 1) < 0.03, (total, active)
    assert p.kv_bytes_per_token == 61 * 576 * 2
    assert 9 <= gpus_needed(DEEPSEEK_V3, 80e9, fp8=True) <= 17
    assert main(["plan", "--model", "deepseek-v3", "--quantization", "fp8", "--expert-shards", "16"]) == 0
    out = capsys.readouterr().out
    assert "576 values per token and layer" in out and "71x more" in out


def test_keys_come_from_files_and_the_environment_and_never_from_a_printed_line(tmp_path, monkeypatch):
    """--api-key-file (a mounted Secret, one key per line) adds to the keys; RAYMIX_API_KEY
    gives them too; the settings' repr and the printed curl example never hold a key; the
    server process started for an embedded Ray gets the keys from its environment, not argv."""
    from launch.bringup import curl_example, keys_off_the_command_line

    keys = tmp_path / "keys"
    keys.write_text("sk-one\n\nsk-two\n")
    admin = tmp_path / "admin"
    admin.write_text("sk-admin\n")
    s = RaymixSettings(api_key=["sk-zero"], api_key_file=str(keys), admin_api_key_file=str(admin))
    assert s.api_key == ["sk-zero", "sk-one", "sk-two"] and s.admin_api_key == ["sk-admin"]
    assert "sk-" not in repr(s) and "sk-" not in str(s)
    assert "sk-" not in curl_example(s, "http://127.0.0.1:8000")
    monkeypatch.setenv("RAYMIX_API_KEY", "sk-env1,sk-env2")
    assert RaymixSettings.load({}).api_key == ["sk-env1", "sk-env2"]
    with pytest.raises(ValueError, match="cannot read the key file"):
        RaymixSettings(api_key_file=str(tmp_path / "missing"))
    argv, env = keys_off_the_command_line(
        ["serve", "--api-key", "sk-a", "--model", "m", "--api-key=sk-b", "--admin-api-key", "sk-c"]
    )
    assert argv == ["serve", "--model", "m"]
    assert env == {"RAYMIX_API_KEY": "sk-a,sk-b", "RAYMIX_ADMIN_API_KEY": "sk-c"}
