"""Tiny checkpoints of the families beyond Mixtral (Qwen3-MoE, Qwen2-MoE, OLMoE, DeepSeek-V3/V2), made by
transformers itself, with a byte-level BPE tokenizer trained here: for tests and demos, nothing
downloaded.

`make_tiny_family(dir, model_type)` builds the family's own transformers model from its config
class at a tiny size, fills every weight from a seeded generator (scaled as moe.checkpoint.tiny
does, so greedy choices are well separated), and writes it with `save_pretrained`: the Hub's
layout, exactly what the family's published checkpoints look like. The tokenizer is a byte-level
BPE (Qwen's and most new models' kind: any text, Chinese and emoji included, round-trips) trained
in milliseconds on a fixed text, deterministically, with ChatML's special tokens and the
non-special tags of tool calls and reasoning (<tool_call>, <think>, ...), and a chat template in
Qwen3's format (templates/chatml_tools_think.jinja). `generation_config.json` lists two eos ids
(<|im_end|> and <|endoftext|>), as Qwen3's does. DeepSeek's checkpoints get DeepSeek's tokens
instead (<｜begin▁of▁sentence｜>, <｜User｜>, <｜Assistant｜>, the tool-call markers) and a
template in DeepSeek-V3's format (templates/deepseek_v3_tools_think.jinja).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
TEMPLATE = Path(__file__).parent / "templates" / "chatml_tools_think.jinja"
# DeepSeek's: full-width bars and ▁ in its special tokens; the tool-call markers and the think
# tags are added tokens but not special (they stay in the decoded text, where parsers read them)
DEEPSEEK_SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
DEEPSEEK_TAGS = [
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<think>",
    "</think>",
]
DEEPSEEK_TEMPLATE = Path(__file__).parent / "templates" / "deepseek_v3_tools_think.jinja"

# DeepSeek-V3 and V2 alike: MLA, 16 experts top-4 in 4 groups, a dense first layer, YaRN
MLA: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    max_position_embeddings=4096,  # YaRN's factor 4 over 1024
)
YARN: dict[str, Any] = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=1024
)

# Each family at a tiny size with the shape of its published checkpoints where it matters:
# Qwen3-MoE 128 experts top-8 (renormalised), head_dim apart from hidden / heads, a dense layer;
# Qwen2-MoE a shared expert and q/k/v biases; OLMoE 64 experts top-8, its q/k norms and a clamp.
SIZES: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
    "qwen2_moe": dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    ),
    # DeepSeek-V3: MLA with a q down-projection, interleaved rotary pairs, YaRN whose cos/sin
    # scale is not 1 (mscale != mscale_all_dim), sigmoid routing with a correction bias within 2 of
    # 4 groups, a shared expert, a dense first layer
    "deepseek_v3": dict(
        **MLA,
        q_lora_rank=32,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_interleave=True,
        rope_parameters=dict(YARN, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8),
    ),
    # DeepSeek-V2(-Lite): MLA without a q down-projection, softmax routing within 2 of 4 groups
    "deepseek_v2": dict(
        **MLA,
        q_lora_rank=None,
        topk_method="group_limited_greedy",
        n_shared_experts=2,
        routed_scaling_factor=2.0,
        norm_topk_prob=False,
        rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707),
    ),
    "olmoe": dict(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=64,
        num_experts_per_tok=8,
        clip_qkv=2.0,
    ),
}

CORPUS = """\
Mixture-of-experts models route every token to a few experts out of many.
The router computes a score for each expert, keeps the top k, and adds up their outputs.
Expert parallelism places the experts of every layer on different GPUs; a router sends each
shard the hidden states of the tokens routed to its experts, in one message per layer.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
def forward(self, x):\n    return self.down(F.silu(self.gate(x)) * self.up(x))\n
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159 -7 1e-5.
混合专家模型把每个词元路由到少数几个专家。专家并行把专家放在不同的显卡上。
今天天气很好，我们去公园散步吧。你好，世界！
Les modèles à mélange d'experts sont rapides. Grüße aus München! ¿Qué tal?
Emoji: 😀 🎉 👍 🚀 ❤️ 🤖 — and symbols: © ® ™ € £ ¥ § ¶ • … ≤ ≥ ≠ ∞.
"""


def train_tokenizer(vocab_size: int = 1024, style: str = "chatml"):
    """A byte-level BPE trained on CORPUS (the same merges every time), wrapped for transformers:
    with ChatML's special tokens and Qwen3's template, or (style "deepseek") DeepSeek-V3's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    deepseek = style == "deepseek"
    special = DEEPSEEK_SPECIAL if deepseek else SPECIAL
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    if deepseek:
        roles = dict(bos_token=special[0], eos_token=special[1], pad_token=special[1])
        tags, template = DEEPSEEK_TAGS, DEEPSEEK_TEMPLATE
    else:
        roles = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tags, template = TAGS, TEMPLATE
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **roles,
        additional_special_tokens=[t for t in special if t not in roles.values()],
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    fast.add_tokens(tags)  # added, not special: they survive skip_special_tokens, as Qwen3's do
    fast.chat_template = template.read_text()
    return fast


def config_class(model_type: str):
    from transformers import DeepseekV2Config, DeepseekV3Config, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    return {
        "qwen3_moe": Qwen3MoeConfig,
        "qwen2_moe": Qwen2MoeConfig,
        "olmoe": OlmoeConfig,
        "deepseek_v3": DeepseekV3Config,
        "deepseek_v2": DeepseekV2Config,
    }[model_type]


def fill_weights(model: torch.nn.Module, seed: int) -> None:
    """Every parameter from a seeded generator: norms near 1, biases small, embeddings of unit
    variance, matrices [.., out, in] with unit-variance outputs, the LM head's logits of std ~3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith(".bias"):
                t = 0.1 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                t = torch.randn(p.shape, generator=g)
            else:
                t = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
                if name.startswith("lm_head"):
                    t *= 3.0
            p.copy_(t)
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's: zeros as initialised
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def make_tiny_family(out_dir: str | Path, model_type: str, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny `model_type` checkpoint ("qwen3_moe", "qwen2_moe", "olmoe") to `out_dir`;
    `overrides` change its transformers config's fields (e.g. tie_word_embeddings=True)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    if model_type not in SIZES:
        raise ValueError(f"model_type must be one of {sorted(SIZES)}, got {model_type!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("writing a tiny %s checkpoint (seed %d) to %s", model_type, seed, out)
    deepseek = model_type.startswith("deepseek")
    tokenizer = train_tokenizer(style="deepseek" if deepseek else "chatml")
    bos, eos, pad = (
        [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id]
        if deepseek
        else [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|endoftext|>")]
    )
    fields = dict(SIZES[model_type]) | overrides
    fields |= dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=fields.get("max_position_embeddings", 4096),
        **({} if "rope_parameters" in fields else {"rope_theta": 1e6}),
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    config = config_class(model_type)(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fill_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=bos,
        eos_token_id=eos if deepseek else [eos, bos],  # Qwen3's lists <|im_end|> and <|endoftext|>
        pad_token_id=pad,
    )
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == model_type, raw["model_type"]
    return out
