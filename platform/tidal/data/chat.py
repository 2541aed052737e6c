"""Chat templates and conversation encoding with a response-only label mask.

A tokenizer's own chat template is used when it has one. A base model's tokenizer gets
tidal's ChatML-style template, with its role markers added as special tokens (the
embedding matrix grows to match). The template is stored in the tokenizer files, so the
same one is used at training, evaluation and generation time, and it travels with every
HF export (``tokenizer_config.json`` / ``chat_template.jinja``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

IGNORE = -100
START, END = "<|im_start|>", "<|im_end|>"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer, template: Optional[str] = None) -> bool:
    """Give ``tokenizer`` a chat template (``template``, its own, or ChatML); returns True
    when special tokens were added (the model's embeddings must then be resized)."""
    if template:
        tokenizer.chat_template = template
    if tokenizer.chat_template:
        if tokenizer.chat_template != CHATML:
            return False
    else:
        tokenizer.chat_template = CHATML
    missing = [t for t in (START, END) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return bool(missing)


def render(tokenizer, turns, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, turns) -> Tuple[List[int], List[int]]:
    """``(input_ids, labels)`` for a conversation: labels equal the ids on every assistant
    turn's tokens (its content and end marker, what the model must learn to produce) and
    ``IGNORE`` elsewhere (system, user, role headers). Each assistant span is found by
    rendering the conversation up to that turn with and without it, which works for any
    template whose turns start at a token boundary (checked)."""
    ids = _ids(tokenizer, render(tokenizer, turns))
    labels = [IGNORE] * len(ids)
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = _ids(tokenizer, render(tokenizer, turns[:k], add_generation_prompt=True))
        upto = _ids(tokenizer, render(tokenizer, turns[:k + 1]))
        if ids[:len(upto)] != upto or upto[:len(before)] != before:
            raise ValueError("the chat template does not tokenize turn by turn (a turn boundary "
                             "falls inside a token); use a template with special role markers")
        end = len(upto)
        # trailing whitespace after the end marker is the template's, not the reply's
        while end > len(before) and tokenizer.decode(ids[end - 1:end]).strip() == "":
            end -= 1
        labels[len(before):end] = ids[len(before):end]
    return ids, labels
