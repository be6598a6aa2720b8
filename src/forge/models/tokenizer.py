"""Tokenizers from local directories (never the network) and forge's shipped tiny tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

_TINY = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"


def tiny_tokenizer_path() -> Path:
    """The byte-level BPE tokenizer forge ships (512 tokens, digits one per token, Qwen chat template)."""
    return _TINY


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """`AutoTokenizer` from a local model directory (or `hf://org/name` in the local HF cache).

    pad is set to eos when the tokenizer has none, so batching always works.
    """
    from transformers import AutoTokenizer

    from forge.models.hf_io import resolve_model_path

    d = resolve_model_path(path)
    if not any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(
            f"no tokenizer files in {d} (expected tokenizer.json / tokenizer_config.json); "
            f"found: {sorted(p.name for p in d.iterdir())}"
        )
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]] | str,
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    tokenize: bool = False,
    **kwargs: Any,
) -> str | list[int]:
    """Render a conversation (a bare string is one user turn) with the tokenizer's chat template.

    Base models without a template get the plain text back (messages joined), so the same
    app code runs on base and chat checkpoints. `tokenize=True` returns a list of token ids.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )
    else:
        text = "\n".join(str(m.get("content", "")) for m in messages)
    if tokenize:
        return tokenizer.encode(text, add_special_tokens=False)
    return text
