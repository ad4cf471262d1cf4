"""Paged KV cache: fixed-size blocks of key/value slots, handed out to sequences as they grow.

`KVCache` holds the tensors, [layers, slots, kv_heads, head_dim] for K and for V: the blocks' slots
laid end to end, plus one scratch slot past them that no block owns (padded rows of a CUDA-graph
decode step write there).
`BlockManager` owns the free list and each sequence's block table (as in vLLM): a sequence of
n tokens holds ceil(n / block_size) blocks, and all of them go back when it finishes, is aborted
or is preempted. With prefix caching on, full blocks are shared by hash between sequences whose
prompts start alike (a system prompt, the earlier turns of a conversation).

`kv_cache_budget` sizes the cache from the device, as vLLM does: on a GPU the cache takes what
the weights, the activations and the CUDA graphs leave of `gpu_memory_utilization` of the GPU
(the fraction all of this process's use may reach, counting what others on the GPU use); on
the CPU it is a byte budget (512 MiB by default, less on a machine with little memory free).
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import OrderedDict
from collections.abc import Iterator

import psutil
import torch

from moe.config import ModelConfig

log = logging.getLogger(__name__)
CPU_DEFAULT_BYTES = 512 * 2**20
GRAPH_RESERVE_BYTES = 512 * 2**20  # the decode CUDA graphs' pool, captured after the cache


def activation_bytes(cfg: ModelConfig, max_tokens: int, max_seqs: int, dtype: torch.dtype) -> int:
    """A step's activation peak, from its shapes: per token the float32 residual stream and a
    layer's intermediates (q/k/v, attention out, normed input, the experts' gate_up and SwiGLU of
    top-k assignments, in the model's dtype), and the logits, probabilities and sort of every
    sequence that samples (float32). An estimate with headroom, not a measurement."""
    elem = torch.tensor([], dtype=dtype).element_size()
    h, k = cfg.hidden_size, cfg.num_experts_per_tok
    mlp = 3 * max(k * cfg.expert_intermediate_size if cfg.is_moe else 0, cfg.intermediate_size)
    if cfg.is_mla:  # q, the latent, the absorbed q (per head r + dr) and the latent output
        qkv = cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.qk_nope_head_dim)
    else:
        qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.attn_head_dim
    per_token = 4 * h * 4 + elem * (qkv + 3 * h + mlp)
    return 2 * (max_tokens * per_token + max_seqs * cfg.vocab_size * 4 * 3)


def kv_cache_budget(
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    kv_bytes: int | None,
    gpu_memory_utilization: float,
    max_tokens: int,
    max_seqs: int,
) -> int:
    """Bytes for the KV cache: `kv_bytes` when given; on a GPU what is left of
    gpu_memory_utilization x its memory once this process's weights are loaded (and what other
    processes hold), less the activations and the graphs; on the CPU 512 MiB, or a tenth of the
    memory available if that is less."""
    if kv_bytes is not None:
        return kv_bytes
    if device.type != "cuda":
        return min(CPU_DEFAULT_BYTES, psutil.virtual_memory().available // 10)
    torch.cuda.empty_cache()  # loading's cached, freed blocks are free memory
    free, total = torch.cuda.mem_get_info(device)
    act = activation_bytes(cfg, max_tokens, max_seqs, dtype)
    budget = int(free - (1 - gpu_memory_utilization) * total - act - GRAPH_RESERVE_BYTES)
    log.info(
        "KV cache: %.2f GiB (GPU %.1f GiB, %.1f GiB free after the weights, utilization %.2f, "
        "activations %.2f GiB, graphs %.2f GiB)",
        budget / 2**30,
        total / 2**30,
        free / 2**30,
        gpu_memory_utilization,
        act / 2**30,
        GRAPH_RESERVE_BYTES / 2**30,
    )
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free after the "
            f"weights, gpu_memory_utilization {gpu_memory_utilization} keeps {(1 - gpu_memory_utilization) * total / 2**30:.1f} "
            f"GiB back and the activations need {act / 2**30:.1f} GiB: raise --gpu-memory-utilization or lower "
            "--max-num-batched-tokens / --max-num-seqs"
        )
    return budget


class KVCache:
    """K and V per layer, [L, slots, heads, width] each; for multi-head latent attention one
    latent per token ([L, slots, 1, kv_lora_rank + qk_rope_head_dim]) whose first kv_lora_rank
    values are also the values: `v` is a view of `k` (moe.layers.mla)."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ):
        self.scratch_slot = num_blocks * block_size  # written by padding, read by nothing real
        heads, k_dim, v_dim = cfg.kv_cache_dims
        shape = (cfg.num_hidden_layers, self.scratch_slot + 1, heads, k_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, slots, Hkv, Dk]
        if cfg.is_mla:
            self.v = self.k[..., :v_dim]  # [L, slots, 1, r]: the latent, a view
        else:
            self.v = torch.zeros((*shape[:-1], v_dim), dtype=dtype, device=device)  # [L, slots, Hkv, Dv]
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """A token's KV cache bytes over all layers."""
        elem = torch.tensor([], dtype=dtype).element_size()
        return cfg.num_hidden_layers * cfg.kv_values_per_token * elem

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return block_size * KVCache.bytes_per_token(cfg, dtype)


def hash_block(parent: bytes, tokens: list[int]) -> bytes:
    """The name of a full block: a hash of its tokens and of its parent's name (all tokens before)."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def block_hashes(token_ids: list[int], block_size: int, max_blocks: int | None = None) -> Iterator[bytes]:
    """The names of the first full blocks of `token_ids` (at most `max_blocks`), one at a time,
    as the prefix cache names them: equal for two prompts exactly as far as their tokens are."""
    parent = b""
    n = len(token_ids) // block_size if max_blocks is None else min(len(token_ids) // block_size, max_blocks)
    for i in range(n):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        yield parent


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

    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of `token_ids`. At least one token is left
        to compute, so the step that finishes the prompt has logits to sample from."""
        if not self.enable_prefix_caching:
            return []
        blocks: list[int] = []
        for name in block_hashes(token_ids, self.block_size, (len(token_ids) - 1) // self.block_size):
            block = self.cached.get(name)
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
            h = hash_block(hashes[-1] if hashes else b"", token_ids[i * bs : (i + 1) * bs])
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
