"""The shipped tiny tokenizer: reproducible build, round-trip, single-digit tokens, chat template."""

from __future__ import annotations

import json

import pytest

from forge.models import apply_chat_template, load_tokenizer, tiny_tokenizer_path
from forge.models.build_tiny_tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, build


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(tiny_tokenizer_path())


def test_shipped_files_small_and_reproducible(tmp_path):
    shipped = tiny_tokenizer_path()
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 300_000
    build(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((shipped / name).read_text()), name


def test_vocab_specials_pad_eos(tok):
    assert len(tok) == VOCAB_SIZE
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2
    for s in SPECIAL_TOKENS:
        assert tok.convert_ids_to_tokens(tok.encode(s, add_special_tokens=False)) == [s]


def test_round_trip_and_single_digit_tokens(tok):
    text = "What is 1234 + 98765? <think>carry the 1</think><answer>100,099</answer>\n\tünïcødé ✓ 日本"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    for n in ("0", "7", " 12", "x=345", "3.14159", "-66"):
        pieces = [tok.decode([i]) for i in tok.encode(n, add_special_tokens=False)]
        assert [p for p in pieces if any(c.isdigit() for c in p)] == [c for c in n if c.isdigit()], pieces


def test_chat_template_roles_tools_and_generation_prompt(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = apply_chat_template(tok, msgs)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert apply_chat_template(tok, "hi", add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
    convo = [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "calc", "arguments": {"e": "1+1"}}}]},
        {"role": "tool", "content": "2"},
    ]
    text = apply_chat_template(tok, convo, tools=tools)
    assert '"name": "calc"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "calc", "arguments": {"e": "1+1"}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\n2\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in text
    ids = apply_chat_template(tok, convo, tools=tools, tokenize=True)
    assert tok.decode(ids) == text and ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 5


def test_missing_tokenizer_files_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files.*config\.json"):
        load_tokenizer(tmp_path)
