"""Tokenizers and chat formatting (transformers and mistral-common) and streaming detokenization."""

from __future__ import annotations

import pytest

from moe.errors import RequestError
from moe.tokenizer import HFTokenizer, IncrementalDetokenizer, MistralTokenizer, load_tokenizer

TEXTS = ["Hello, world!", "naïve café — 東京タワー 😀👍🏽 done", "  leading spaces\nand\ttabs  ", "Ⅻ ∑ ∫ ≠"]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.fixture(scope="module", params=["hf", "mistral"])
def tok(request, tiny_dir):
    return load_tokenizer(tiny_dir, request.param)


def test_auto_mode_picks_mistral_for_a_v3_file(tiny_dir, other_dir):
    assert isinstance(load_tokenizer(tiny_dir), MistralTokenizer)
    assert isinstance(load_tokenizer(other_dir, "hf"), HFTokenizer)


def test_round_trip(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_never_breaks_characters(tok, text):
    prompt = tok.encode("Answer:")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas).strip() == text.strip()


def test_chat_template_and_mistral_format_agree(tiny_dir):
    hf, mistral = load_tokenizer(tiny_dir, "hf"), load_tokenizer(tiny_dir, "mistral")
    assert hf.apply_chat_template(CHAT) == mistral.apply_chat_template(CHAT)
    ids = mistral.apply_chat_template(CHAT)
    assert ids[0] == mistral.bos_token_id
    assert "What is 2+2?" in mistral.decode(ids)


def test_bad_roles_are_request_errors(tok):
    with pytest.raises(RequestError) as e:
        tok.apply_chat_template([{"role": "wizard", "content": "hi"}])
    assert e.value.param == "messages"


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


def test_tools_in_the_mistral_format_and_refused_by_a_template_without_them(tiny_dir):
    mistral, hf = load_tokenizer(tiny_dir, "mistral"), load_tokenizer(tiny_dir, "hf")
    plain = mistral.apply_chat_template(CHAT[1:2])
    with_tools = mistral.apply_chat_template(CHAT[1:2], TOOLS)
    assert "[AVAILABLE_TOOLS]" in mistral.decode(with_tools, skip_special_tokens=False)
    assert len(with_tools) > len(plain)
    assert mistral.tool_calls_token_id == hf.tool_calls_token_id == 5
    with pytest.raises(RequestError) as e:  # the embedded chat template has no tool support
        hf.apply_chat_template(CHAT[1:2], TOOLS)
    assert e.value.param == "tools"


def test_decoding_with_special_tokens_shows_their_names(tok):
    ids = tok.apply_chat_template(CHAT[1:])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<s>[INST]") and text.count("[/INST]") == 2 and "</s>" in text
    assert "Hello!" in text and "What is 2+2?" in text and "\u2581" not in text


CORPUS = [
    "The quick brown fox",
    " leading space",
    "   three leading spaces",
    "trailing spaces  ",
    "a   b  \n  c \n",
    "x\n  y\t\tz",
    "a  .b   .c" + " " * 20 + "d" + " " * 40,
    "abc123def ３４ ٣ x²",
    "東京タワーTokyo Tower東京 Ελληνικά Кириллица",
    "a\nb\n\nc",
    "\nstarts with a newline",
    "\ttab",
    "12345 67.89 -0.5e10",
    "naïve café — 東京タワー 😀👍🏽",
    "Ⅻ ∑ ∫ ≠ \u00a0nbsp",
    "[INST] What is 2+2? [/INST] 4</s>",
    "[INST]no spaces[/INST]",
    "<s>[INST] hi [/INST]",
    "call [TOOL_CALLS] [{}]",
    "</s></s>",
    "",
    " ",
]


@pytest.mark.parametrize("which", ["tiny_dir", "other_dir"])
def test_tokenizer_files_encode_as_the_server_does(request, which):
    """Clients that tokenize locally with the checkpoint's tokenizer.json (lm-eval, guidellm,
    token counting) get the server's ids, and decode them to the server's text."""
    from transformers import AutoTokenizer

    d = request.getfixturevalue(which)
    hf = AutoTokenizer.from_pretrained(str(d))
    for mode in ("mistral", "hf"):
        server = load_tokenizer(d, mode)
        for text in CORPUS:
            for special in (True, False):
                ids = server.encode(text, add_special_tokens=special)
                assert hf(text, add_special_tokens=special)["input_ids"] == ids, (mode, text)
            assert hf.decode(ids, skip_special_tokens=True) == server.decode(ids), (mode, text)
