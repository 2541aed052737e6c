"""Post-training record formats, validated into one shape each.

Instruction data becomes a conversation, ``[{"role", "content"}, ...]`` ending with an
assistant turn, from any of:
- Alpaca records: ``instruction`` / ``input`` (optional) / ``output``;
- prompt-completion pairs: ``prompt`` / ``completion`` (or ``response``);
- chat records: ``messages`` (role/content dicts; roles system, user, assistant).

Preference data becomes ``{"prompt": [turns], "chosen": str, "rejected": str}`` from:
- ``{prompt, chosen, rejected}`` records (prompt a string or a list of turns);
- HH-RLHF transcripts (``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` in ``chosen`` and
  ``rejected``): the shared turns are the prompt, the differing last replies the responses.

Prompts for RL (``tidal.rlhf.prompts``) reuse the same checks: ``alpaca_prompt`` (an
Alpaca record's user turn) and ``opening_turns`` (a conversation without its reply).

Each parser returns ``(value, None)`` or ``(None, reason)``: a malformed record is counted
and set aside with its reason, never fatal.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

ROLES = ("system", "user", "assistant")
Turns = List[Dict[str, str]]
_HH = re.compile(r"\n\n(Human|Assistant): ")


def _text(rec: Dict, key: str) -> Optional[str]:
    v = rec.get(key)
    return v if isinstance(v, str) else None


def instruction_example(rec) -> Tuple[Optional[Turns], Optional[str]]:
    if not isinstance(rec, dict):
        return None, "record is not an object"
    if "messages" in rec:
        return check_turns(rec["messages"])
    if "instruction" in rec or "output" in rec:
        user, why = alpaca_prompt(rec)
        out = _text(rec, "output")
        if user is None:
            return None, why
        if out is None or not out.strip():
            return None, "missing or empty 'output'"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": out.strip()}], None
    if "prompt" in rec:
        prompt = _text(rec, "prompt")
        out = _text(rec, "completion") if "completion" in rec else _text(rec, "response")
        if prompt is None or not prompt.strip():
            return None, "missing or empty 'prompt'"
        if out is None or not out.strip():
            return None, "missing or empty 'completion'"
        return [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": out.strip()}], None
    return None, "no instruction/output, prompt/completion or messages fields"


def alpaca_prompt(rec: Dict) -> Tuple[Optional[str], Optional[str]]:
    """The user turn of an Alpaca record: ``instruction``, then ``input`` when not empty."""
    instr = _text(rec, "instruction")
    if instr is None or not instr.strip():
        return None, "missing or empty 'instruction'"
    extra = rec.get("input", "")
    if extra is not None and not isinstance(extra, str):
        return None, "'input' is not a string"
    return instr.strip() + ("\n\n" + extra.strip() if extra and extra.strip() else ""), None


def opening_turns(turns) -> Tuple[Optional[Turns], Optional[str]]:
    """Turns that open a conversation (a prompt), checked as ``check_turns`` checks a whole
    one (roles, a system turn first only, a user turn, no empty assistant turn) but without
    the final reply."""
    if not isinstance(turns, list) or not turns:
        return None, "the prompt is not a non-empty list of turns"
    checked, why = check_turns(list(turns) + [{"role": "assistant", "content": "x"}])
    return (checked[:-1], None) if checked else (None, why)


def check_turns(messages) -> Tuple[Optional[Turns], Optional[str]]:
    if not isinstance(messages, list) or not messages:
        return None, "'messages' is not a non-empty list"
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return None, f"message {i} has no string 'content'"
        if m.get("role") not in ROLES:
            return None, f"message {i} has role {m.get('role')!r}, not one of {', '.join(ROLES)}"
        if m["role"] == "system" and i != 0:
            return None, f"message {i}: a system message must come first"
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
        return None, "the conversation does not end with a non-empty assistant turn"
    # an empty reply earlier on would teach the model to answer with nothing; with
    # tokenizers that merge whitespace runs it cannot even be split into turns
    for i, m in enumerate(out[:-1]):
        if m["role"] == "assistant" and not m["content"].strip():
            return None, f"message {i}: an empty assistant turn"
    if not any(m["role"] == "user" for m in out):
        return None, "the conversation has no user turn"
    return out, None


def parse_hh(transcript: str) -> Optional[Turns]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> turns; None when it is not that shape."""
    if not isinstance(transcript, str):
        return None
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript.lstrip("\n")
    parts = _HH.split(text)
    if parts[0].strip() or len(parts) < 3:
        return None
    turns = []
    for who, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if who == "Human" else "assistant", "content": content.strip()})
    return turns


def preference_example(rec) -> Tuple[Optional[Dict], Optional[str]]:
    if not isinstance(rec, dict):
        return None, "record is not an object"
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return None, "'chosen' and 'rejected' must both be strings"
    if "prompt" in rec:
        prompt = rec["prompt"]
        if isinstance(prompt, str):
            turns = [{"role": "user", "content": prompt.strip()}] if prompt.strip() else None
        else:
            turns = opening_turns(prompt)[0]
        if not turns:
            return None, "'prompt' is empty or not a string / list of turns"
        if not chosen.strip() or not rejected.strip():
            return None, "empty 'chosen' or 'rejected' response"
        if chosen.strip() == rejected.strip():
            return None, "'chosen' and 'rejected' are identical"
        return {"prompt": turns, "chosen": chosen.strip(), "rejected": rejected.strip()}, None
    a, b = parse_hh(chosen), parse_hh(rejected)
    if a is None or b is None:
        return None, "not '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts and no 'prompt' field"
    if a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
        return None, "a transcript does not end with an assistant reply"
    if a[:-1] != b[:-1]:
        return None, "chosen and rejected transcripts differ before the last reply"
    if not a[-1]["content"] or not b[-1]["content"]:
        return None, "empty final reply"
    if a[-1]["content"] == b[-1]["content"]:
        return None, "'chosen' and 'rejected' replies are identical"
    return {"prompt": a[:-1], "chosen": a[-1]["content"], "rejected": b[-1]["content"]}, None
