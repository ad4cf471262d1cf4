"""Where a decode step of the in-process engine goes, part by part (ms per step, median).

Runs --streams sequences to --tokens tokens each (temperature 0.8, a seed per request, as the
peer benchmark's load) and times every decode step and, inside it, each part by wrapping it:
the experts (the MoE backend), the LM head, the linear projections (q/k/v/o, the gates, dense
MLPs and shared experts),
attention (cache write, gather, SDPA), the sampler; the rest of the step (norms, rotary,
routing, residuals, host work) is what is left. On the CPU every op is synchronous, so wall
time per call is the part's. With --threads 1 2 it repeats at each torch thread count.

    .venv/bin/python benchmarks/step_profile.py [--model DIR] [--streams 32] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from report import save  # benchmarks/report.py

import moe.layers.attention
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.layers.weights import Linear
from moe.models.transformer import MoE
from moe.sampling import SamplingParams

PARTS = ["experts", "LM head", "projections", "attention", "sampler", "rest"]


class Timer:
    def __init__(self) -> None:
        self.step: dict[str, float] = defaultdict(float)

    def wrap(self, part: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                self.step[part] += time.perf_counter() - start

        return timed

    def hook(self, part: str, module: torch.nn.Module) -> None:
        starts: list[float] = []
        module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        module.register_forward_hook(
            lambda *_: self.step.__setitem__(part, self.step[part] + time.perf_counter() - starts.pop())
        )


class TimedSampler:
    """The engine's sampler, both ways of sampling timed (async scheduling's sample_ids too)."""

    def __init__(self, sampler: Any, timer: Timer):
        self.call = timer.wrap("sampler", sampler.__call__)
        self.sample_ids = timer.wrap("sampler", sampler.sample_ids)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.call(*args, **kw)


def profile(model: Path, streams: int, tokens: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    eng = LLMEngine.from_pretrained(model, EngineConfig(max_num_seqs=streams, max_model_len=512))
    timer = Timer()
    eng.experts.forward = timer.wrap("experts", eng.experts.forward)  # type: ignore[method-assign]
    eng.model.compute_logits = timer.wrap("LM head", eng.model.compute_logits)  # type: ignore[method-assign]
    for layer in eng.model.layers:
        mlp = layer.mlp  # MoE: its gate and shared expert are the router's; MLP: a dense layer's
        # the attention's projections: q/k/v and o, or MLA's down- and up-projections (its
        # absorbed kv_b_proj is read by einsums, counted in the rest)
        mods = [m for m in layer.self_attn.children() if isinstance(m, torch.nn.Linear | Linear)]
        local = mlp.shared_expert if isinstance(mlp, MoE) else mlp
        mods += [mlp.gate] if isinstance(mlp, MoE) else []
        mods += [local.gate_up_proj, local.down_proj] if local is not None else []
        for m in mods:
            timer.hook("projections", m)
    moe.layers.attention.paged_attention = timer.wrap("attention", moe.layers.attention.paged_attention)
    eng.sampler = TimedSampler(eng.sampler, timer)  # type: ignore[assignment]
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "experts", "routed", "every", "token", "to"]
    prompts = [eng.tokenizer.encode(" ".join(words[: 4 + i % 8])) for i in range(streams)]
    for i, p in enumerate(prompts):
        eng.add_request(
            f"r{i}", p, SamplingParams(max_tokens=tokens, temperature=0.8, seed=i, ignore_eos=True)
        )
    steps: list[dict[str, float]] = []
    while eng.has_unfinished():
        timer.step.clear()
        decode = all(s.num_computed + 1 == len(s) for s in eng.seqs.values())
        start = time.perf_counter()
        eng.step()
        total = time.perf_counter() - start
        if decode and len(eng.seqs) == streams:  # decode steps of the full batch only
            parts = {k: timer.step.get(k, 0.0) for k in PARTS[:-1]}
            parts["rest"] = total - sum(parts.values())
            parts["step"] = total
            steps.append(parts)
    return {k: 1e3 * statistics.median(s[k] for s in steps) for k in [*PARTS, "step"]} | {
        "tok/s": streams / statistics.median(s["step"] for s in steps)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/raymix-peer-bench/medium")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--name", default="step_profile")
    args = ap.parse_args()
    results = {t: profile(Path(args.model), args.streams, args.tokens, t) for t in args.threads}
    print(f"\nms per decode step of {args.streams} sequences (median), {args.model}")
    print(f"{'part':<12}" + "".join(f"{f'{t} thread' + ('s' if t > 1 else ''):>12}" for t in args.threads))
    for part in [*PARTS, "step", "tok/s"]:
        print(f"{part:<12}" + "".join(f"{results[t][part]:>12.1f}" for t in args.threads))
    save(
        args.name,
        {"model": args.model, "streams": args.streams, "ms_per_step": results},
        {f"{t} threads": {i: results[t][p] for i, p in enumerate(PARTS)} for t in args.threads},
        xlabel="part: " + ", ".join(f"{i} {p}" for i, p in enumerate(PARTS)),
        ylabel="ms per step",
        title="Decode step by part",
    )


if __name__ == "__main__":
    main()
