"""The data plane's wire format: one layer batch for one shard as one byte buffer.

A message is a header [op, layer, n, inline] (int64), the routing (int32 [n, K]: the global
expert ids the shard is to compute, -1 for the others; float32 [n, K]: their weights) and the
hidden states x [n, H] (model dtype). The shard answers with its part of the weighted sum,
y [n, H] in float32: the router adds the shards' parts in float32 and rounds once, so an
answer does not depend on how the experts are split over shards. A batch of up
to the shard's standing receive (`inline` tokens, gloo) travels as one message; a bigger one,
and every batch over NCCL (which needs exact sizes), as the header and then the body.
"""

from __future__ import annotations

import torch

from moe.expert_parallel.placement import ShardBatch

FORWARD, SHUTDOWN, PING = 1, 2, 3  # PING: a header alone, unanswered (an idle link's keepalive)
HEADER_BYTES = 32  # [op, layer, n, inline] int64
HEAD_TAG, BODY_TAG = 0, 1  # a body sent apart from its header has its own tag (gloo matches per tag)
INLINE_TOKENS = 512  # batches up to this many tokens travel as one message (gloo)


MAX_TOKENS = 1 << 20  # a layer batch's rows: more than any step's token budget


def check_header(op: int, layer: int, n: int, inline: int, num_layers: int, standing: int) -> None:
    """A header read off the wire, checked before anything is sized from it (ValueError): a
    known op, a MoE layer this model has, 0 <= n <= MAX_TOKENS, and an inline body only within
    the standing receive's `standing` tokens."""
    if op not in (FORWARD, SHUTDOWN, PING):
        raise ValueError(f"malformed layer batch: op {op}")
    if op == FORWARD and not (
        0 <= layer < num_layers
        and 0 <= n <= MAX_TOKENS
        and inline in (0, 1)
        and (not inline or n <= standing)
    ):
        raise ValueError(f"malformed layer batch: layer {layer} of {num_layers}, n {n}, inline {inline}")


def body_bytes(n: int, hidden: int, top_k: int, dtype: torch.dtype) -> int:
    """Bytes of a batch of n tokens after the header: ids [n, K] int32, weights [n, K] float32, x [n, H]."""
    return n * (2 * top_k * 4 + hidden * dtype.itemsize)


def encode(layer: int, x: torch.Tensor, b: ShardBatch, inline: bool, device: torch.device) -> torch.Tensor:
    """One shard's batch as bytes on `device`: header, its expert ids [n, K] int32, their
    weights [n, K] float32, x[b.token_index] [n, H]. Everything is written straight into the
    message (pinned when a GPU's tensors go out over gloo)."""
    n, (hidden, k) = b.token_index.numel(), (x.shape[1], b.expert_ids.shape[1])
    pin = x.is_cuda and device.type == "cpu"
    msg = torch.empty(HEADER_BYTES + body_bytes(n, hidden, k, x.dtype), dtype=torch.uint8,
                      device=device, pin_memory=pin)  # fmt: skip
    header = torch.tensor([FORWARD, layer, n, int(inline)], dtype=torch.long)
    if msg.is_cuda:  # one asynchronous copy from pinned memory: from pageable memory it would sync
        header = header.pin_memory()
    msg[:HEADER_BYTES].view(torch.long).copy_(header, non_blocking=True)
    split = HEADER_BYTES + n * k * 4
    msg[HEADER_BYTES:split].view(torch.int32).view(n, k).copy_(b.expert_ids)
    msg[split : split + n * k * 4].view(torch.float32).view(n, k).copy_(b.weights)
    split += n * k * 4
    xs = msg[split:].view(x.dtype).view(n, hidden)
    if x.device == device:
        torch.index_select(x, 0, b.token_index, out=xs)
    else:  # blocking: gloo reads the buffer as soon as the send is posted
        xs.copy_(x[b.token_index])
    return msg


def decode(
    body: torch.Tensor, n: int, hidden: int, top_k: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body bytes of a batch → x [n, H], expert ids [n, K] int32, weights [n, K] float32:
    views of `body`."""
    split = n * top_k * 4
    ids = body[:split].view(torch.int32).view(n, top_k)
    weights = body[split : 2 * split].view(torch.float32).view(n, top_k)
    x = body[2 * split : 2 * split + n * hidden * dtype.itemsize].view(dtype).view(n, hidden)
    return x, ids, weights
