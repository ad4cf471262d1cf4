"""Checkpoint reading: sharded sets, partial loads that read only what they need, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe.checkpoint.reader import CheckpointReader, dense_tensor_shapes, expert_tensor_shapes, open_checkpoint
from moe.checkpoint.tiny import random_weights
from moe.config import ModelConfig
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.errors import CheckpointError
from moe.layers.experts import LocalExperts
from moe.sampling import SamplingParams


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


# ---- what raymix cannot serve: refused in one line before a weight is read ----

INT8_W8A8 = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
        }
    },
}
NVFP4 = {
    "quant_method": "compressed-tensors",
    "format": "nvfp4-pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16},
        }
    },
}
REFUSED_CONFIGS = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "quantization method 'gptq'"),
    "awq": ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "quantization method 'awq'"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "method 'bitsandbytes'"),
    "int8-w8a8": (INT8_W8A8, "format 'int-quantized'"),
    "nvfp4": (NVFP4, "format 'nvfp4-pack-quantized'"),
}


def with_quantization_config(src, dst, quantization_config):
    d = broken_copy(src, dst)
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "quantization_config": quantization_config}))
    return d


@pytest.mark.parametrize("method", list(REFUSED_CONFIGS))
def test_unsupported_quantization_is_refused_by_name(tiny_dir, tmp_path, method):
    """A bf16 checkpoint whose config says GPTQ (or AWQ, bitsandbytes, int8, NVFP4) is refused,
    not served as if its weights were plain; the message names the method and what is supported."""
    config, named = REFUSED_CONFIGS[method]
    d = with_quantization_config(tiny_dir, tmp_path / method, config)
    with pytest.raises(CheckpointError, match="supported: FP8") as e:
        open_checkpoint(d)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_tensors_raymix_cannot_use_as_stored_are_refused(tiny_dir, tmp_path, tmp_path_factory):
    from moe.checkpoint.fp8_export import write_fp8

    q = write_fp8(tiny_dir, tmp_path_factory.mktemp("fp8"), "compressed-tensors", "channel", "static")
    name = "model.layers.1.block_sparse_moe.experts.5.w2"
    for missing, why in (("weight_scale", "has no scale"), ("input_scale", "has no static activation scale")):
        d = broken_copy(q, tmp_path / missing)
        tensors = load_file(d / "model.safetensors")
        del tensors[f"{name}.{missing}"]
        save_file(tensors, str(d / "model.safetensors"))
        with pytest.raises(CheckpointError, match=f"FP8 tensor '{name}.weight' {why}"):
            open_checkpoint(d)
    d = broken_copy(tiny_dir, tmp_path / "int")  # packed integers, and no config saying how
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(256, 256, dtype=torch.int32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight' is stored as I32; raymix reads F32, BF16"):
        open_checkpoint(d)
    d = broken_copy(tiny_dir, tmp_path / "fp8-no-config")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].to(
        torch.float8_e4m3fn
    )
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"is FP8 but config\.json has no quantization_config"):
        open_checkpoint(d)


@pytest.mark.parametrize("command", ["plan", "serve"])
def test_cli_prints_one_line_and_exits_nonzero(tiny_dir, tmp_path, command):
    """`raymix serve` and `raymix plan` on a GPTQ config: one line naming it, exit 1, no
    traceback, and serve starts nothing (it refuses before Ray)."""
    d = with_quantization_config(tiny_dir, tmp_path / "gptq", REFUSED_CONFIGS["gptq"][0])
    raymix = Path(sys.executable).parent / "raymix"
    r = subprocess.run(
        [str(raymix), command, "--model", str(d), *(["--port", "1"] if command == "serve" else [])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"raymix: {d / 'config.json'}: quantization method 'gptq' is not supported")
    assert "supported: FP8" in lines[0] and "Traceback" not in r.stderr and "starting" not in r.stdout
