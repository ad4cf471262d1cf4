"""Multi-head latent attention (DeepSeek-V2/V3, moe.layers.mla) without Ray: the KV cache holds
one latent per token and layer, and attention computed in the latent space with the absorbed
up-projection (prefill, then decode from the cache) equals the expanded computation, per-head K
and V made from the latents as transformers makes them, within 1e-5 in float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe.checkpoint.reader import CheckpointReader
from moe.config import ModelConfig
from moe.engine.kv_cache import KVCache
from moe.layers.attention import AttentionMetadata, DenseDecode, RotaryEmbedding, apply_rotary
from moe.layers.mla import MLAttention, halves
from moe.models.transformer import DenseModel


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v2"])
def model(request, family_dirs):
    d = family_dirs(request.param)
    cfg = ModelConfig.from_pretrained(d)
    return cfg, DenseModel.from_checkpoint(CheckpointReader(d), cfg, torch.float32)


def test_the_cache_holds_one_latent_per_token_and_layer(model):
    cfg, _ = model
    cache = KVCache(cfg, num_blocks=4, block_size=8, dtype=torch.float32, device="cpu")
    r, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    assert cache.k.shape == (cfg.num_hidden_layers, 4 * 8 + 1, 1, r + dr)
    assert cache.v.shape[-1] == r and cache.v.data_ptr() == cache.k.data_ptr()  # the values: a view
    assert KVCache.bytes_per_token(cfg, torch.bfloat16) == cfg.num_hidden_layers * (r + dr) * 2
    expanded = 2 * cfg.num_attention_heads * (cfg.qk_nope_head_dim + dr)  # per-head K and V (V padded)
    assert cfg.kv_values_per_token == r + dr < expanded


def test_deepseek_v3s_published_shape_caches_576_values_per_token_and_layer():
    cfg = ModelConfig(
        model_type="deepseek_v3",
        num_attention_heads=128,
        num_key_value_heads=128,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
    )
    assert cfg.kv_cache_dims == (1, 576, 512) and cfg.kv_values_per_token == 576


def expanded_attention(
    attn: MLAttention, cfg: ModelConfig, x: torch.Tensor, rotary: RotaryEmbedding
) -> torch.Tensor:
    """transformers' way, for x [T, H] of one sequence from position 0: per-head K and V from
    the latents (k_nope and v through kv_b_proj), the rotary key broadcast to every head, causal
    softmax at the model's scale → [T, H]."""
    t, nh, dn, dr, dv, r = x.shape[0], attn.nh, attn.dn, attn.dr, attn.dv, attn.r
    q = attn.q_proj(x) if attn.q_proj is not None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q_nope, q_pe = q.view(t, nh, dn + dr).split([dn, dr], -1)
    c, k_pe = attn.kv_a_proj_with_mqa(x).split([r, dr], -1)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(c)).view(t, nh, dn + dv)  # [T, nh, dn + dv]
    k_nope, v = kv.split([dn, dv], -1)
    k_pe = k_pe[:, None]
    if cfg.rope_interleave:
        q_pe, k_pe = halves(q_pe), halves(k_pe)
    cos, sin = rotary.cos_sin(torch.arange(t), torch.float32)
    q_pe, k_pe = apply_rotary(q_pe, cos, sin), apply_rotary(k_pe, cos, sin)
    query = torch.cat([q_nope, q_pe], -1).transpose(0, 1)  # [nh, T, dn + dr]
    key = torch.cat([k_nope, k_pe.expand(t, nh, dr)], -1).transpose(0, 1)
    out = F.scaled_dot_product_attention(
        query, key, v.transpose(0, 1), is_causal=True, scale=cfg.softmax_scale
    )
    return attn.o_proj(out.transpose(0, 1).reshape(t, nh * dv))


def test_absorbed_attention_equals_the_expanded_computation(model):
    """A 12-token prompt prefilled (AttentionMetadata), then a 13th token decoded from the cache
    (DecodeMetadata, the decode step's attention): both equal the expanded computation."""
    cfg, dense = model
    attn = dense.layers[0].self_attn
    assert isinstance(attn, MLAttention)
    rotary = dense.rotary
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, cfg.hidden_size, generator=g)
    want = expanded_attention(attn, cfg, x, rotary)  # [13, H]
    cache = KVCache(cfg, num_blocks=4, block_size=4, dtype=torch.float32, device="cpu")
    table = [2, 0, 3, 1]  # pages out of order
    with torch.inference_mode():
        meta = AttentionMetadata.build([table], [12], [12], 4, None, "cpu")
        prefill = attn(x[:12], rotary.cos_sin(meta.positions, torch.float32), cache.k[0], cache.v[0], meta)
        decode = DenseDecode(cache, max_batch=1, max_context=16, sliding_window=None)
        decode.fill([table], [13], bsz=1, ctx=16)
        slot = torch.tensor([table[12 // 4] * 4 + 12 % 4])
        step = decode.metadata(torch.tensor([12]), slot, bsz=1, ctx=16)
        last = attn(x[12:], rotary.cos_sin(step.positions, torch.float32), cache.k[0], cache.v[0], step)
    torch.testing.assert_close(prefill, want[:12], rtol=0, atol=1e-5)
    torch.testing.assert_close(last, want[12:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_deepseeks_router_stays_float32_in_a_bfloat16_model(family_dirs, model_type):
    """As transformers keeps it: the gate's weight and V3's correction bias in float32, the
    router logits computed in float32 (a bfloat16 bias would round the scores that choose 8 of
    256 experts)."""
    d = family_dirs(model_type)
    cfg = ModelConfig.from_pretrained(d)
    dense = DenseModel.from_checkpoint(CheckpointReader(d), cfg, torch.bfloat16)
    moe = dense.layers[1].mlp
    assert dense.layers[1].self_attn.o_proj.weight.dtype == torch.bfloat16
    assert moe.gate.weight.dtype == torch.float32
    if model_type == "deepseek_v3":
        assert moe.e_score_correction_bias.dtype == torch.float32
        assert moe.e_score_correction_bias.abs().sum() > 0  # read from the checkpoint, not zeros
