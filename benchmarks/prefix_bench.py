"""Prefix caching: time to first token for requests that share a long system prompt.

Each request is a long system prompt (--system-tokens) plus its own short question, sent one
after another to the in-process engine with prefix caching on and off (the first request warms
the cache and is not counted). Prints TTFT median per setting and the ratio; JSON + PNG in
benchmarks/results/. Mistral's chat format puts the system prompt in front of the last user
message, so the shared prefix here is the system prompt of first turns.

    .venv/bin/python benchmarks/prefix_bench.py [--model DIR] [--system-tokens 1500] [--requests 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

from report import save  # benchmarks/report.py

from moe.checkpoint.tiny import default_model_dir
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.sampling import SamplingParams


def ttfts(engine: LLMEngine, prompts: list[list[int]]) -> list[float]:
    out = []
    for i, p in enumerate(prompts):
        t = time.perf_counter()
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=1, temperature=0.0))
        while engine.has_unfinished():
            engine.step()
        out.append(time.perf_counter() - t)
    return out[1:]  # the first one warms the cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--requests", type=int, default=8)
    args = ap.parse_args()
    model_dir = args.model or default_model_dir()
    results = {}
    for caching in (False, True):
        cfg = EngineConfig(max_model_len=args.system_tokens + 256, enable_prefix_caching=caching)
        eng = LLMEngine.from_pretrained(model_dir, cfg)
        tok = eng.tokenizer
        words = ("You are the support assistant of a company that sells wind instruments. " * 200).split()
        system = " ".join(words)
        while len(tok.encode(system)) > args.system_tokens:
            words = words[: int(len(words) * 0.95)]
            system = " ".join(words)
        prompts = [
            tok.apply_chat_template(
                [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Question number {i}: why?"},
                ]
            )
            for i in range(args.requests + 1)
        ]
        times = ttfts(eng, prompts)
        name = "caching on" if caching else "caching off"
        results[name] = {
            "ttft_ms_median": statistics.median(times) * 1e3,
            "prompt_tokens": len(prompts[1]),
            "hits": eng.stats().prefix_cache_hits,
            "queries": eng.stats().prefix_cache_queries,
        }
        print(
            f"{name}: TTFT median {results[name]['ttft_ms_median']:.1f} ms over {len(times)} requests "
            f"of {len(prompts[1])} prompt tokens (hits {results[name]['hits']} / {results[name]['queries']})",
            flush=True,
        )
    ratio = results["caching off"]["ttft_ms_median"] / results["caching on"]["ttft_ms_median"]
    print(f"caching on is {ratio:.1f}x faster to the first token")
    save(
        "prefix_bench",
        {"system_tokens": args.system_tokens, "results": results, "speedup": ratio},
        {
            "TTFT ms": {
                0: results["caching off"]["ttft_ms_median"],
                1: results["caching on"]["ttft_ms_median"],
            }
        },
        title="TTFT with a shared system prompt: 0 = caching off, 1 = on",
        xlabel="prefix caching",
        ylabel="ms",
    )


if __name__ == "__main__":
    main()
