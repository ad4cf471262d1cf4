"""Per-layer dispatch + combine round trip, router → expert shards → router, per transport.

For 1, 16, 64 and 256 tokens of a checkpoint (default: the embedded model), the median time of
one MoE layer's dispatch, the shards' expert compute and the combine, over:
  - the data plane raymix uses (torch.distributed gloo pair groups, moe.expert_parallel),
  - the same data plane to shards that hold no experts (the messages without the compute:
    what raymix's transport costs),
  - a plain Ray actor call per shard (ray.get of .remote() calls to actors holding the experts),
  - a Ray Serve DeploymentHandle call per shard,
plus the transport floor: a bare gloo send+recv of the layer's hidden states, no compute, to one
shard and to all the shards at once. Everything in one run, so the ratios are comparable.
Writes JSON and a PNG plot.

    .venv/bin/python benchmarks/dispatch_bench.py [--model DIR] [--shards 4] [--iters 300]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
from report import save  # benchmarks/report.py

from moe.checkpoint.reader import CheckpointReader
from moe.checkpoint.tiny import default_model_dir
from moe.config import ModelConfig
from moe.expert_parallel.placement import Placement, combine, dispatch, partition_experts
from moe.expert_parallel.remote import RemoteExperts, ShardLink
from moe.expert_parallel.rendezvous import Rendezvous, open_store
from moe.expert_parallel.server import ShardServer
from moe.layers.experts import LocalExperts, select_experts

TIMEOUT = datetime.timedelta(seconds=60)


class ShardActor:
    """One expert shard as a Ray actor (also used as a Serve deployment)."""

    def __init__(self, model_dir: str, expert_ids: list[int]):
        torch.set_num_threads(1)
        cfg = ModelConfig.from_pretrained(model_dir)
        self.experts = LocalExperts.from_checkpoint(
            CheckpointReader(model_dir), cfg, expert_ids, torch.float32
        )
        self.server: ShardServer | None = None

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.experts.forward(layer, x, ids, w)

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.forward(layer, x, ids, w)

    def connect(self, rdv: dict, empty: bool = False) -> None:
        """Serve the data plane on this rendezvous; empty: as a shard holding no experts (a
        second server beside the real one, for the transport's own cost)."""
        experts = LocalExperts.empty(self.experts.cfg, torch.float32) if empty else self.experts
        server = ShardServer(experts, Rendezvous(**rdv), TIMEOUT)
        server.connect()
        server.start()
        if not empty:
            self.server = server

    def compute_stats(self) -> tuple[float, int]:
        assert self.server is not None
        return self.server.compute_seconds, self.server.batches_served

    def echo_floor(self, rdv: dict, iters: int, n: int, hidden: int) -> None:
        """Bare transport: receive [n, H] and send it back, iters times, on its own pair group."""
        from moe.expert_parallel.rendezvous import pair_group

        store = open_store(rdv["store"], False, TIMEOUT)
        pg = pair_group(store, rdv["prefix"], 1, "gloo", TIMEOUT, "127.0.0.1")
        x = torch.empty(n, hidden)
        for _ in range(iters):
            pg.recv([x], 0, 0).wait()
            pg.send([x], 0, 0).wait()


def median_ms(f, iters: int) -> float:
    for _ in range(10):
        f()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def measure(n, cfg, remote, empty, actors, handles, placement, store, url, it) -> dict[str, float]:
    """One token count: the median round trip of every transport."""
    import ray

    out: dict[str, float] = {}
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, cfg.hidden_size, generator=g)
    w, ids = select_experts(torch.randn(n, cfg.num_local_experts, generator=g), cfg.num_experts_per_tok)

    def via_actors(call):
        parts = []
        batches = dispatch(ids, w, placement)
        outs = [call(k, x[b.token_index], b.expert_ids, b.weights) for k, b in enumerate(batches)]
        parts = [(b.token_index, y) for b, y in zip(batches, outs, strict=True)]
        return parts

    def actor_layer():
        parts = via_actors(lambda k, *a: actors[k].forward.remote(0, *a))
        return combine(x.shape, x.dtype, [(r, ray.get(y)) for r, y in parts])

    def serve_layer():
        parts = via_actors(lambda k, *a: handles[k].remote(0, *a))
        return combine(x.shape, x.dtype, [(r, y.result()) for r, y in parts])

    ref = remote.forward(0, x, ids, w)
    assert torch.allclose(actor_layer(), ref, atol=1e-5) and torch.allclose(serve_layer(), ref, atol=1e-5)
    before = ray.get([a.compute_stats.remote() for a in actors])
    out["gloo data plane"] = median_ms(lambda: remote.forward(0, x, ids, w), it)
    after = ray.get([a.compute_stats.remote() for a in actors])
    # the busiest shard's mean expert compute per batch: the part of the round trip that is not transport
    out["shard compute (max)"] = max(
        (c1 - c0) / max(1, b1 - b0) * 1e3 for (c0, b0), (c1, b1) in zip(before, after, strict=True)
    )
    out["data plane, no compute"] = median_ms(lambda: empty.forward(0, x, ids, w), it)
    out["Ray actor call"] = median_ms(actor_layer, max(it // 3, 30))
    out["Serve handle"] = median_ms(serve_layer, max(it // 6, 20))
    # the floor: bare round trips of the hidden states, no compute, to one shard and to all at once
    from moe.expert_parallel.rendezvous import pair_group

    for label, fan in (("gloo floor (1 pair)", 1), (f"gloo floor ({len(actors)} pairs)", len(actors))):
        rdvs = [Rendezvous(url, f"floor{n}-{fan}-{k}/", "gloo") for k in range(fan)]
        done = [
            a.echo_floor.remote(r.__dict__, it + 10, n, cfg.hidden_size)
            for a, r in zip(actors[:fan], rdvs, strict=True)
        ]
        pgs = [pair_group(store, r.prefix, 0, "gloo", TIMEOUT, "127.0.0.1") for r in rdvs]
        ys = [torch.empty_like(x) for _ in pgs]

        def echo(pgs=pgs, ys=ys):
            # receives posted with the sends, as the data plane does
            works = [
                w for pg, y in zip(pgs, ys, strict=True) for w in (pg.send([x], 1, 0), pg.recv([y], 1, 0))
            ]
            for work in works:
                work.wait()

        out[label] = median_ms(echo, it)
        ray.get(done)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256])
    args = ap.parse_args()

    import ray
    from ray import serve

    model_dir = args.model or str(default_model_dir())
    cfg = ModelConfig.from_pretrained(model_dir)
    groups = partition_experts(cfg.num_local_experts, args.shards)
    placement = Placement.from_groups(groups)
    torch.set_num_threads(1)
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)
    print(
        f"{args.shards} shards, hidden {cfg.hidden_size}, {os.cpu_count()} cores; starting actors ...",
        flush=True,
    )
    Actor = ray.remote(num_cpus=0)(ShardActor)
    actors = [Actor.remote(model_dir, g) for g in groups]
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    handles = [
        serve.run(
            serve.deployment(name=f"S{k}", ray_actor_options={"num_cpus": 0})(ShardActor).bind(model_dir, g),
            name=f"s{k}",
            route_prefix=None,
        )
        for k, g in enumerate(groups)
    ]
    tmp = tempfile.mkdtemp()
    url = f"file://{tmp}/store"
    store = open_store(url, True, TIMEOUT)

    def data_plane(prefix: str, empty: bool) -> RemoteExperts:
        rdvs = [Rendezvous(url, f"{prefix}{k}/", "gloo") for k in range(args.shards)]
        pending = [a.connect.remote(r.__dict__, empty) for a, r in zip(actors, rdvs, strict=True)]
        links = [ShardLink(store, r, torch.device("cpu"), TIMEOUT) for r in rdvs]
        ray.get(pending)
        return RemoteExperts(links, placement, cfg.hidden_size, torch.device("cpu"))

    remote, empty = data_plane("shard", False), data_plane("empty", True)

    results: dict[str, dict[int, float]] = {}
    for n in args.tokens:
        figures = measure(n, cfg, remote, empty, actors, handles, placement, store, url, args.iters)
        for name, ms in figures.items():
            results.setdefault(name, {})[n] = ms
        print(f"  {n:>4} tokens: " + ", ".join(f"{k} {v[n]:.2f} ms" for k, v in results.items()), flush=True)

    print(
        f"\nper-layer dispatch + combine round trip, median ms ({args.shards} shards, hidden {cfg.hidden_size})"
    )
    print(f"{'tokens':>7} " + " ".join(f"{k:>23}" for k in results))
    for n in args.tokens:
        print(f"{n:>7} " + " ".join(f"{results[k][n]:>23.2f}" for k in results))
    floor = f"gloo floor ({args.shards} pairs)"
    for n in args.tokens:
        print(
            f"{n:>4} tokens: transport (no compute) / floor ({args.shards} pairs) = "
            f"{results['data plane, no compute'][n] / results[floor][n]:.2f}x; "
            f"round trip - busiest shard's compute = "
            f"{results['gloo data plane'][n] - results['shard compute (max)'][n]:.2f} ms"
        )
    remote.shutdown()
    empty.shutdown()
    serve.shutdown()
    ray.shutdown()
    save(
        "dispatch_bench",
        {"shards": args.shards, "model": model_dir, "hidden_size": cfg.hidden_size, "results": results},
        results,
        xscale="log",
        yscale="log",
        xlabel="tokens in the layer batch",
        ylabel="round trip, ms (median)",
        title=f"Per-layer expert dispatch, {args.shards} shards, hidden {cfg.hidden_size}",
    )


if __name__ == "__main__":
    main()
