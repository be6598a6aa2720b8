"""Build the tiny tokenizer forge ships in `forge/assets/tiny_tokenizer/`.

Byte-level BPE (so any text round-trips, no <unk>) trained on a small embedded corpus, 512 entries:
256 byte tokens, ~245 merges, and the special tokens chat/RL apps need. Digits are split before
BPE runs, so every digit is always exactly one token (arithmetic tasks rely on this). The chat
template is Qwen2.5's (system/user/assistant/tool roles, `tools=` function specs, tool calls).

Reproducible: `python -m forge.models.build_tiny_tokenizer [--out DIR]` rewrites the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB_SIZE = 512
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
]
EOS, PAD = "<|im_end|>", "<|endoftext|>"

# Qwen2.5's chat template (tools + tool role), kept verbatim in behaviour.
CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'tool' %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Small training corpus: the words and symbols forge's built-in tasks and examples use.
_CORPUS = """
You are a helpful assistant. Solve the problem step by step. Think before you answer.
Put the final answer inside <answer></answer> tags. The answer is 42. What is 12 plus 30?
What is the sum of the numbers? Compute the product, the difference and the quotient.
Let me think about this. First, we add the tens, then the ones. So the result is the total.
Question: how many apples does she have left? Answer: she has 7 apples left.
def add(a, b):\n    return a + b\n\nprint(add(2, 3))\nimport json\nfor i in range(10):\n    x = i * 2
The quick brown fox jumps over the lazy dog. Hello world! This is a test of the tokenizer.
user assistant system tool function name arguments result value error true false null
Please call the calculator tool with the expression. The tool returned the following output.
Count the letters in the word. Reverse the string. Sort the list in increasing order.
plus minus times divided by equals equal greater less than number numbers digit digits
"""


def build(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits first (each digit its own piece, so BPE can never merge "12" or " 1"), then GPT-2 style
    # byte-level splitting of everything else.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    lines = [ln for ln in _CORPUS.strip().splitlines() if ln]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE,
        additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=32768, clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # Portable across transformers 4.x and 5.x: name the fast-tokenizer class both know, and list the
    # extra special tokens under the 4.x key as well.
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens", SPECIAL_TOKENS[3:])
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def main() -> None:
    from forge.models.tokenizer import tiny_tokenizer_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=tiny_tokenizer_path())
    out = build(p.parse_args().out)
    print(f"wrote {sorted(f.name for f in out.iterdir())} to {out}")


if __name__ == "__main__":
    main()
