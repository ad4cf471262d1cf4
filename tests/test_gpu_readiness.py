"""Proofs on the CPU that the GPU will see what it needs (no GPU is needed to run them):

- the padded bf16 decode step, as a CUDA graph captures it, traces with
  torch.compile(fullgraph=True): a host sync (.item(), .tolist(), nonzero, bool(tensor)) or a
  data-dependent shape would break the graph, and the fake kernels check the CUDA grouped GEMM's
  input rules (bf16, 16-byte strides, int32 offsets);
- no host sync in any decode forward, eager or padded, with in-process or remote experts, and a
  fixed number per prefill whatever the number of sequences (a dispatch mode counts them);
- one FlexAttention compile per batch bucket;
- the configuration checks that mirror CUDA's limits.
The engines here use torch's own GEMM (cpu_gemm "torch") and plain weights, as a GPU does: the
oneDNN and FP8 CPU paths read group sizes on the host on purpose (free on a CPU)."""

from __future__ import annotations

import datetime

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from moe.config import ModelConfig
from moe.engine.decode_path import graphs_runnable, pick_attention
from moe.engine.kv_cache import KVCache
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.layers.experts import grouped_gemm_misaligned
from moe.layers.flex_decode import FlexDecode
from moe.sampling import SamplingParams
from tests.test_reference import PROMPTS

SYNCS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::item"}
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


class SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device (on a GPU). FlexAttention's
    higher-order op passes through whole (on a GPU it is one compiled kernel)."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(getattr(func, "_schema", None), "name", "") in SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def engine(path, **kw) -> LLMEngine:
    config = EngineConfig(max_model_len=256, block_size=16, device="cpu", cpu_gemm="torch", **kw)
    return LLMEngine.from_pretrained(path, config)


def counted_forwards(eng: LLMEngine) -> list[tuple[str, int]]:
    """Wrap the model's forward and logits: (kind of step, host syncs) per model call."""
    calls: list[tuple[str, int]] = []
    forward, logits = eng.model.forward, eng.model.compute_logits

    def counted(f, name):
        def run(*args, **kwargs):
            with SyncCounter() as counter:
                out = f(*args, **kwargs)
            calls.append((name, counter.count))
            return out

        return run

    eng.model.forward = counted(forward, "forward")  # type: ignore[method-assign]
    eng.model.compute_logits = counted(logits, "logits")  # type: ignore[method-assign]
    for lane in eng.decode.lanes if eng.decode is not None else []:
        if lane.flex is not None:  # FlexAttention (one compiled kernel on a GPU) runs uncounted
            lane.flex.attention = uncounted(lane.flex.attention)
    return calls


def uncounted(f):
    def run(*args, **kwargs):
        with _disable_current_modes():
            return f(*args, **kwargs)

    return run


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_the_padded_bf16_decode_step_traces_whole(model_dir, attention):
    """What a graph captures: torch.compile(fullgraph=True) of the step over the static buffers
    (the gather, or FlexAttention over the pages), equal to running it."""
    eng = engine(model_dir, dtype="bfloat16", cuda_graphs=True, attention_backend=attention)
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS[:3]]
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(max_tokens=8, temperature=0.0))
    eng.step()  # prefill
    eng.step()  # a decode step through the decode path fills its buffers
    decode = eng.decode
    assert decode is not None and decode.graphs and not decode.capture
    seqs = list(eng.seqs.values())
    tables = [eng.blocks.tables[s.request_id] for s in seqs]
    bsz, ctx, flex = decode._bucket(len(seqs), [len(s) for s in seqs])
    decode.lanes[0].fill([s.token_ids[-1] for s in seqs], tables, [len(s) for s in seqs], bsz, ctx, flex)
    torch._dynamo.reset()
    traced = torch.compile(decode.step, fullgraph=True, backend="eager", dynamic=False)
    with torch.inference_mode():
        want = decode.step(bsz, ctx, flex)
        got = traced(bsz, ctx, flex)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw",
    [
        {"cuda_graphs": True, "attention_backend": "sdpa"},
        {"cuda_graphs": True, "attention_backend": "flex"},
        {"cuda_graphs": False, "attention_backend": "flex"},  # eager decode steps, as a router's
        {"cuda_graphs": False, "attention_backend": "sdpa"},  # the general path
    ],
    ids=["graph-gather", "graph-flex", "eager-flex", "general"],
)
def test_no_host_sync_in_decode_forwards_and_a_fixed_number_per_prefill(tiny_dir, kw):
    for n in (2, 5):  # the number of sequences must not change the count
        eng = engine(tiny_dir, **kw)
        calls = counted_forwards(eng)
        prompts = [eng.tokenizer.encode(p) for p in PROMPTS[:n]]
        eng.generate(prompts, GREEDY)
        prefill, decode = calls[:2], calls[2:]  # the first step: every prompt at once
        assert [name for name, _ in prefill] == ["forward", "logits"]
        assert len(decode) == 2 * (GREEDY.max_tokens - 1)
        assert all(syncs == 0 for _, syncs in decode), decode
        assert all(syncs == 0 for _, syncs in prefill), prefill


