"""Decode throughput against the memory-bandwidth limit: the in-process engine and transformers.

A decode step must read the weights it uses once: per layer the attention projections, the gate
and the distinct experts the batch's tokens hit (E·(1−(1−k/E)^B) expected for B tokens routed
top-k of E), and the LM head. That many bytes divided by the device's measured copy bandwidth
is the fastest a step can be; the limit in tok/s is B over that time. Each engine is reported
as a fraction of it (KV-cache reads are left out: at these context lengths they are small).

By default a checkpoint with Mixtral 8x7B's layer shapes (hidden 4096, intermediate 14336,
32 query / 8 KV heads, 8 experts, top-2, vocab 32768) and --layers layers, bf16 random
weights, is written once under --cache. Decode tok/s is timed after every sequence's prefill
(the steps that sample tokens 2..N); transformers' by generate(N) minus generate(1). Median of
--runs; figures printed, written to JSON and plotted to PNG.

With --expert-shards N the same engine also runs as the router does in the cluster: its experts
in N shard processes (moe.expert_parallel.local_shards, which says how they map to GPUs; no Ray, no HTTP: those
are serve_bench's), reached over the data plane: its default dispatch for the device (each
shard gets the whole layer batch on CUDA, only its tokens on CPU), the other one, and the
default with the two-micro-batch overlap.

    .venv/bin/python benchmarks/gpu_bench.py                          # on the GPU
    .venv/bin/python benchmarks/gpu_bench.py --expert-shards 2        # + the data plane
    .venv/bin/python benchmarks/gpu_bench.py --attention flex sdpa --prompt-tokens 2000  # long contexts
    .venv/bin/python benchmarks/gpu_bench.py --quantization fp8       # + FP8 weights, vs FP8's limit
    .venv/bin/python benchmarks/gpu_bench.py --device cpu --hidden-size 512 --intermediate-size 1024
    .venv/bin/python benchmarks/gpu_bench.py --no-engine --quantization fp8 --tag fp8   # FP8 rows alone

The checkpoint is written to a temporary directory and renamed when complete, so a run cut off
while writing leaves nothing a rerun would take for a checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from report import median_of, save  # benchmarks/report.py

from moe.checkpoint.reader import CheckpointReader
from moe.checkpoint.tiny import make_tiny
from moe.config import ModelConfig
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.expert_parallel.backend import InProcessExperts
from moe.expert_parallel.local_shards import LocalShards
from moe.expert_parallel.remote import RemoteExperts
from moe.layers.fp8 import Fp8Tensor
from moe.layers.weights import Linear
from moe.models.transformer import DenseModel
from moe.sampling import SamplingParams
from moe.tokenizer import load_tokenizer

MIXTRAL_8X7B_LAYER = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, nbytes: int, runs: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read + write), median of `runs`."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(runs):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times)


def step_bytes(cfg: ModelConfig, batch: int, elem: int, fp8: bool = False) -> float:
    """Expected weight bytes one decode step of `batch` sequences reads (fp8: the attention
    projections and experts one byte a weight and a float32 scale a row; gates and LM head at elem)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.attn_head_dim
    rows = d * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + h  # q, k, v; o
    w, scale = (1, 4) if fp8 else (elem, 0)
    attn = w * h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + scale * rows
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    experts_hit = e * (1 - (1 - k / e) ** batch)
    layer = attn + elem * h * e + experts_hit * (w * 3 * h * i + scale * (2 * i + h))
    return cfg.num_hidden_layers * layer + elem * cfg.vocab_size * h


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [[1, *torch.randint(100, vocab, (length - 1,), generator=g).tolist()] for _ in range(n)]


def engine_decode_tok_s(eng: LLMEngine, batch: list[list[int]], n: int, device: torch.device) -> float:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for k, p in enumerate(batch):
        eng.add_request(f"b{k}", p, params)
    while any(s.num_output_tokens == 0 for s in eng.seqs.values()):  # prefill: token 1 of each
        eng.step()
    sync(device)
    t = time.perf_counter()
    done = sum(s.num_output_tokens for s in eng.seqs.values())
    while eng.has_unfinished():
        eng.step()
    sync(device)
    return (len(batch) * n - done) / (time.perf_counter() - t)


