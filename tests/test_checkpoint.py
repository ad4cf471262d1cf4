"""Checkpoint reading: sharded sets, partial loads that read only what they need, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from moe.checkpoint import CheckpointReader, dense_tensor_shapes, expert_tensor_shapes
from moe.config import ModelConfig
from moe.engine import EngineConfig, LLMEngine
from moe.errors import CheckpointError
from moe.experts import LocalExperts
from moe.sampling import SamplingParams
from moe.tiny import random_weights


def test_sharded_checkpoint_with_index_loads(other_dir):
    assert (other_dir / "model.safetensors.index.json").is_file()
    assert len(list(other_dir.glob("model-*-of-00003.safetensors"))) == 3
    reader = CheckpointReader(other_dir)
    cfg = ModelConfig.from_pretrained(other_dir)
    assert len(set(reader.weight_map.values())) == 3
    t = reader.load(dense_tensor_shapes(cfg) | expert_tensor_shapes(cfg, range(cfg.num_local_experts)))
    assert len(t) == len(reader.weight_map)


def test_one_shards_experts_read_only_those_tensors(other_dir):
    cfg = ModelConfig.from_pretrained(other_dir)
    reader = CheckpointReader(other_dir)
    experts = LocalExperts.from_checkpoint(reader, cfg, [1, 2], torch.float32)
    read = set(reader.tensors_read)
    assert read == set(expert_tensor_shapes(cfg, [1, 2]))
    assert all(".experts.1." in n or ".experts.2." in n for n in read)
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    assert experts.num_parameters() == 2 * cfg.num_hidden_layers * per_expert


def test_dense_part_reads_no_expert(tiny_dir):
    cfg = ModelConfig.from_pretrained(tiny_dir)
    reader = CheckpointReader(tiny_dir)
    reader.load(dense_tensor_shapes(cfg))
    assert not any(".experts." in n for n in reader.tensors_read)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load(tiny_dir, tmp_path, dtype):
    d = shutil.copytree(tiny_dir, tmp_path / "half")
    cfg = ModelConfig.from_pretrained(d)
    save_file({n: t.to(dtype) for n, t in random_weights(cfg, seed=0).items()}, str(d / "model.safetensors"))
    eng = LLMEngine.from_pretrained(d)
    assert eng.model.dtype == torch.float32  # computed in float32 on CPU
    (seq,) = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert seq.num_output_tokens == 3
    assert LLMEngine.from_pretrained(d, EngineConfig(dtype="bfloat16")).model.dtype == torch.bfloat16


def broken_copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(other_dir, tmp_path):
    d = broken_copy(other_dir, tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.block_sparse_moe.experts.3.w2.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.2\.block_sparse_moe\.experts\.3\.w2\.weight.*missing"
    ):
        LLMEngine.from_pretrained(d)


def test_missing_shard_file_is_named(other_dir, tmp_path):
    d = broken_copy(other_dir, tmp_path / "f")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors.*missing"):
        CheckpointReader(d)


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    d = broken_copy(tiny_dir, tmp_path / "s")
    reader = CheckpointReader(d)
    cfg = ModelConfig.from_pretrained(d)
    t = reader.load(dense_tensor_shapes(cfg) | expert_tensor_shapes(cfg, range(8)))
    t["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \(3, 3\)",
    ):
        LLMEngine.from_pretrained(d)


def test_corrupt_file_is_named(tiny_dir, tmp_path):
    d = broken_copy(tiny_dir, tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        LLMEngine.from_pretrained(d)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickle checkpoints are refused"):
        CheckpointReader(tmp_path)


def test_bad_config_is_named(tiny_dir, tmp_path):
    d = broken_copy(tiny_dir, tmp_path / "cfg")
    (d / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        LLMEngine.from_pretrained(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nowhere")