def test_no_host_sync_with_remote_experts(tiny_dir):
    """The router's side of the data plane as it runs on a GPU (every shard gets the whole layer
    batch: no routing read on the host), with shards in spawned processes."""
    from moe.checkpoint.reader import CheckpointReader
    from moe.expert_parallel.local_shards import LocalShards
    from moe.models.transformer import DenseModel
    from moe.tokenizer import load_tokenizer

    shards = LocalShards(tiny_dir, 2, whole_batch=True, timeout=datetime.timedelta(seconds=120))
    try:
        cfg = ModelConfig.from_pretrained(tiny_dir)
        model = DenseModel.from_checkpoint(CheckpointReader(tiny_dir), cfg, torch.float32)
        eng = LLMEngine(
            cfg,
            model,
            shards.experts,
            EngineConfig(max_model_len=256, device="cpu"),
            load_tokenizer(tiny_dir),
            tiny_dir,
        )
        calls = counted_forwards(eng)
        eng.generate([eng.tokenizer.encode(p) for p in PROMPTS[:3]], GREEDY)
        assert len(calls) == 2 * GREEDY.max_tokens and all(syncs == 0 for _, syncs in calls), calls
    finally:
        shards.close()


def test_one_flex_compile_per_batch_bucket():
    """The probe (ready) and the model's step run under inference_mode alike: the kernel the
    step uses is the one the probe built, not a second version."""
    from torch._dynamo.utils import counters

    cfg = ModelConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=1)
    cache = KVCache(cfg, 40, 16, torch.float32, "cpu")
    flex = FlexDecode(cache, 8, None, compile=True)
    torch._dynamo.reset()
    counters.clear()
    tables, lens = [[3, 7], [5]], [20, 9]
    positions, slots = torch.tensor([19, 8]), torch.tensor([7 * 16 + 3, 5 * 16 + 8])
    with torch.inference_mode():  # queries and new K/V come out of the model's projections
        q = torch.randn(2, 8, 32)
        k, v = torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    for bsz in (2, 4):
        assert flex.ready(bsz, cfg.num_attention_heads)
        frames = counters["stats"]["unique_graphs"]
        flex.fill(tables, lens, bsz, 0)
        k_cache, v_cache = cache.k[0].clone(), cache.v[0].clone()  # made outside, as the engine's cache
        with torch.inference_mode():  # as the model runs
            meta = flex.metadata(positions, slots, bsz, 0)
            meta.attend(q, k, v, k_cache, v_cache)
        assert counters["stats"]["unique_graphs"] == frames  # the step compiled nothing new
    assert counters["stats"]["unique_graphs"] == 2  # one per bucket


def test_configuration_checks_mirror_cudas_limits(monkeypatch):
    cuda = torch.device("cuda")
    # FlexAttention's Triton kernel takes pages of a multiple of 16 tokens
    with pytest.raises(ValueError, match="multiple of 16"):
        pick_attention("flex", cuda, 8)
    assert pick_attention("auto", cuda, 8) == "sdpa"
    assert pick_attention("auto", cuda, 16) == "flex"
    assert pick_attention("auto", torch.device("cpu"), 16) == "sdpa"
    # graphs only where the grouped GEMM runs on the device: bf16 on SM90/SM100
    for cap, ok in (((9, 0), True), ((10, 0), True), ((8, 0), False), ((8, 9), False), ((12, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: c)
        assert (graphs_runnable(cuda, torch.bfloat16) is None) == ok
        assert graphs_runnable(cuda, torch.float16) is not None
    assert graphs_runnable(torch.device("cpu"), torch.bfloat16) is not None
    # the grouped GEMM's rows: strides of a multiple of 16 bytes
    assert grouped_gemm_misaligned(ModelConfig(), torch.bfloat16) is None  # Mixtral 8x7B
    assert "intermediate_size 100" in grouped_gemm_misaligned(
        ModelConfig(hidden_size=64, intermediate_size=100), torch.bfloat16
    )
    # FP8 experts (W8A8): 16 elements, not bf16's 8; 8x7B's sizes fit both
    odd = ModelConfig(hidden_size=64, intermediate_size=200)  # 200 bf16: 400 bytes; 200 FP8: 200 bytes
    assert grouped_gemm_misaligned(odd, torch.bfloat16) is None
    assert "intermediate_size 200 x 1 bytes (FP8)" in grouped_gemm_misaligned(odd, torch.bfloat16, fp8=True)
    assert grouped_gemm_misaligned(ModelConfig(), torch.bfloat16, fp8=True) is None
