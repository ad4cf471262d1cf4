"""Async scheduling (EngineConfig.async_scheduling, on by default): a step's samples stay on the
device as the next step's inputs and their outputs are processed one step behind. Against the
same engine without it (the slow, obvious reference): the same tokens, texts and finish reasons
for greedy, seeded, stop-string, stop-token and max_tokens requests joining mid-way; no token
past a stop reaches the outputs; an abort frees the KV cache at once; a request that needs its
last token on the host (logprobs) joining mid-way changes nothing; prefix-cache names of blocks
completed by generated tokens; and the pipeline's order (the next step is queued before the
last step's samples are read)."""

from __future__ import annotations

import pytest

from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.engine.model_runner import Pending
from moe.sampling import SamplingParams
from tests.test_gpu_readiness import SyncCounter, uncounted
from tests.test_reference import PROMPTS


def engine(path, async_scheduling: bool, **kw) -> LLMEngine:
    config = EngineConfig(max_model_len=256, async_scheduling=async_scheduling, **kw)
    return LLMEngine.from_pretrained(path, config)


def run(eng: LLMEngine, prompts, params, arrivals) -> dict[str, list]:
    """Every output of every step, by request: the stream a client would see."""
    streams: dict[str, list] = {}
    step = 0
    while step <= max(arrivals) or eng.has_unfinished():
        for i, a in enumerate(arrivals):
            if a == step:
                eng.add_request(f"r{i}", prompts[i], params[i])
        for out in eng.step():
            streams.setdefault(out.request_id, []).append(out)
        step += 1
    return streams


def summary(streams: dict[str, list]) -> dict[str, tuple]:
    """Per request: tokens and text as the deltas add up, finish reason, stop reason, and
    whether exactly the last output says finished."""
    result = {}
    for rid, outs in streams.items():
        tokens = [t for o in outs for t in o.new_token_ids]
        text = "".join(o.new_text for o in outs)
        finished = [o.finished for o in outs]
        assert finished[-1] and not any(finished[:-1]), (rid, finished)  # nothing after the end
        assert len(tokens) == outs[-1].num_output_tokens
        result[rid] = (tokens, text, outs[-1].finish_reason, outs[-1].stop_reason)
    return result


def test_async_outputs_equal_the_synchronous_engines(model_dir):
    """Greedy and seeded requests with stop strings, stop tokens and max_tokens taken from the
    synchronous run's own output (so each stop really fires mid-stream), joining at different
    steps: every client-visible stream identical, no token past a stop."""
    sync = engine(model_dir, async_scheduling=False)
    prompts = [sync.tokenizer.encode(p) for p in PROMPTS]
    arrivals = [0, 0, 2, 5, 9]
    free = [
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
    ]
    base = summary(run(sync, prompts, free, arrivals))
    text2, tokens3 = base["r2"][1], base["r3"][0]
    stop = text2[len(text2) // 2 : len(text2) // 2 + 2]
    assert stop.strip(), text2
    params = [
        free[0],
        free[1],
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop]),
        SamplingParams(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True, stop_token_ids=[tokens3[6]]),
        SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),
    ]
    want = summary(run(engine(model_dir, async_scheduling=False), prompts, params, arrivals))
    eng = engine(model_dir, async_scheduling=True)
    got = summary(run(eng, prompts, params, arrivals))
    assert got == want
    assert want["r2"][2:] == ("stop", stop) and stop not in want["r2"][1]
    assert want["r3"][2:] == ("stop", tokens3[6]) and len(want["r3"][0]) <= 7
    assert want["r4"][2] == "length" and len(want["r4"][0]) == 7
    assert eng.blocks.num_used_blocks == 0 and not eng.seqs and not eng.has_unfinished()


def test_a_request_needing_its_tokens_on_the_host_joins_without_changing_anything(tiny_dir):
    """logprobs (read from the step's logits on the host) joining a running async batch: the
    engine processes the pending step first and runs synchronously while it lasts."""
    sync = engine(tiny_dir, async_scheduling=False)
    prompts = [sync.tokenizer.encode(p) for p in PROMPTS[:3]]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    ]
    arrivals = [0, 3, 5]
    want = run(sync, prompts, params, arrivals)
    got = run(engine(tiny_dir, async_scheduling=True), prompts, params, arrivals)
    assert summary(got) == summary(want)
    lp = [[(x.token_id, x.logprob) for x in o.new_logprobs] for o in got["r1"]]
    assert lp == [[(x.token_id, x.logprob) for x in o.new_logprobs] for o in want["r1"]]


