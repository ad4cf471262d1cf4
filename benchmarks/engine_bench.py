"""In-process engine throughput vs transformers `generate` on the same checkpoint.

Output tokens per second of the engine (all experts in this process) at 1, 8 and 32 concurrent
sequences, against transformers' `generate` (MixtralForCausalLM, or MistralForCausalLM for a
dense checkpoint) one request at a time and as a static batch. Median of --runs runs; figures
are printed, written to JSON and plotted to PNG. Compare the ratios of one run: this machine is
noisy. An FP8 checkpoint (or --quantization fp8) is timed without transformers, which cannot
run FP8 weights in float32; the weights' bytes are printed with the figures.

    .venv/bin/python benchmarks/engine_bench.py [--model DIR] [--tokens 64] [--runs 3]
        [--quantization fp8] [--no-transformers] [--name engine_bench]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import torch
from report import median_of, save  # benchmarks/report.py

from moe.checkpoint.quantization import QuantizationConfig
from moe.checkpoint.tiny import default_model_dir
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.expert_parallel.backend import InProcessExperts
from moe.sampling import SamplingParams


def prompts(tok, n: int) -> list[list[int]]:
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "experts",
        "routed",
        "every",
        "token",
        "to",
        "two",
        "of",
        "eight",
    ]
    return [tok.encode(" ".join(words[: 4 + (i * 5) % len(words)])) for i in range(n)]


def engine_tok_s(eng: LLMEngine, batch: list[list[int]], n: int) -> float:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    seqs = eng.generate(batch, params)
    return sum(s.num_output_tokens for s in seqs) / (time.perf_counter() - t)


def hf_tok_s(hf, batch: list[list[int]], n: int, pad_id: int) -> float:
    width = max(map(len, batch))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    t = time.perf_counter()
    with torch.inference_mode():
        hf.generate(
            ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id
        )
    return len(batch) * n / (time.perf_counter() - t)


def host_breakdown(
    model: Path, streams: int, tokens: int, queued: bool = False, **engine: Any
) -> dict[str, float]:
    """ms per decode step of `streams` sequences by part, median over the decode steps: the
    host's work (scheduling, the step's input ids and metadata, sampling, turning tokens into
    outputs) apart from the model's forward and logits, the device's work on a GPU. On a GPU,
    without async scheduling all of the host's work runs in series with the device's (the
    device waits while the host reads the samples, processes outputs and prepares the next
    step); with it, only what the host does between queuing a step and queuing the next is
    behind nothing (the outputs of the last step run while this one computes): the target for
    the host's work per step is <= 1 ms, and 'serial' is what the device waits for. Sampling
    (an argmax over [streams, V]) is the device's work on a GPU, counted apart.
    queued: the forward replaced by returning fixed tensors of its shapes, as on a GPU where
    the host only queues it (a graph replay): the host's work alone, its caches not flushed by
    a forward computed on the same cores."""
    import statistics
    from collections import defaultdict

    config = EngineConfig(max_num_seqs=streams, max_model_len=128, **engine)
    eng = LLMEngine.from_pretrained(model, config)
    spent: dict[str, float] = defaultdict(float)

    def timed(part: str, f: Any) -> Any:
        def run(*args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                spent[part] += time.perf_counter() - start

        return run

    if queued:
        hidden = torch.zeros(config.max_num_batched_tokens, eng.cfg.hidden_size)  # [T, H], any step
        logits = torch.randn(streams, eng.cfg.vocab_size, generator=torch.Generator().manual_seed(0))
        eng.model.forward = lambda inputs, kv, experts: [hidden[: len(ids)] for ids, _ in inputs]  # type: ignore[method-assign]
        eng.model.compute_logits = lambda h: logits[: len(h)]  # type: ignore[method-assign]
    eng.scheduler.schedule = timed("schedule", eng.scheduler.schedule)  # type: ignore[method-assign]
    eng.model.forward = timed("forward", eng.model.forward)  # type: ignore[method-assign]
    eng.model.compute_logits = timed("forward", eng.model.compute_logits)  # type: ignore[method-assign]
    eng.runner._input_ids = timed("inputs", eng.runner._input_ids)  # type: ignore[method-assign]
    eng.runner._metadata = timed("inputs", eng.runner._metadata)  # type: ignore[method-assign]
    if eng.decode is not None:
        for lane in eng.decode.lanes:
            lane.fill = timed("inputs", lane.fill)  # type: ignore[method-assign]
    sampler = eng.sampler

    class TimedSampler:  # both ways of sampling, timed
        __call__ = staticmethod(timed("sample", sampler))
        sample_ids = staticmethod(timed("sample", sampler.sample_ids))

    eng.sampler = TimedSampler()  # type: ignore[assignment]
    eng._postprocess = timed("outputs", eng._postprocess)  # type: ignore[method-assign]
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "experts", "routed", "every", "token"]
    for i in range(streams):
        prompt = eng.tokenizer.encode(" ".join(words[: 3 + i % 8]))
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    steps = []
    while eng.has_unfinished():
        spent.clear()
        decode = all(s.num_computed + 1 == len(s) for s in eng.seqs.values())
        start = time.perf_counter()
        eng.step()
        total = time.perf_counter() - start
        if decode and len(eng.seqs) == streams:
            parts = {k: spent.get(k, 0.0) for k in ("schedule", "inputs", "sample", "outputs", "forward")}
            parts["the rest"] = total - sum(parts.values())
            parts["host"] = total - parts["forward"] - parts["sample"]
            # async: the outputs (of the last step) run behind this step's forward on a GPU
            parts["serial"] = parts["host"] - (parts["outputs"] if config.async_scheduling else 0.0)
            steps.append(parts)
    return {k: 1e3 * statistics.median(s[k] for s in steps) for k in steps[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per sequence")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--quantization", choices=["fp8"], default=None, help="quantize the weights at load")
    ap.add_argument("--no-transformers", action="store_true", help="time the engine alone")
    ap.add_argument("--name", default="engine_bench", help="results file name (benchmarks/results/NAME.*)")
    ap.add_argument(
        "--host", type=int, default=0, metavar="STREAMS", help="only the host time per decode step at STREAMS"
    )
    args = ap.parse_args()
    model = Path(args.model) if args.model else default_model_dir()
    if args.host:
        for label, kw in (
            ("general path (the CPU's default), async scheduling off", {"async_scheduling": False}),
            ("general path (the CPU's default), async scheduling on", {"async_scheduling": True}),
            (
                "padded decode step, FlexAttention (a GPU's path, uncaptured), async scheduling on",
                {"cuda_graphs": True, "attention_backend": "flex", "async_scheduling": True},
            ),
            (
                "padded decode step, FlexAttention, forward queued (the host alone), async scheduling off",
                {"cuda_graphs": True, "attention_backend": "flex", "async_scheduling": False, "queued": True},
            ),
            (
                "padded decode step, FlexAttention, forward queued (the host alone), async scheduling on",
                {"cuda_graphs": True, "attention_backend": "flex", "async_scheduling": True, "queued": True},
            ),
        ):
            parts = host_breakdown(model, args.host, 8 if not kw.get("queued") else 64, **kw)
            print(f"{label}: ms per decode step of {args.host}, median")
            for part, ms in parts.items():
                print(f"  {part:<22} {ms:7.2f}")
        return
    print(
        f"model {model}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}"
    )
    config = EngineConfig(max_num_seqs=max(args.concurrency), quantization=args.quantization)
    eng = LLMEngine.from_pretrained(model, config)
    assert isinstance(eng.experts, InProcessExperts)
    weights = eng.model.nbytes() + sum(s.nbytes() for s in eng.experts.shards)
    quant = QuantizationConfig.from_pretrained(model, args.quantization)
    print(f"weights held: {weights / 1e6:.1f} MB ({quant.describe() if quant else eng.model.dtype})")
    pad = eng.tokenizer.eos_token_id
    engine_tok_s(eng, prompts(eng.tokenizer, 2), 4)  # warm-up
    results: dict[str, dict[int, float]] = {"raymix engine": {}}
    hf = None
    if not (args.no_transformers or quant):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
        results["transformers static batch"] = {}
    for c in args.concurrency:
        batch = prompts(eng.tokenizer, c)
        results["raymix engine"][c] = median_of(
            args.runs, lambda b=batch: engine_tok_s(eng, b, args.tokens), f"engine x{c}"
        )
        if hf is not None:
            results["transformers static batch"][c] = median_of(
                args.runs, lambda b=batch: hf_tok_s(hf, b, args.tokens, pad), f"transformers batch {c}"
            )
    print(f"\noutput tok/s, {args.tokens} tokens per sequence, median of {args.runs} runs")
    if hf is None:
        for c in args.concurrency:
            print(f"{c:>12} {results['raymix engine'][c]:>10.1f}")
        title = f"In-process engine ({quant.describe() if quant else eng.model.dtype})"
    else:
        print(f"{'concurrency':>12} {'engine':>10} {'hf static':>10} {'ratio':>7}")
        for c in args.concurrency:
            e, h = results["raymix engine"][c], results["transformers static batch"][c]
            print(f"{c:>12} {e:>10.1f} {h:>10.1f} {e / h:>6.2f}x")
        print(
            f"engine at {args.concurrency[-1]} vs transformers one at a time: "
            f"{results['raymix engine'][args.concurrency[-1]] / results['transformers static batch'][1]:.2f}x"
        )
        title = "In-process engine vs transformers"
    save(
        args.name,
        {"model": str(model), "tokens": args.tokens, "weight_bytes": weights, "results": results},
        results,
        xscale="log",
        xlabel="concurrent sequences",
        ylabel="output tok/s",
        title=title,
    )


if __name__ == "__main__":
    main()
