"""Prefix caching: a second request sharing a prompt prefix reuses the first's KV blocks (the
hit count rises, fewer tokens are computed) and its output is what it would be without caching;
evicted blocks are recomputed, and the cache never lends a block that is still being written."""

from __future__ import annotations

from moe.engine.kv_cache import BlockManager
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _engine(tiny_dir, caching: bool, **kw) -> LLMEngine:
    kw.setdefault("max_model_len", 256)
    cfg = EngineConfig(block_size=4, enable_prefix_caching=caching, **kw)
    return LLMEngine.from_pretrained(tiny_dir, cfg)


def _chat(tok, turns: list[str], system: bool = True) -> list[int]:
    """Mistral's format puts the system prompt in the last user turn, so across the turns of one
    conversation the shared prefix is the earlier turns only when there is no system prompt."""
    messages = [{"role": "system", "content": "You are a careful assistant who answers briefly."}] * system
    for i, t in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return tok.apply_chat_template(messages)


def _run(eng: LLMEngine, prompt: list[int]) -> tuple[list[int], int]:
    """→ (output tokens, prompt tokens actually computed for this request)."""
    eng.add_request("r", prompt, GREEDY)
    seq = eng.seqs["r"]
    while eng.has_unfinished():
        eng.step()
    return seq.output_token_ids, len(prompt) - seq.num_cached


def test_second_turn_reuses_first_turn_blocks_and_outputs_are_unchanged(tiny_dir):
    on, off = _engine(tiny_dir, True), _engine(tiny_dir, False)
    tok = on.tokenizer
    first = _chat(tok, ["What is a mistral?"], system=False)
    out1_on, computed1 = _run(on, first)
    out1_off, _ = _run(off, first)
    assert out1_on == out1_off and computed1 == len(first)
    assert on.stats().prefix_cache_hits == 0

    second = _chat(tok, ["What is a mistral?", tok.decode(out1_on), "How does the mistral wind form?"], False)
    out2_on, computed2 = _run(on, second)
    out2_off, _ = _run(off, second)
    assert out2_on == out2_off
    stats = on.stats()
    assert second[: len(first)] == first
    assert stats.prefix_cache_hits >= 4 * (len(first) // 4)  # every full block of the first turn
    assert computed2 == len(second) - stats.prefix_cache_hits
    assert stats.prefix_cache_queries == len(first) + len(second)
    assert off.stats().prefix_cache_hits == 0
    assert on.blocks.num_used_blocks == 0  # cached blocks are free, not held


def test_identical_prompt_leaves_one_token_to_compute(tiny_dir):
    eng = _engine(tiny_dir, True)
    prompt = eng.tokenizer.encode("one two three four five six seven eight nine ten eleven twelve")
    a, _ = _run(eng, prompt)
    b, computed = _run(eng, prompt)
    assert a == b
    assert 1 <= computed <= 4  # only the last (partial) block is recomputed


def test_concurrent_requests_share_a_system_prompt(tiny_dir):
    on, off = _engine(tiny_dir, True), _engine(tiny_dir, False)
    tok = on.tokenizer
    prompts = [_chat(tok, [q]) for q in ["Hi", "Tell me about wind", "Why is the sky blue?", "Count to 3"]]
    warm = _chat(tok, ["warm up"])
    _run(on, warm)  # caches the system prompt's blocks
    got = on.generate(prompts, GREEDY)
    want = off.generate(prompts, GREEDY)
    assert [s.output_token_ids for s in got] == [s.output_token_ids for s in want]
    assert all(s.num_cached > 0 for s in got)
    assert on.blocks.num_used_blocks == 0


def test_eviction_under_a_small_cache_keeps_outputs(tiny_dir):
    """Few blocks: cached blocks are evicted and handed out again; outputs stay right."""
    on = _engine(tiny_dir, True, num_kv_blocks=24, max_num_seqs=4, max_model_len=96)  # 24 blocks of 4
    off = _engine(tiny_dir, False, num_kv_blocks=24, max_num_seqs=4, max_model_len=96)
    tok = on.tokenizer
    prompts = [_chat(tok, [f"question number {i} about the weather in town {i}"]) for i in range(8)]
    got = on.generate(prompts + prompts[:3], GREEDY)
    want = off.generate(prompts + prompts[:3], GREEDY)
    assert [s.output_token_ids for s in got] == [s.output_token_ids for s in want]
    assert on.blocks.num_used_blocks == 0 and on.blocks.num_free_blocks == 24


def test_block_manager_shares_and_evicts_by_hash():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5]
    bm.allocate("a", 5)
    bm.cache_full_blocks("a", tokens, 5)
    hit = bm.cached_prefix(tokens)
    assert hit == bm.tables["a"][:2]  # both full blocks; the partial third is never shared
    bm.allocate("b", 5, hit)
    assert bm.tables["b"][:2] == hit and bm.ref[hit[0]] == 2
    bm.free_seq("a")
    assert bm.num_used_blocks == 3  # the shared two plus b's own third
    bm.free_seq("b")
    assert bm.num_used_blocks == 0 and bm.cached_prefix(tokens) == hit  # still cached while free
    bm.allocate("c", 8)  # needs every block: the cached ones are evicted
    assert bm.cached_prefix(tokens) == []
    assert bm.cached_prefix([9, 9, 1, 2, 3]) == []  # a hash names the whole prefix, not a block alone
