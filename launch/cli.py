"""The `raymix` command line. The flags of `serve` are generated from RaymixSettings, so the
CLI, environment variables and YAML files can never drift apart.

    raymix serve [--model DIR] [--expert-shards N] [--port 8000] [--config raymix.yaml] ...
    raymix make-tiny DIR [--seed 0] [--tokenizer v3|v1] [--num-files 1]
    raymix generate [--model DIR] --prompt "..." [--max-tokens 64]   (one process, no Ray)
    raymix scale --expert-shards N [--address auto]   (resize a running deployment)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import typing
from typing import Any

from pydantic import ValidationError

from cluster.config import RaymixSettings
from moe.errors import CheckpointError
from moe.layers.cpu_gemm import CpuGemmError, kernel_for


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in RaymixSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        help_ = f"{field.description} (env RAYMIX_{name.upper()})"
        origin, args = typing.get_origin(ann), typing.get_args(ann)
        if ann is bool or ann == (bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif origin is list or (origin is typing.Annotated and typing.get_origin(args[0]) is list):
            parser.add_argument(flag, action="append", default=None, help=help_ + "; repeatable")
        elif origin is typing.Literal:
            parser.add_argument(flag, choices=list(args), default=None, help=help_)
        else:
            inner = [a for a in args if a is not type(None)] or [ann]
            kind = inner[0] if inner[0] in (int, float) else str
            parser.add_argument(flag, type=kind, default=None, help=help_)
    parser.add_argument("--config", default=None, help="YAML file of settings (keys as the flag names)")


def settings_from(ns: argparse.Namespace) -> RaymixSettings:
    cli = {k: v for k, v in vars(ns).items() if k in RaymixSettings.model_fields}
    return RaymixSettings.load(cli, ns.config)


def cmd_serve(ns: argparse.Namespace) -> int:
    from cluster.placement import expert_shards
    from moe.checkpoint.reader import open_checkpoint
    from moe.engine.llm_engine import pick_device, pick_dtype

    s = settings_from(ns)
    cfg, quant, _ = open_checkpoint(s.model_dir(), s.quantization)  # refused here, before Ray starts
    if s.cpu_gemm == "onednn" and not s.address:  # this machine is the cluster: its CPU decides now
        device = pick_device("auto")
        kernel_for(s.cpu_gemm, device, pick_dtype(s.dtype, cfg, device))  # CpuGemmError if it cannot
    from launch import bringup

    if getattr(ns, "api_key", None) or getattr(ns, "admin_api_key", None):
        print(
            "raymix: warning: a key given on the command line is visible to every user of this machine "
            "(ps, shell history); prefer RAYMIX_API_KEY or --api-key-file",
            file=sys.stderr,
        )
    if not s.address and not os.environ.get(bringup.SUPERVISED):  # an embedded Ray: see bringup
        return bringup.supervise(sys.argv[1:] if ns.argv is None else ns.argv)

    shards = expert_shards(s, cfg)
    alone = "its experts in it" if cfg.is_moe else "a dense model"
    routers = "router" if s.routers == 1 else f"{s.routers} routers"
    what = f"{shards} expert shards + {routers}" if shards else f"the {routers} ({alone}: no expert shards)"
    served = f", {quant.describe()}" if quant else ""
    print(f"raymix: starting {what} + ingress for {s.model_dir()}{served} ...", flush=True)
    t = time.monotonic()
    bringup.init_ray(s)
    stop = False

    def on_signal(*_: Any) -> None:
        nonlocal stop
        stop = True

    # after ray.init, whose core worker installs its own SIGTERM handler (a crash report and
    # death), and before the deployment is up: a signal from then on is a request to drain
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        url = bringup.deploy(s)
    except bringup.StartupError as e:  # a replica's own error, not Ray's traceback
        print(f"raymix: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"raymix: serving {', '.join(s.model_names())} at {url}/v1 (ready in {time.monotonic() - t:.0f}s)")
    print(f"try:\n  {bringup.curl_example(s, url)}")
    print(f"or open {url}/ in a browser (chat playground and expert view)", flush=True)
    while not stop:
        time.sleep(0.5)
    print(f"raymix: shutting down (draining requests in flight for up to {s.drain_timeout_s:g}s)", flush=True)
    t = time.monotonic()
    bringup.shutdown(s.drain_timeout_s, s.routers)
    print(f"raymix: stopped in {time.monotonic() - t:.1f}s", flush=True)
    return 0


def cmd_make_tiny(ns: argparse.Namespace) -> int:
    from moe.checkpoint.tiny import make_tiny
    from moe.checkpoint.tiny_families import make_tiny_family

    flags = (
        ("hidden_size", ns.hidden_size),
        ("intermediate_size", ns.intermediate_size),
        ("num_hidden_layers", ns.num_layers),
        ("sliding_window", ns.sliding_window),
        ("num_attention_heads", ns.num_heads),
        ("num_key_value_heads", ns.num_kv_heads),
        ("head_dim", ns.head_dim),
    )
    sizes = {k: v for k, v in flags if v is not None}
    if ns.model_type in ("mixtral", "mistral"):
        experts = {"num_local_experts": ns.num_experts, "num_experts_per_tok": ns.experts_per_token}
        sizes |= {k: v for k, v in experts.items() if v is not None}
        out = make_tiny(
            ns.dir,
            seed=ns.seed,
            tokenizer=ns.tokenizer,
            num_files=ns.num_files,
            model_type=ns.model_type,
            **sizes,
        )
    else:  # made by transformers itself, with a byte-level BPE tokenizer trained here
        extra = (
            ("num_experts", ns.num_experts),
            ("num_experts_per_tok", ns.experts_per_token),
            ("moe_intermediate_size", ns.moe_intermediate_size),
        )
        sizes |= {k: v for k, v in extra if v is not None}
        out = make_tiny_family(ns.dir, ns.model_type, seed=ns.seed, **sizes)
    print(f"wrote a tiny {ns.model_type} checkpoint to {out}")
    return 0


def id_ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → "0-2, 5, 7-8": a shard's experts on one line, 128 of them too."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def cmd_generate(ns: argparse.Namespace) -> int:
    from moe.checkpoint.tiny import default_model_dir
    from moe.engine.llm_engine import EngineConfig, LLMEngine
    from moe.sampling import SamplingParams

    model = ns.model or default_model_dir()
    config = EngineConfig(max_model_len=2048, quantization=ns.quantization)
    eng = LLMEngine.from_pretrained(model, config, num_shards=ns.shards)
    assert eng.tokenizer is not None
    prompt = eng.tokenizer.apply_chat_template([{"role": "user", "content": ns.prompt}])
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, seed=ns.seed)
    eng.add_request("cli", prompt, params)
    t = time.monotonic()
    n = 0
    while eng.has_unfinished():
        for out in eng.step():
            n += len(out.new_token_ids)
            print(out.new_text, end="", flush=True)
    print(f"\n[{n} tokens in {time.monotonic() - t:.2f}s]")
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    from cluster.capacity import (
        NAMED,
        best_split,
        capacity_plan,
        decode_step_seconds,
        gpus_needed,
        router_kv_tokens,
    )
    from moe.checkpoint.reader import open_checkpoint
    from moe.checkpoint.tiny import default_model_dir

    if ns.model in NAMED:
        cfg, fp8 = NAMED[ns.model], ns.quantization == "fp8"
    else:  # the checkpoint's own config and quantization, every tensor's header checked
        cfg, quant, _ = open_checkpoint(ns.model or default_model_dir(), ns.quantization)
        fp8 = quant is not None
    n = ns.expert_shards if cfg.is_moe else 0
    p = capacity_plan(cfg, n, ns.dtype_bytes, fp8)
    gb = 1e9
    weights = "fp8 weights (1 byte + a float32 scale per row)" if fp8 else f"{ns.dtype_bytes}-byte weights"
    if cfg.is_moe:
        print(
            f"{cfg.model_type}: {cfg.num_hidden_layers} layers ({cfg.num_moe_layers} with experts) x "
            f"{cfg.num_local_experts} experts (top-{cfg.num_experts_per_tok}), hidden {cfg.hidden_size}; "
            f"{n} expert shards; {weights}"
        )
    else:
        print(f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, dense: the router alone; {weights}")
    for k, (group, b) in enumerate(zip(p.expert_groups, p.shard_bytes(), strict=True)):
        print(f"  ExpertShard{k}: experts {id_ranges(group)} of every MoE layer, {b / gb:.2f} GB")
    part = "dense part" if cfg.is_moe else "whole model"
    print(
        f"  Router: {part} {p.dense_bytes / gb:.2f} GB + KV cache {p.kv_bytes_per_token / 1e3:.1f} KB per token"
    )
    if cfg.is_mla:
        heads, dk, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        expanded = cfg.num_hidden_layers * heads * (dk + dv) * ns.dtype_bytes
        print(
            f"  KV cache: MLA's latent, {cfg.kv_values_per_token} values per token and layer "
            f"(kv_lora_rank {cfg.kv_lora_rank} + qk_rope_head_dim {cfg.qk_rope_head_dim}), where "
            f"per-head K and V would take {heads} x ({dk} + {dv}): {expanded / 1e6:.2f} MB per token, "
            f"{expanded / p.kv_bytes_per_token:.0f}x more"
        )
    if cfg.is_moe:
        print(
            f"  data plane: {p.dispatch_bytes_per_token_layer / 1e3:.1f} KB per token per MoE layer (out and back)"
        )
    needed = gpus_needed(cfg, ns.gpu_memory_gb * gb, ns.dtype_bytes, fp8=fp8)
    print(f"  GPUs needed (one per shard + the router): {needed} of {ns.gpu_memory_gb:.0f} GB")
    tokens = router_kv_tokens(cfg, ns.gpu_memory_gb * gb, ns.gpu_memory_utilization, ns.dtype_bytes, fp8)
    context = cfg.max_position_embeddings
    print(
        f"  router KV cache at --gpu-memory-utilization {ns.gpu_memory_utilization}: {tokens:,} tokens, "
        f"{tokens // context} sequences of the model's {context:,}-token context"
        + ("" if tokens >= context else " (too few for one: max_model_len is lowered to fit)")
    )
    if ns.gpus and cfg.is_moe:
        splits = best_split(
            cfg,
            ns.gpus,
            gpu_bytes=ns.gpu_memory_gb * gb,
            context=ns.context,
            dtype_bytes=ns.dtype_bytes,
            fp8=fp8,
        )
        print(f"  {ns.gpus} GPUs as M routers + N shards ({ns.context}-token sequences, model, nvlink):")
        for sp in sorted(splits, key=lambda sp: sp.routers):
            best = f"  <- best: --routers {sp.routers} --expert-shards {sp.shards}" if sp is splits[0] else ""
            print(
                f"    {sp.routers}:{sp.shards}  {sp.batch} seqs/router, router step {sp.router_s * 1e3:.1f} ms, "
                f"shard round {sp.shard_s * 1e3:.1f} ms -> {sp.tok_s:,.0f} tok/s, {sp.tok_s_per_gpu:,.0f} per GPU{best}"
            )
        if not splits:
            print("    none: the experts do not fit that many shards")
    for link in ("nvlink", "infiniband-200g") if cfg.is_moe else ("nvlink",):
        for batch in (1, 64):
            r = decode_step_seconds(cfg, n, batch, link, dtype_bytes=ns.dtype_bytes, fp8=fp8)
            print(
                f"  model, {link if cfg.is_moe else 'one GPU'}, batch {batch}: step {r['step_s'] * 1e3:.1f} ms "
                f"(experts {r['experts_s'] * 1e3:.1f}, dense {r['dense_s'] * 1e3:.1f}, "
                f"dispatch {r['dispatch_s'] * 1e3:.2f}) -> {r['tok_s']:.0f} tok/s"
            )
    return 0


def cmd_k8s(ns: argparse.Namespace) -> int:
    from launch.k8s import render

    s = settings_from(ns)
    print(render(s, name=ns.name, image=ns.image, gpus_per_worker=ns.gpus_per_worker), end="")
    return 0


def cmd_scale(ns: argparse.Namespace) -> int:
    """Resize the expert shards of a running deployment (the same settings it was started with,
    `--expert-shards` the new count), without dropping requests."""
    import ray

    from launch.scale import scale

    s = settings_from(ns)
    ray.init(address=s.address or "auto", log_to_driver=False)
    result = scale(s, s.expert_shards)
    print(f"raymix: {result.expert_shards} expert shards: {result.expert_groups}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="raymix", description="Expert-parallel Mixtral serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the OpenAI API from a Ray cluster")
    add_settings_flags(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("make-tiny", help="write a tiny checkpoint (the embedded Mixtral, or another family)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", choices=["v3", "v1"], default="v3")
    p.add_argument(
        "--num-files", type=int, default=1, help="split the weights over this many safetensors files"
    )
    p.add_argument("--hidden-size", type=int, default=None, help="default 256")
    p.add_argument("--intermediate-size", type=int, default=None, help="default 512")
    p.add_argument("--num-layers", type=int, default=None, help="default 4")
    p.add_argument(
        "--model-type",
        choices=["mixtral", "mistral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "deepseek_v2"],
        default="mixtral",
        help="mistral: dense; the others: made by transformers, byte-level BPE tokenizer",
    )
    p.add_argument("--sliding-window", type=int, default=None, help="default none")
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--num-kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--experts-per-token", type=int, default=None)
    p.add_argument("--moe-intermediate-size", type=int, default=None, help="an expert's width (Qwen)")
    p.set_defaults(func=cmd_make_tiny)
    p = sub.add_parser("generate", help="generate in this process (no Ray): a quick check of a checkpoint")
    p.add_argument("--model", default=None)
    p.add_argument("--prompt", default="Tell me about mixtures of experts.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--shards", type=int, default=1, help="in-process expert shards")
    p.add_argument("--quantization", choices=["fp8"], default=None, help="quantize at load")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("plan", help="expert -> shard map, memory per shard, GPUs needed, a decode-time model")
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint dir, or mixtral-8x7b, mixtral-8x22b, qwen3-30b-a3b, qwen3-235b-a22b, deepseek-v3 (default: the tiny model)",
    )
    p.add_argument("--expert-shards", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.add_argument("--dtype-bytes", type=int, default=2, help="2 for bf16/fp16")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="as raymix serve's")
    p.add_argument(
        "--quantization", choices=["fp8"], default=None, help="count FP8 weights (a checkpoint's own is read)"
    )
    p.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="also split this many GPUs into routers and shards (--routers M)",
    )
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence in the M:N model")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("scale", help="resize a running deployment's expert shards (--expert-shards N)")
    add_settings_flags(p)
    p.set_defaults(func=cmd_scale)
    p = sub.add_parser("k8s", help="print the KubeRay RayService for these settings")
    add_settings_flags(p)
    p.add_argument("--name", default="raymix")
    p.add_argument("--image", default="raymix:0.1.0", help="an image with raymix installed (k8s/Dockerfile)")
    p.add_argument("--gpus-per-worker", type=int, default=8)
    p.set_defaults(func=cmd_k8s)
    ns = parser.parse_args(argv)
    ns.argv = argv
    try:
        return ns.func(ns)
    except ValidationError as e:
        print(f"raymix: invalid settings:\n{e}", file=sys.stderr)
        return 2
    except (CheckpointError, CpuGemmError) as e:  # one line, no traceback
        print(f"raymix: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
