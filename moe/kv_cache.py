"""Paged KV cache: fixed-size blocks of key/value slots, handed out to sequences as they grow.

`KVCache` holds the tensors, [layers, blocks, block_size, kv_heads, head_dim] for K and for V.
`BlockManager` owns the free list and each sequence's block table (as in vLLM): a sequence of
n tokens holds ceil(n / block_size) blocks, and all of them go back when it finishes, is aborted
or is preempted.
"""

from __future__ import annotations

from collections import deque

import torch

from moe.config import MixtralConfig


class KVCache:
    def __init__(
        self,
        cfg: MixtralConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ):
        shape = (cfg.num_hidden_layers, num_blocks * block_size, cfg.num_key_value_heads, cfg.attn_head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, slots, Hkv, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, slots, Hkv, D]
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(cfg: MixtralConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.attn_head_dim * elem


class BlockManager:
    """Free list of KV blocks and the block table of every sequence holding some."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """How many more blocks `seq_id` needs to hold `num_tokens` tokens in all."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= len(self.free)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens; returns the table."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self.free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self.free)} free")
        table = self.tables.setdefault(seq_id, [])
        table.extend(self.free.popleft() for _ in range(need))
        return table

    def free_seq(self, seq_id: str) -> None:
        self.free.extend(self.tables.pop(seq_id, ()))
