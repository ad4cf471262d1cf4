"""Paged KV cache: fixed-size blocks of key/value slots, handed out to sequences as they grow.

`KVCache` holds the tensors, [layers, slots, kv_heads, head_dim] for K and for V: the blocks' slots
laid end to end, plus one scratch slot past them that no block owns (padded rows of a CUDA-graph
decode step write there).
`BlockManager` owns the free list and each sequence's block table (as in vLLM): a sequence of
n tokens holds ceil(n / block_size) blocks, and all of them go back when it finishes, is aborted
or is preempted. With prefix caching on, full blocks are shared by hash between sequences whose
prompts start alike (a system prompt, the earlier turns of a conversation).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from moe.config import ModelConfig


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ):
        self.scratch_slot = num_blocks * block_size  # written by padding, read by nothing real
        shape = (cfg.num_hidden_layers, self.scratch_slot + 1, cfg.num_key_value_heads, cfg.attn_head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, slots, Hkv, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, slots, Hkv, D]
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.attn_head_dim * elem


class BlockManager:
    """Free list of KV blocks and the block table of every sequence holding some.

    With prefix caching (vLLM's hash-based automatic prefix caching), every full block is named
    by a hash of its tokens and of all tokens before it. A block whose sequence has left stays
    cached on the free list (least recently freed evicted first) until it is handed out again;
    a new sequence whose prompt starts with cached blocks takes them instead of recomputing.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.ref = [0] * num_blocks
        self.tables: dict[str, list[int]] = {}
        self.hashes: dict[str, list[bytes]] = {}  # hashes of each sequence's full blocks, in order
        self.cached: dict[bytes, int] = {}  # block hash → block holding those tokens
        self.block_hash: dict[int, bytes] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up (vLLM counts tokens)
        self.prefix_cache_hits = 0  # of those, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def _hash(self, parent: bytes, tokens: list[int]) -> bytes:
        return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()

    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of `token_ids`. At least one token is left
        to compute, so the step that finishes the prompt has logits to sample from."""
        if not self.enable_prefix_caching:
            return []
        blocks: list[int] = []
        parent = b""
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            parent = self._hash(parent, token_ids[i * bs : (i + 1) * bs])
            block = self.cached.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def blocks_needed(self, seq_id: str, num_tokens: int, reuse: list[int] | None = None) -> int:
        """How many more free blocks `seq_id` needs to hold `num_tokens` tokens in all, taking the
        cached blocks `reuse` first (those on the free list count against it)."""
        have = len(self.tables.get(seq_id, ())) + len(reuse or ())
        revived = sum(1 for b in reuse or () if self.ref[b] == 0)
        return max(0, -(-num_tokens // self.block_size) - have) + revived

    def can_allocate(self, seq_id: str, num_tokens: int, reuse: list[int] | None = None) -> bool:
        return self.blocks_needed(seq_id, num_tokens, reuse) <= len(self.free)

    def allocate(self, seq_id: str, num_tokens: int, reuse: list[int] | None = None) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens, starting with the cached blocks
        `reuse` (a new sequence's prefix hit); returns the table."""
        need = self.blocks_needed(seq_id, num_tokens, reuse)
        if need > len(self.free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self.free)} free")
        table = self.tables.setdefault(seq_id, [])
        if reuse:
            hashes = self.hashes.setdefault(seq_id, [])
            for b in reuse:
                if self.ref[b] == 0:
                    del self.free[b]
                self.ref[b] += 1
                table.append(b)
                hashes.append(self.block_hash[b])
        while len(table) * self.block_size < num_tokens:
            b, _ = self.free.popitem(last=False)
            if (h := self.block_hash.pop(b, None)) is not None:  # evict its cached contents
                del self.cached[h]
            self.ref[b] = 1
            table.append(b)
        return table

    def record_prompt(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_prompt_tokens
            self.prefix_cache_hits += num_hit_tokens

    def num_unhashed(self, seq_id: str, num_computed: int) -> int:
        """How many of `seq_id`'s full blocks are not yet named (0 with prefix caching off)."""
        if not self.enable_prefix_caching:
            return 0
        return num_computed // self.block_size - len(self.hashes.get(seq_id, ()))

    def cache_full_blocks(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        """Name the blocks of `seq_id` that are now full of computed K/V, so later sequences
        can find them."""
        table, hashes, bs = self.tables[seq_id], self.hashes.setdefault(seq_id, []), self.block_size
        for i in range(len(hashes), num_computed // bs):
            h = self._hash(hashes[-1] if hashes else b"", token_ids[i * bs : (i + 1) * bs])
            hashes.append(h)
            if h not in self.cached:  # else the same tokens already live in another block
                self.cached[h] = table[i]
                self.block_hash[table[i]] = h

    def free_seq(self, seq_id: str) -> None:
        """Give back a sequence's blocks; cached ones stay findable until reused. The tail goes
        on the free list first, so it is evicted before the (more shareable) head."""
        self.hashes.pop(seq_id, None)
        for b in reversed(self.tables.pop(seq_id, ())):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
