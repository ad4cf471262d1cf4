"""Multi-head latent attention (DeepSeek-V2/V3) over a latent KV cache.

Per token and layer the cache holds what every head's keys and values are made from: the
compressed KV `c = kv_a_layernorm(kv_a_proj_with_mqa(x)[:r])` and the rotary key `k_pe` (one for
all heads): r + dr values (576 for DeepSeek-V3) where GQA-style heads would take 2 · 128 · 192.

Attention runs in the latent space with the up-projection absorbed, as vLLM's and SGLang's MLA
backends do: head h's key is `W_UK[h] c` and its value `W_UV[h] c` (kv_b_proj split per head), so
  q_nope · (W_UK c) = (W_UKᵀ q_nope) · c   and   Σ_s p_s W_UV c_s = W_UV (Σ_s p_s c_s).
Each head's q_nope is mapped into the latent space once, the attention weights are applied to the
latents, and the result is mapped out through W_UV. To the paged attention this is multi-query
attention with one KV head of width r + dr whose values are its first r: the same metadata,
caches and kernels as GQA. Prefill takes the same path (it could expand K and V instead, fewer
FLOPs for long prompts; not needed for correctness).

The rotary part follows transformers' DeepseekV3 (`rope_interleave`: pairs (2i, 2i+1) rotated,
here by permuting them into halves first and rotating halves, which gives its output exactly)
and DeepseekV2 (the same pairs as complex numbers: its scores are the same).
"""

from __future__ import annotations

import torch
from torch import nn

from moe.config import ModelConfig
from moe.layers.attention import apply_rotary
from moe.layers.norm import RMSNorm

LORA_EPS = 1e-6  # q_a_layernorm's and kv_a_layernorm's, fixed in DeepSeek's code


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.nh, self.dn, self.dr, self.dv, self.r = nh, dn, dr, dv, r
        rq = cfg.q_lora_rank
        self.q_proj = None if rq else nn.Linear(h, nh * (dn + dr), bias=False)
        self.q_a_proj = nn.Linear(h, rq, bias=cfg.qkv_bias) if rq else None
        self.q_a_layernorm = RMSNorm(rq, LORA_EPS) if rq else None
        self.q_b_proj = nn.Linear(rq, nh * (dn + dr), bias=False) if rq else None
        self.kv_a_proj_with_mqa = nn.Linear(h, r + dr, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(r, LORA_EPS)
        self.kv_b_proj = nn.Linear(r, nh * (dn + dv), bias=False)  # W_UK over W_UV per head, absorbed
        self.o_proj = nn.Linear(nh * dv, h, bias=cfg.o_bias)
        # SDPA divides by sqrt(r + dr); the model's scale is 1/sqrt(dn + dr) (times YaRN's mscale²)
        self.q_scale = cfg.softmax_scale * (r + dr) ** 0.5
        self.interleaved = cfg.rope_interleave

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # [T, dr] each
        k_cache: torch.Tensor,  # [slots, 1, r + dr]: the latent cache
        v_cache: torch.Tensor,  # [slots, 1, r]: a view of its first r values
        meta,  # moe.models.transformer.Metadata
    ) -> torch.Tensor:
        t, nh, dn, r = x.shape[0], self.nh, self.dn, self.r
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            assert self.q_a_proj is not None and self.q_a_layernorm is not None and self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(t, nh, dn + self.dr).split([dn, self.dr], dim=-1)  # [T, nh, dn], [T, nh, dr]
        c, k_pe = self.kv_a_proj_with_mqa(x).split([r, self.dr], dim=-1)  # [T, r], [T, dr]
        c = self.kv_a_layernorm(c)
        k_pe = k_pe[:, None]  # [T, 1, dr]
        if self.interleaved:  # pairs (2i, 2i+1) → halves: [x0, x2, ..., x1, x3, ...]
            q_pe, k_pe = halves(q_pe), halves(k_pe)
        q_pe, k_pe = apply_rotary(q_pe, *cos_sin), apply_rotary(k_pe, *cos_sin)
        w_kv = self.kv_b_proj.weight.view(nh, dn + self.dv, r)  # [nh, dn + dv, r]
        q_latent = torch.einsum("thd,hdr->thr", q_nope, w_kv[:, :dn])  # [T, nh, r]
        query = torch.cat([q_latent, q_pe], dim=-1) * self.q_scale  # [T, nh, r + dr]
        key = torch.cat([c[:, None], k_pe], dim=-1)  # [T, 1, r + dr]: what the cache keeps
        out = meta.attend(query, key, key[..., :r], k_cache, v_cache)  # [T, nh, r]
        out = torch.einsum("thr,hvr->thv", out, w_kv[:, dn:])  # [T, nh, dv]
        return self.o_proj(out.reshape(t, nh * self.dv))  # [T, H]


def halves(x: torch.Tensor) -> torch.Tensor:
    """[..., D] with rotary pairs interleaved → the evens then the odds (rotate-half's layout)."""
    return x.unflatten(-1, (x.shape[-1] // 2, 2)).transpose(-1, -2).flatten(-2)