def hf_decode_tok_s(hf, batch: list[list[int]], n: int, device: torch.device) -> float:
    ids = torch.tensor(batch, device=device)  # prompts of one length: no padding

    def generate(tokens: int) -> float:
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=2,
            )
        sync(device)
        return time.perf_counter() - t

    return len(batch) * (n - 1) / max(generate(n) - generate(1), 1e-9)


def sharded_engine(model: Path, experts: RemoteExperts, config: EngineConfig) -> LLMEngine:
    cfg = ModelConfig.from_pretrained(model)
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    dense = DenseModel.from_checkpoint(CheckpointReader(model), cfg, dtype, device)
    return LLMEngine(cfg, dense, experts, config, load_tokenizer(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: write a random one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=None, help="default: Mixtral 8x7B's")
    ap.add_argument("--intermediate-size", type=int, default=None, help="default: Mixtral 8x7B's")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens per sequence")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", default="/tmp/raymix-gpu-bench", help="where the random checkpoint is written")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-engine", action="store_true", help="skip the bf16 engine's rows (the others only)")
    ap.add_argument("--tag", default="", help="results file gpu_bench_DEVICE[_TAG].json / .png")
    ap.add_argument("--expert-shards", type=int, default=0, help="also the engine over N shard processes")
    ap.add_argument(
        "--attention",
        nargs="+",
        default=["auto"],
        choices=["auto", "flex", "sdpa"],
        help="decode attention of the in-process engine, one row each (auto: flex on CUDA, sdpa on CPU)",
    )
    ap.add_argument(
        "--quantization",
        choices=["fp8"],
        default=None,
        help="also the engine with FP8 weights (quantized at load), against the limit of FP8's bytes",
    )
    args = ap.parse_args()
    device = torch.device(args.device)

    if args.model:
        model = Path(args.model)
    else:
        shape = dict(MIXTRAL_8X7B_LAYER, num_hidden_layers=args.layers, torch_dtype=args.dtype)
        if args.hidden_size:
            shape |= {"hidden_size": args.hidden_size, "num_attention_heads": max(1, args.hidden_size // 128)}
            shape["num_key_value_heads"] = max(1, shape["num_attention_heads"] // 4)
        if args.intermediate_size:
            shape["intermediate_size"] = args.intermediate_size
        model = Path(args.cache) / "-".join(f"{v}" for v in shape.values())
        if not (model / "config.json").is_file():
            print(f"writing a random checkpoint {shape} to {model} ...", flush=True)
            partial = model.with_name(model.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            make_tiny(partial, max_position_embeddings=4096, **shape)
            partial.rename(model)  # complete: only now does a rerun find it
    cfg = ModelConfig.from_pretrained(model)
    dtype = getattr(torch, args.dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    bw = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**28)
    print(
        f"{model}: hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, {cfg.num_hidden_layers} "
        f"layers, {args.dtype} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}"
        f"{torch.get_num_threads()} CPU threads); copy bandwidth {bw / 1e9:.0f} GB/s",
        flush=True,
    )
    limit = {b: b / (step_bytes(cfg, b, elem) / bw) for b in args.streams}
    results: dict[str, dict[int, float]] = {"bandwidth limit": limit}
    fp8_limit = {b: b / (step_bytes(cfg, b, elem, fp8=True) / bw) for b in args.streams}
    if args.quantization:
        results["bandwidth limit, fp8"] = fp8_limit
    max_len = args.prompt_tokens + args.tokens + 8

    def config(**extra) -> EngineConfig:
        return EngineConfig(
            device=args.device,
            dtype=args.dtype,
            max_num_seqs=max(args.streams),
            max_model_len=max_len,
            num_kv_blocks=max(args.streams) * (-(-max_len // 16)) + 8,
            **extra,
        )

    def measure(name: str, eng: LLMEngine) -> None:
        engine_decode_tok_s(eng, prompts(2, args.prompt_tokens, cfg.vocab_size), 4, device)  # warm-up
        results[name] = {}
        for b in args.streams:
            batch = prompts(b, args.prompt_tokens, cfg.vocab_size)
            results[name][b] = median_of(
                args.runs,
                lambda batch=batch, eng=eng: engine_decode_tok_s(eng, batch, args.tokens, device),
                f"{name} x{b}",
            )

    for attention in [] if args.no_engine else args.attention:
        name = "raymix engine" if len(args.attention) == 1 else f"raymix engine, {attention} attention"
        measure(name, LLMEngine.from_pretrained(model, config(attention_backend=attention)))
    if args.quantization:
        eng = LLMEngine.from_pretrained(model, config(quantization=args.quantization))
        fp8 = [m for m in eng.model.modules() if isinstance(m, Linear) and isinstance(m.held, Fp8Tensor)]
        w8a8 = [m.w8a8 for m in fp8]
        experts = eng.experts.shards[0] if isinstance(eng.experts, InProcessExperts) else None
        print(f"fp8: linears W8A8 {all(w8a8)}, experts W8A8 {experts.w8a8 if experts else None}", flush=True)
        measure("raymix engine, fp8", eng)
        del eng
    if args.expert_shards:
        threads = max(1, (os.cpu_count() or 2) // (args.expert_shards + 1))
        shards = LocalShards(
            model, args.expert_shards, device, args.dtype, threads, timeout=datetime.timedelta(seconds=300)
        )
        try:
            print(f"{args.expert_shards} expert shards over {shards.backends}", flush=True)
            n, default = args.expert_shards, shards.experts.whole_batch
            for whole, overlap in ((default, False), (not default, False), (default, True)):
                shards.experts.whole_batch = whole  # every shard gets the whole batch, or only its tokens
                name = f"{n} shards, {'whole batch' if whole else 'sparse'}{', overlap' if overlap else ''}"
                measure(name, sharded_engine(model, shards.experts, config(overlap=overlap)))
            shards.experts.whole_batch = default
        finally:
            shards.close()
    if not args.no_transformers:
        from transformers import MixtralForCausalLM

        hf = MixtralForCausalLM.from_pretrained(str(model), dtype=dtype).to(device).eval()
        results["transformers generate"] = {}
        for b in args.streams:
            batch = prompts(b, args.prompt_tokens, cfg.vocab_size)
            results["transformers generate"][b] = median_of(
                args.runs,
                lambda batch=batch: hf_decode_tok_s(hf, batch, args.tokens, device),
                f"transformers x{b}",
            )
    print(
        f"\ndecode tok/s, {args.tokens} greedy tokens per sequence, median of {args.runs}; (fraction of the limit)"
    )
    names = [n for n in results if not n.startswith("bandwidth limit")]

    def limit_of(name: str) -> dict[int, float]:  # an FP8 row reads FP8's bytes
        return fp8_limit if name.endswith("fp8") else limit

    print(f"{'streams':>8} {'limit':>9} " + " ".join(f"{n:>28}" for n in names))
    for b in args.streams:
        cells = " ".join(f"{results[n][b]:>18.1f} ({results[n][b] / limit_of(n)[b]:.2f})" for n in names)
        print(f"{b:>8} {limit[b]:>9.0f} {cells}")
    if "transformers generate" in results:
        ours = results[names[0]]
        ratios = ", ".join(f"{b}: {ours[b] / results['transformers generate'][b]:.2f}x" for b in args.streams)
        print(f"{names[0]} / transformers: {ratios}")
    save(
        f"gpu_bench_{device.type}{'_' + args.tag if args.tag else ''}",
        {
            "model": str(model),
            "device": str(device),
            "dtype": args.dtype,
            "copy_bandwidth_bytes_per_s": bw,
            "expert_shards": args.expert_shards,
            "tokens": args.tokens,
            "tok_s": results,
            "fraction_of_limit": {
                n: {b: results[n][b] / limit_of(n)[b] for b in args.streams} for n in names
            },
        },
        results,
        xscale="log",
        yscale="log",
        xlabel="concurrent streams",
        ylabel="decode tok/s",
        title=f"Decode vs the bandwidth limit ({device.type}, {args.dtype})",
    )


if __name__ == "__main__":
    main()
