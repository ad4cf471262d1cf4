"""CPU GEMMs over weights prepacked for oneDNN (moe.layers.cpu_gemm) against torch's own GEMM, the
reference: the same products to float32 rounding, greedy outputs token-identical to
transformers with either kernel, the kernel chosen by capability then by measurement or by the
setting, and torch's GEMM where oneDNN's packed path cannot run (its private ops missing, or bf16
on a CPU without AVX-512: faked here, so the fallback is tested on every machine)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from moe.checkpoint.reader import CheckpointReader
from moe.config import ModelConfig
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.layers import cpu_gemm
from moe.layers.cpu_gemm import PackedTensor
from moe.layers.experts import LocalExperts
from moe.layers.weights import Linear, grouped_mm, linear
from moe.sampling import SamplingParams
from tests.test_reference import ARRIVALS, GREEDY, PROMPTS, hf_greedy

needs_onednn = pytest.mark.skipif(not cpu_gemm.available(), reason="this torch has no oneDNN linear ops")


def onednn_runs(dtype: torch.dtype):
    """The packed path in `dtype` where this CPU has it; skipped with the reason elsewhere."""
    why = cpu_gemm.unsupported(dtype)
    return pytest.param(dtype, marks=pytest.mark.skipif(why is not None, reason=str(why)))


@pytest.mark.parametrize("rows", [1, 8, 33])
@pytest.mark.parametrize("dtype", [onednn_runs(torch.float32), onednn_runs(torch.bfloat16)])
def test_packed_linear_equals_torchs(rows, dtype):
    torch.manual_seed(0)
    w, x = torch.randn(96, 64).to(dtype), torch.randn(rows, 64).to(dtype)
    want = F.linear(x.float(), w.float())
    got = linear(x, PackedTensor.pack(w)).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert torch.equal(PackedTensor.pack(w).unpack(), w)


@needs_onednn
@pytest.mark.parametrize("counts", [[3, 0, 2, 0], [0, 0, 4, 1], [2, 2, 2, 2]])
def test_packed_grouped_mm_equals_torchs(counts):
    """Per expert with tokens, empty groups skipped, rows past the last group left alone."""
    torch.manual_seed(0)
    w = torch.randn(4, 32, 48)
    rows = sum(counts)
    x = torch.randn(rows + 2, 48)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    group = torch.zeros(rows + 2, dtype=torch.long)  # unused by either kernel
    want = F.grouped_mm(x, w.transpose(-2, -1), offs=offs)
    got = grouped_mm(x, PackedTensor.pack(w), offs, group)
    torch.testing.assert_close(got[:rows], want[:rows], rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("kernel", ["onednn", "torch"])
def test_greedy_token_identical_with_either_kernel(model_dir, hf_models, kernel):
    eng = LLMEngine.from_pretrained(model_dir, EngineConfig(max_model_len=256, cpu_gemm=kernel, device="cpu"))
    packed = isinstance(eng.model.lm_head, Linear) and isinstance(eng.model.lm_head.held, PackedTensor)
    assert packed == (kernel == "onednn")
    assert isinstance(eng.experts.shards[0].gate_up[0], PackedTensor) == (kernel == "onednn")
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS]
    hf = hf_models(model_dir)
    if hf.device.type != "cpu":
        pytest.skip("the CPU's kernels against a GPU reference")
    for prompt, seq in zip(prompts, eng.generate(prompts, GREEDY, arrival_steps=ARRIVALS), strict=True):
        assert seq.output_token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)
    # and the logits stay within float32 rounding of transformers'
    eng.add_request("x", prompts[1], GREEDY)
    logits, _ = eng.runner.execute(eng.scheduler.schedule())
    with torch.no_grad():
        ref = hf(torch.tensor([prompts[1]])).logits[0, -1]
    torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@needs_onednn
def test_packed_experts_regroup_and_split_like_plain_ones(other_dir):
    """Hot-expert replication regroups held experts: packed ones give the same output."""
    cfg = ModelConfig.from_pretrained(other_dir)
    reader = CheckpointReader(other_dir)
    plain = LocalExperts.from_checkpoint(reader, cfg, [0, 1], torch.float32)
    packed = LocalExperts.from_checkpoint(reader, cfg, [0, 1], torch.float32, gemm="onednn").regroup(
        reader, [1, 2, 3]
    )
    plain = plain.regroup(reader, [1, 2, 3])
    assert packed.nbytes() == plain.nbytes() and packed.num_parameters() == plain.num_parameters()
    torch.manual_seed(0)
    x = torch.randn(9, cfg.hidden_size)
    ids = torch.randint(0, cfg.num_local_experts, (9, 2))
    ids[0, 0] = -1  # an assignment another shard computes
    weights = torch.rand(9, 2)
    torch.testing.assert_close(packed.forward(0, x, ids, weights), plain.forward(0, x, ids, weights))


def test_the_kernel_is_chosen_by_capability_then_measurement_or_setting(monkeypatch, caplog):
    choose = cpu_gemm.choose.__wrapped__  # not the per-process cache
    assert choose("torch", torch.float32) == "torch"
    assert choose("auto", torch.float16) == "torch"  # oneDNN's linear here: fp32 and bf16
    with pytest.raises(cpu_gemm.CpuGemmError, match="float16"):
        choose("onednn", torch.float16)
    for dtype in (torch.float32, torch.bfloat16):
        if cpu_gemm.unsupported(dtype) is None:
            assert choose("onednn", dtype) == "onednn"
            with caplog.at_level(logging.INFO, logger="moe.layers.cpu_gemm"):
                picked = choose("auto", dtype)
            assert picked in ("onednn", "torch") and f"using {picked}" in caplog.text  # with its numbers
    monkeypatch.setattr(cpu_gemm, "available", lambda: False)  # a torch without the private ops
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moe.layers.cpu_gemm"):
        assert choose("auto", torch.float32) == "torch"
    assert "no mkldnn._linear_pointwise" in caplog.text
    with pytest.raises(cpu_gemm.CpuGemmError, match=r"no mkldnn\._linear_pointwise"):
        choose("onednn", torch.float32)
    assert cpu_gemm.kernel_for("onednn", "cuda", torch.bfloat16) == "torch"  # GPUs keep theirs


AVX2_BF16 = "oneDNN's packed bfloat16 path needs AVX512-BW/VL/DQ or AVX-NE-CONVERT, which this CPU lacks"


def test_bf16_on_a_cpu_without_avx512_takes_torchs_gemm(monkeypatch, caplog, tiny_dir):
    """An AVX2-only CPU (Zen 3, Haswell): fp32 keeps the packed path, bf16 falls back to torch's
    GEMM with one log line saying why, and an explicit onednn is refused in one line; an engine
    in bf16 then loads and generates (it crashed at load before)."""
    monkeypatch.setattr(
        cpu_gemm, "_trial", lambda dtype: AVX2_BF16 if dtype == torch.bfloat16 else None
    )  # the answer this CPU would give without AVX-512
    choose = cpu_gemm.choose.__wrapped__
    with caplog.at_level(logging.INFO, logger="moe.layers.cpu_gemm"):
        assert choose("auto", torch.bfloat16) == "torch"
    (line,) = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    assert line == f"CPU GEMM (bfloat16): torch's, as {AVX2_BF16}"
    with pytest.raises(cpu_gemm.CpuGemmError) as e:
        choose("onednn", torch.bfloat16)
    assert "\n" not in str(e.value) and "--cpu-gemm onednn cannot run in bfloat16" in str(e.value)
    if cpu_gemm.available():
        assert choose("onednn", torch.float32) == "onednn"
    monkeypatch.setattr(cpu_gemm, "choose", cpu_gemm.choose.__wrapped__)  # no per-process cache
    eng = LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=64, dtype="bfloat16", device="cpu"))
    assert not isinstance(eng.experts.shards[0].gate_up[0], PackedTensor)
    (seq,) = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert seq.num_output_tokens == 3
