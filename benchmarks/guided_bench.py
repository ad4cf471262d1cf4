"""Constrained-decoding libraries side by side: grammar compile time and per-token overhead.

For each library installed (llguidance, xgrammar, outlines-core) on the embedded model's
tokenizer: compile a JSON schema (per request; the tokenizer's own set-up, once per process,
is not counted), then decode --tokens tokens choosing uniformly among the
allowed ones (a random model, as the embedded checkpoint is) and time each step's mask +
advance; `raymix` is the same with what closes the output within max_tokens. The engine's own decode step is timed beside it, so the overhead reads as a fraction
of a step. Median of --runs runs; JSON + PNG in benchmarks/results/.

    .venv/bin/python benchmarks/guided_bench.py [--tokens 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import numpy as np
import torch
from report import save  # benchmarks/report.py

from moe.checkpoint.tiny import default_model_dir
from moe.guided import GrammarTokenizer, allowed_tokens, json_grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}


def run_llguidance(hf_tok, vocab: int, tokens: int, rng) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.hf

    llt = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)  # once per process, not timed
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    m = llguidance.LLMatcher(llt, grammar)
    compile_s = time.perf_counter() - t0
    mask = np.zeros((vocab + 31) // 32, dtype=np.int32)
    steps = []
    for _ in range(tokens):
        t = time.perf_counter()
        m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        ok = allowed_tokens(mask, vocab)
        tok = int(rng.choice(ok))
        m.consume_token(tok)
        steps.append(time.perf_counter() - t)
        if m.is_stopped():
            break
    return compile_s, steps


def run_raymix(hf_tok, vocab: int, tokens: int, rng, budget: int | None = None) -> tuple[float, list[float]]:
    """raymix's own per-token path: llguidance's mask and advance (the `llguidance` row) plus
    the work that makes the output close within max_tokens (the closing path's length after
    every token, and near the budget the check of the sampled token). max_tokens = --tokens,
    so with this schema the budget is watched for most of the answer: the worst case; with
    `budget` (a default-sized max_tokens) the common case."""
    budget = budget or tokens
    gt = _grammar_tokenizer(vocab, hf_tok.eos_token_id)
    t0 = time.perf_counter()
    m = gt.matcher(json_grammar(SCHEMA), budget)
    compile_s = time.perf_counter() - t0
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    steps = []
    for _ in range(tokens):
        t = time.perf_counter()
        m.fill_bitmask(mask)
        tok = int(rng.choice(allowed_tokens(mask.numpy(), vocab)))
        tok = m.fit_budget(tok, list)
        m.advance(tok)
        steps.append(time.perf_counter() - t)
        if m.done:
            break
    return compile_s, steps


@functools.cache
def _grammar_tokenizer(vocab: int, eos: int) -> GrammarTokenizer:
    """raymix's llguidance vocabulary, built once per process (not timed)."""
    return GrammarTokenizer(default_model_dir(), vocab, eos)


def run_xgrammar(hf_tok, vocab: int, tokens: int, rng) -> tuple[float, list[float]]:
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab))
    t0 = time.perf_counter()  # the tokenizer info above is built once per process, not timed
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    m = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    steps = []
    for _ in range(tokens):
        t = time.perf_counter()
        m.fill_next_token_bitmask(bitmask)
        ok = allowed_tokens(bitmask[0].numpy(), vocab)
        tok = int(rng.choice(ok))
        m.accept_token(tok)
        steps.append(time.perf_counter() - t)
        if m.is_terminated():
            break
    return compile_s, steps


def run_outlines(hf_tok, vocab: int, tokens: int, rng) -> tuple[float, list[float]]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    pieces: dict[str, list[int]] = {}
    for tid in range(vocab):
        if tid == hf_tok.eos_token_id or tid in hf_tok.all_special_ids:
            continue
        text = hf_tok.convert_ids_to_tokens(tid)
        if text.startswith("<0x") and len(text) == 6:
            continue  # byte-fallback pieces: outlines-core wants whole strings
        pieces.setdefault(text.replace("\u2581", " "), []).append(tid)
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), Vocabulary(hf_tok.eos_token_id, pieces))
    guide = Guide(index)
    compile_s = time.perf_counter() - t0
    steps = []
    for _ in range(tokens):
        t = time.perf_counter()
        ok = [x for x in guide.get_tokens() if x != hf_tok.eos_token_id] or [hf_tok.eos_token_id]
        tok = int(rng.choice(ok))
        if tok == hf_tok.eos_token_id:
            break
        guide.advance(tok)
        steps.append(time.perf_counter() - t)
        if guide.is_finished():
            break
    return compile_s, steps


def engine_decode_step(model_dir) -> float:
    from moe.engine.llm_engine import EngineConfig, LLMEngine
    from moe.sampling import SamplingParams

    eng = LLMEngine.from_pretrained(model_dir, EngineConfig(max_model_len=256))
    eng.add_request(
        "r", eng.tokenizer.encode("time one decode step"), SamplingParams(max_tokens=40, ignore_eos=True)
    )
    eng.step()
    times = []
    while eng.has_unfinished():
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    model_dir = default_model_dir()
    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = len(hf_tok)
    step = engine_decode_step(model_dir)
    print(f"engine decode step (embedded model, 1 sequence): {step * 1e3:.2f} ms")
    results = {}
    for name, fn in [
        ("llguidance", run_llguidance),
        ("raymix (llguidance + closing), max_tokens = --tokens", run_raymix),
        ("raymix (llguidance + closing), max_tokens 4096", functools.partial(run_raymix, budget=4096)),
        ("xgrammar", run_xgrammar),
        ("outlines-core", run_outlines),
    ]:
        try:
            __import__(
                {"outlines-core": "outlines_core"}.get(name, name.split(" ")[0].replace("raymix", "moe"))
            )
        except ImportError:
            print(f"{name}: not installed, skipped")
            continue
        compiles, per_token = [], []
        for r in range(args.runs):
            c, steps = fn(hf_tok, vocab, args.tokens, np.random.default_rng(r))
            compiles.append(c)
            per_token.append(statistics.median(steps))
            print(
                f"  {name} run {r + 1}/{args.runs}: compile {c * 1e3:.1f} ms, {len(steps)} tokens", flush=True
            )
        results[name] = {
            "compile_ms": statistics.median(compiles) * 1e3,
            "per_token_ms": statistics.median(per_token) * 1e3,
            "per_token_vs_decode_step": statistics.median(per_token) / step,
        }
        print(
            f"{name}: compile {results[name]['compile_ms']:.1f} ms, per token "
            f"{results[name]['per_token_ms']:.3f} ms ({results[name]['per_token_vs_decode_step']:.1%} of a decode step)"
        )
    save(
        "guided_bench",
        {"decode_step_ms": step * 1e3, "vocab": vocab, "tokens": args.tokens, "results": results},
        {"per-token ms": {i: r["per_token_ms"] for i, r in enumerate(results.values())}},
        title="constrained decoding per-token overhead: "
        + ", ".join(f"{i}={n}" for i, n in enumerate(results)),
        xlabel="library",
        ylabel="ms per token",
    )


if __name__ == "__main__":
    main()
