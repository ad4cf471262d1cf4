"""FP8 checkpoints and `--quantization fp8`, in-process: greedy token-identical to transformers on
the dequantized weights (float32, the weight-only path of CPUs and older GPUs), FP8 kept FP8 in
memory (the bytes a shard holds halve against bf16), a shard reading only its experts' tensors
and scales, and the W8A8 matmul of FP8 GPUs against its emulation."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moe.checkpoint.fp8_export import quantize_as_stored, write_dequantized, write_fp8
from moe.checkpoint.reader import CheckpointReader, expert_shapes, open_checkpoint
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.expert_parallel.backend import InProcessExperts
from moe.layers.experts import LocalExperts
from moe.layers.fp8 import FP8, FP8_MAX, Fp8Tensor, quantize_activations
from moe.layers.fp8 import grouped_mm as fp8_grouped_mm
from moe.layers.weights import Linear
from moe.models.transformer import DenseModel
from moe.sampling import SamplingParams
from tests.conftest import hf_model
from tests.test_reference import ARRIVALS, PROMPTS, hf_greedy

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

# (format, weight scales, activations, expert names, ignore list) as the published FP8 Mixtrals
# and llm-compressor's recipes have them
VARIANTS = {
    "ct-channel-dynamic": ("compressed-tensors", "channel", "dynamic", 1, ("lm_head", "re:.*gate$")),
    "ct-tensor-static": ("compressed-tensors", "tensor", "static", 0, ("lm_head", "re:.*gate$")),
    "ct-channel-weight-only": ("compressed-tensors", "channel", None, 0, ("lm_head",)),
    "ct-block-dynamic": ("compressed-tensors", "block", "dynamic", 0, ("lm_head", "re:.*gate$")),
    "ct-ignore-layer0-attn": (
        "compressed-tensors",
        "channel",
        "dynamic",
        1,
        ("lm_head", "re:.*gate$", "re:model.layers.0.self_attn.*"),
    ),
    "autofp8-static": ("fp8", "tensor", "static", 0, ("lm_head",)),  # its gates quantized too
    "autofp8-dynamic": ("fp8", "tensor", "dynamic", 0, ("lm_head", "re:.*gate$")),
    "fp8-block": ("fp8", "block", "dynamic", 0, ("lm_head", "re:.*gate$")),
}


def fp8_copy(src, tmp_path_factory, name: str):
    fmt, strategy, acts, names, ignore = VARIANTS[name]
    q = write_fp8(src, tmp_path_factory.mktemp(name), fmt, strategy, acts, names, ignore, block=(64, 64))
    return q, write_dequantized(q, tmp_path_factory.mktemp(f"{name}-ref"))


def is_fp8(module) -> bool:
    return isinstance(module, Linear) and isinstance(module.held, Fp8Tensor)


def engine(path, num_shards=1, **kw):
    """float32 everywhere, as the reference: the weight-only FP8 path, token-exact also on an FP8
    GPU (whose W8A8 bf16 path is checked against its emulation below, not against fp32)."""
    kw.setdefault("dtype", "float32")
    return LLMEngine.from_pretrained(path, EngineConfig(max_model_len=256, **kw), num_shards=num_shards)


# every format on the tiny model; on the other (sizes no block divides, a sharded checkpoint,
# a sliding window) the ones its shapes change: block scales, and transformers' expert names
CASES = [("tiny_dir", name) for name in VARIANTS]
CASES += [("other_dir", name) for name in ("ct-channel-dynamic", "ct-block-dynamic", "fp8-block")]


@pytest.mark.parametrize(("model", "name"), CASES)
def test_fp8_checkpoint_greedy_equals_transformers_on_its_dequantized_weights(
    request, model, name, tmp_path_factory, device
):
    """Every format, in process with 1 and 2 expert shards, under continuous batching."""
    model_dir = request.getfixturevalue(model)
    q, ref = fp8_copy(model_dir, tmp_path_factory, name)
    hf = hf_model(ref, device)
    for shards in (1, 2):
        eng = engine(q, shards, block_size=8)
        prompts = [eng.tokenizer.encode(p) for p in PROMPTS]
        seqs = eng.generate(prompts, GREEDY, arrival_steps=ARRIVALS)
        for prompt, seq in zip(prompts, seqs, strict=True):
            assert seq.output_token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens), (name, shards)
    # what is FP8 in the file is FP8 in memory; what the ignore list keeps is not
    attn = eng.model.layers[0].self_attn
    assert is_fp8(attn.qkv_proj) != ("layer0-attn" in name)
    assert is_fp8(eng.model.layers[1].self_attn.o_proj)
    assert not is_fp8(eng.model.layers[0].mlp.gate)  # gates are dequantized at load
    assert all(isinstance(w, Fp8Tensor) and w.data.dtype == FP8 for w in eng.experts.shards[0].gate_up)


def test_online_fp8_quantization_of_a_bf16_checkpoint(tiny_dir, tmp_path, device):
    """--quantization fp8 on the bf16 tiny model: each linear per output channel, gates and LM
    head kept, greedy equal to transformers on weights quantized the obvious way here."""
    bf16 = shutil.copytree(tiny_dir, tmp_path / "bf16")
    tensors = {n: t.to(torch.bfloat16) for n, t in load_file(bf16 / "model.safetensors").items()}
    save_file(tensors, str(bf16 / "model.safetensors"))
    ref = shutil.copytree(bf16, tmp_path / "ref")
    expected = {}
    for n, t in tensors.items():
        if n.endswith("_proj.weight") or ".experts." in n:  # not gates, norms, embeddings, LM head
            w = t.float()
            scale = w.abs().amax(1, keepdim=True) / 448
            t = (w / scale).to(torch.float8_e4m3fn).float() * scale
        expected[n] = t.float()
    save_file(expected, str(ref / "model.safetensors"))
    eng = engine(bf16, quantization="fp8")
    assert is_fp8(eng.model.layers[0].self_attn.qkv_proj)
    assert not is_fp8(eng.model.layers[0].mlp.gate) and not is_fp8(eng.model.lm_head)
    hf = hf_model(ref, device)
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS]
    for prompt, seq in zip(prompts, eng.generate(prompts, GREEDY, arrival_steps=ARRIVALS), strict=True):
        assert seq.output_token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)


def test_fp8_holds_half_the_bytes_of_bf16_and_a_shard_reads_only_its_experts(tiny_dir, tmp_path_factory):
    q, _ = fp8_copy(tiny_dir, tmp_path_factory, "ct-channel-dynamic")
    cfg, quant, reader = open_checkpoint(q)
    assert quant is not None and quant.describe() == "fp8 (compressed-tensors, activations per token)"
    fp8 = LocalExperts.from_checkpoint(reader, cfg, [2, 3], torch.bfloat16, quant=quant)
    names = set(expert_shapes(cfg, [2, 3], 1))
    assert set(reader.tensors_read) == {f"{m}.{t}" for m in names for t in ("weight", "weight_scale")}
    bf16 = LocalExperts.from_checkpoint(CheckpointReader(tiny_dir), cfg, [2, 3], torch.bfloat16)
    assert 0.5 <= fp8.nbytes() / bf16.nbytes() < 0.51  # one byte a weight and a float32 per row
    # the dense part: its attention projections halve too (embeddings, norms, gates, head do not)
    dense_fp8 = DenseModel.from_checkpoint(CheckpointReader(q), cfg, torch.bfloat16, quant=quant)
    dense_bf16 = DenseModel.from_checkpoint(CheckpointReader(tiny_dir), cfg, torch.bfloat16)
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    qd, kv = cfg.num_attention_heads * cfg.attn_head_dim, cfg.num_key_value_heads * cfg.attn_head_dim
    attn = layers * (2 * h * qd + 2 * h * kv)  # q, o, k, v: 2 bytes each in bf16, 1 in FP8
    scales = layers * 4 * (qd + h + 2 * kv)  # a float32 per output row
    assert dense_bf16.nbytes() - dense_fp8.nbytes() == attn - scales
    # two shards hold half each
    two = InProcessExperts.from_checkpoint(
        CheckpointReader(q), cfg, torch.bfloat16, num_shards=2, quant=quant
    )
    assert [s.nbytes() for s in two.shards] == [fp8.nbytes() * 2, fp8.nbytes() * 2]


def rowwise_scaled_mm_on_cpu() -> bool:
    """Whether this torch's CPU _scaled_mm takes per-row scales (2.13 does; 2.11's takes
    per-tensor ones only: there the W8A8 path is the GPU's alone)."""
    a = torch.ones(16, 16).to(FP8)
    try:
        torch._scaled_mm(
            a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32
        )
    except RuntimeError:
        return False
    return True