def test_abort_frees_the_kv_cache_at_once_and_its_pending_sample_is_dropped(tiny_dir):
    eng = engine(tiny_dir, async_scheduling=True)
    for i, p in enumerate(PROMPTS[:2]):
        eng.add_request(f"r{i}", eng.tokenizer.encode(p), SamplingParams(max_tokens=30, temperature=0.0))
    for _ in range(4):
        eng.step()
    assert eng._pending is not None and eng.seqs["r0"].pending == 1  # a sample in flight
    used, held = eng.blocks.num_used_blocks, len(eng.blocks.tables["r0"])
    assert eng.abort_request("r0")
    assert eng.blocks.num_used_blocks == used - held  # at once, not a step later
    later = [o for _ in range(3) for o in eng.step()]
    assert later and all(o.request_id == "r1" for o in later)
    assert eng.abort_request("r1") and eng.blocks.num_used_blocks == 0
    assert not eng.has_unfinished() and eng.step() == []


def test_blocks_completed_by_generated_tokens_are_named_for_the_prefix_cache(tiny_dir):
    """A block whose last token was a pending sample gets its prefix-cache name when the sample
    is processed: a second request whose prompt is the first's prompt and output hits it."""
    eng = engine(tiny_dir, async_scheduling=True, block_size=8)
    prompt = eng.tokenizer.encode(PROMPTS[1])
    # the K/V computed last (the token before the last sample) completes a block: that block
    # is named only when that token, pending then, is processed, after the step that computed it
    n = 16 + (8 - (len(prompt) - 1) % 8) % 8
    (first,) = eng.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    whole = prompt + first.output_token_ids
    assert (len(whole) - 1) % 8 == 0
    hits = eng.blocks.prefix_cache_hits
    eng.generate([whole], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    # every token whose K/V the first request computed (all but its last sample)
    assert eng.blocks.prefix_cache_hits - hits == len(whole) - 1


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_the_next_step_is_queued_before_the_last_samples_are_read(tiny_dir, attention):
    """The pipeline's order, as a GPU runs it: each decode step's forward is queued before the
    previous step's samples are read on the host, and neither its inputs (the pending samples
    gathered on the device) nor its sampling make the host wait for the device."""
    eng = engine(
        tiny_dir,
        async_scheduling=True,
        cuda_graphs=True,
        attention_backend=attention,
        device="cpu",
        cpu_gemm="torch",
        block_size=16,
    )
    events: list[str] = []
    syncs: list[int] = []
    execute, read, sample = eng.runner.execute, Pending.token_list, eng.sampler.sample_ids

    def counted(f, name):
        def wrapped(*args, **kwargs):
            events.append(name)
            with SyncCounter() as counter:
                out = f(*args, **kwargs)
            syncs.append(counter.count)
            return out

        return wrapped

    for lane in eng.decode.lanes if eng.decode is not None else []:
        if lane.flex is not None:  # FlexAttention (one compiled kernel on a GPU) runs uncounted
            lane.flex.attention = uncounted(lane.flex.attention)
    eng.runner.execute = counted(execute, "execute")  # type: ignore[method-assign]
    eng.sampler.sample_ids = counted(sample, "sample")  # type: ignore[method-assign]
    Pending.token_list = lambda self: (events.append("read"), read(self))[1]  # type: ignore[method-assign]
    try:
        prompts = [eng.tokenizer.encode(p) for p in PROMPTS[:4]]
        eng.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    finally:
        Pending.token_list = read  # type: ignore[method-assign]
    # step 1: execute, sample; step k > 1: execute, sample, then read step k-1's samples
    assert events[:2] == ["execute", "sample"]
    assert events[2:] == ["execute", "sample", "read"] * 5 + ["read"]
    # the prefill's metadata are built from host tensors (one nonzero, of a host tensor)
    assert syncs[1:] == [0] * (len(syncs) - 1)