def test_w8a8_linear_equals_its_emulation(device):
    """The FP8-GPU path (activations quantized per token or with the static scale, then
    torch._scaled_mm, which also runs on the CPU) against the same arithmetic written out."""
    if device.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need SM89+")
    if device.type == "cpu" and not rowwise_scaled_mm_on_cpu():
        pytest.skip(
            f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only (row-wise from 2.13)"
        )
    torch.manual_seed(0)
    x, w = torch.randn(5, 64, device=device), torch.randn(48, 64, device=device) / 8
    for input_scale in (None, torch.tensor(4.0 / FP8_MAX, device=device)):
        weight = Fp8Tensor.quantize(w)
        weight.input_scale = input_scale
        xq, sa = quantize_activations(x, input_scale)
        if input_scale is None:
            assert torch.equal(sa.squeeze(1), x.abs().amax(1) / FP8_MAX)
        want = (xq.float() * sa) @ weight.dequantize(torch.float32).T
        got = Linear(weight, w8a8=True)(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # and within FP8's rounding of the weight-only result
        assert (got - Linear(weight, w8a8=False)(x)).abs().max() < 0.1 * (x @ w.T).abs().max()


@pytest.mark.parametrize("counts", [[3, 0, 2, 0], [0, 0, 4, 1], [2, 2, 2, 2]])
def test_fp8_grouped_mm_equals_the_dequantized_weights(counts):
    """The experts' GEMM over FP8 weights (only the groups with rows cast, on the CPU) against
    torch's grouped GEMM over the dequantized weights, with empty groups and rows past the last
    group (assignments another shard computes), per-row and per-block scales."""
    torch.manual_seed(0)
    w = torch.randn(4, 32, 48) / 7
    rows = sum(counts)
    x = torch.randn(rows + 2, 48)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    group = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)] + [torch.full((2,), 4)])
    per_row = Fp8Tensor.quantize(w)
    data, scale = zip(*(quantize_as_stored(w[e], "block", (16, 16)) for e in range(4)), strict=True)
    per_block = Fp8Tensor(torch.stack(data), torch.stack(scale), None, (16, 16))
    for weight in (per_row, per_block):
        want = F.grouped_mm(x, weight.dequantize(torch.float32).transpose(-2, -1), offs=offs)
        got = fp8_grouped_mm(x, weight, offs, group)
        torch.testing.assert_close(got[:rows], want[:rows], rtol=1e-5, atol=1e-5)
