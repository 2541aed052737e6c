"""Prompts for RL: every record format and its metadata, records set aside by reason,
too-long prompts, the chat template with its generation prompt, the deterministic split, the
embedded default, atomic (and checked) files, and reuse / re-preparation by ensure_post_data."""
import hashlib
import json
import os
from types import SimpleNamespace

import pytest

from tidal.config import TokenizerConfig
from tidal.config.schema_rl import PromptDataConfig
from tidal.data import DataError
from tidal.rlhf.prompts import TOO_LONG, prepare_prompts, prompt_example, read_prompts

QUIET = dict(log=lambda *a: None)
GEN = "<|im_start|>assistant\n"  # ChatML's generation prompt (a base tokenizer gets ChatML)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tidal.data.tokenizer import train_bpe

    d = str(tmp_path_factory.mktemp("prompt_tok"))
    words = ("Explain what a Python list is. Name a king of England. The user asks, the "
             "assistant answers. What else does the documentation say about assert?")
    train_bpe([words] * 40, TokenizerConfig(vocab_size=320), d)
    return d


def _jsonl(path, records, extra=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + extra)
    return str(path)


def _cfg(path, **kw):
    return PromptDataConfig(name="p", sources=[path], **{"seq_len": 64, **kw})


def _all(out):
    return read_prompts(out, "train") + read_prompts(out, "val")


SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Name a king."}
REPLY = {"role": "assistant", "content": "Richard."}
RECORDS = [
    # chat: the last assistant reply is what the policy writes; without one, every turn
    {"messages": [SYSTEM, USER, REPLY], "answer": "Richard", "id": 1},
    {"messages": [USER, REPLY, {"role": "user", "content": "Another?"}], "id": 2},
    # Alpaca: instruction + input, the output left out
    {"instruction": "Add", "input": "2 and 3", "output": "5", "answer": 5, "id": 3},
    {"instruction": "Name a colour.", "output": "Red", "id": 4, "tags": ["easy", {"k": None}]},
    # plain prompts: a string or a list of turns (a completion / response is not metadata)
    {"prompt": "What is a list?", "completion": "A sequence.", "target": "sequence", "id": 5},
    {"prompt": [SYSTEM, USER], "response": "x", "id": 6},
    # HH-RLHF: the dialogue before the last Assistant reply
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: A pun.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: No.", "id": 7},
]
EXPECTED = {
    1: ([SYSTEM, USER], {"answer": "Richard", "id": 1}),
    2: ([USER, REPLY, {"role": "user", "content": "Another?"}], {"id": 2}),
    3: ([{"role": "user", "content": "Add\n\n2 and 3"}], {"answer": 5, "id": 3}),
    4: ([{"role": "user", "content": "Name a colour."}], {"id": 4, "tags": ["easy", {"k": None}]}),
    5: ([{"role": "user", "content": "What is a list?"}], {"target": "sequence", "id": 5}),
    6: ([SYSTEM, USER], {"id": 6}),
    7: ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
         {"role": "user", "content": "Joke?"}], {"id": 7}),
}


def test_every_format_gives_its_prompt_and_metadata():
    for rec in RECORDS:
        ex, why = prompt_example(rec)
        assert why is None, (rec, why)
        assert (ex["turns"], ex["meta"]) == EXPECTED[rec["id"]], rec
    # an HH transcript that ends with the Human's turn is all prompt
    ex, _ = prompt_example({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?"})
    assert ex["turns"] == EXPECTED[7][0]


def test_prepared_prompts_carry_their_metadata(tmp_path, tok_dir):
    from tidal.data.chat import render
    from tidal.data.tokenizer import load

    out = str(tmp_path / "out")
    m = prepare_prompts(_cfg(_jsonl(tmp_path / "p.jsonl", RECORDS)), tok_dir, out, **QUIET)
    prompts = _all(out)
    assert m["kind"] == "prompts" and m["counts"]["records"] == 7 and not m["counts"]["malformed"]
    assert m["counts"]["train"]["prompts"] + m["counts"]["val"]["prompts"] == 7 == len(prompts)
    tok = load(os.path.join(out, "tokenizer"))
    by_id = {p["meta"]["id"]: p for p in prompts}
    for i, (turns, meta) in EXPECTED.items():
        assert by_id[i]["meta"] == meta
        assert by_id[i]["text"] == render(tok, turns, add_generation_prompt=True)


BAD = [({"messages": [{"role": "robot", "content": "Hi"}]}, "role 'robot'"),
       ({"messages": [REPLY]}, "not a non-empty list of turns"),
       ({"messages": [USER, REPLY, REPLY]}, "does not end with a non-empty user turn"),
       ({"instruction": "  ", "output": "x"}, "missing or empty 'instruction'"),
       ({"instruction": "Add", "input": 3}, "'input' is not a string"),
       ({"prompt": " "}, "empty 'prompt'"),
       ({"prompt": 7}, "not a non-empty list of turns"),
       ({"chosen": "no markers"}, "not a '\\n\\nHuman: ..."),
       ({"text": "nothing"}, "no messages, instruction, prompt or chosen"),
       ("a string", "record is not an object")]


def test_malformed_records_are_counted_by_reason_and_set_aside(tmp_path, tok_dir):
    for rec, reason in BAD:
        ex, why = prompt_example(rec)
        assert ex is None and reason in why, (rec, why)
    path = _jsonl(tmp_path / "p.jsonl", RECORDS + [r for r, _ in BAD], extra=b"{not json\n")
    m = prepare_prompts(_cfg(path), tok_dir, str(tmp_path / "out"), **QUIET)
    bad = m["counts"]["malformed"]
    assert sum(bad.values()) == len(BAD) + 1 and m["counts"]["records"] == 7 + len(BAD) + 1
    assert bad["line is not JSON"] == 1 and bad["record is not an object"] == 1, bad
    assert m["inputs"][0]["set_aside"] == bad  # and against the file they came from
    assert len(_all(str(tmp_path / "out"))) == 7
    # nothing usable at all: one clear error naming the file and the reasons
    only_bad = _jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD])
    with pytest.raises(DataError, match="no usable examples") as e:
        prepare_prompts(_cfg(only_bad), tok_dir, str(tmp_path / "out2"), **QUIET)
    assert only_bad in str(e.value) and "role 'robot'" in str(e.value)


def test_too_long_prompts_are_counted_and_set_aside(tmp_path, tok_dir):
    recs = [{"prompt": "Name a king."}, {"prompt": "Name a king. " * 40}, {"prompt": "What is a list?"}]
    m = prepare_prompts(_cfg(_jsonl(tmp_path / "p.jsonl", recs), seq_len=24), tok_dir,
                        str(tmp_path / "out"), **QUIET)
    assert m["counts"]["too_long"] == 1 and m["inputs"][0]["set_aside"] == {TOO_LONG: 1}
    prompts = _all(str(tmp_path / "out"))
    assert len(prompts) == 2 and all(len(p["ids"]) <= 24 for p in prompts)
    assert m["counts"]["train"]["max_tokens"] <= 24
    with pytest.raises(DataError, match="too long"):  # every prompt too long: nothing usable
        prepare_prompts(_cfg(_jsonl(tmp_path / "p.jsonl", recs), seq_len=4), tok_dir,
                        str(tmp_path / "out2"), **QUIET)


def test_chat_template_with_generation_prompt_as_sft_renders(tmp_path, tok_dir):
    from tidal.data.chat import encode_conversation, render
    from tidal.data.tokenizer import load

    out = str(tmp_path / "out")
    m = prepare_prompts(_cfg(_jsonl(tmp_path / "p.jsonl", RECORDS[:1])), tok_dir, out, **QUIET)
    (p,) = read_prompts(out)
    tok = load(os.path.join(out, "tokenizer"))
    assert tok.chat_template == m["tokenizer"]["chat_template"] and m["tokenizer"]["added_chat_tokens"]
    assert p["text"].endswith(GEN) and p["text"].startswith("<|im_start|>system\nBe brief.")
    assert p["ids"] == tok(p["text"], add_special_tokens=False)["input_ids"]
    assert tok.decode(p["ids"]) == p["text"]
    # the SFT encoding of the whole conversation starts with exactly these ids: the policy
    # continues the prompt where the SFT model learned to answer
    ids, _ = encode_conversation(tok, [SYSTEM, USER, REPLY])
    assert ids[:len(p["ids"])] == p["ids"] and render(tok, [SYSTEM, USER, REPLY]).startswith(p["text"])
    # a template of one's own is used as given
    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
             "{% if add_generation_prompt %}[assistant] {% endif %}"
    prepare_prompts(_cfg(_jsonl(tmp_path / "p.jsonl", RECORDS[:1]), chat_template=custom), tok_dir,
                    str(tmp_path / "custom"), **QUIET)
    assert read_prompts(str(tmp_path / "custom"))[0]["text"] == "[system] Be brief.\n[user] Name a king.\n[assistant] "


def test_split_is_deterministic_in_the_seed(tmp_path, tok_dir):
    recs = [{"prompt": f"Name king number {i}.", "id": i} for i in range(40)]
    path = _jsonl(tmp_path / "p.jsonl", recs)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = str(tmp_path / name)
        m = prepare_prompts(_cfg(path, seed=seed, val_fraction=0.25), tok_dir, out, **QUIET)
        runs[name] = (m["prompt_hash"], [[p["meta"]["id"] for p in read_prompts(out, s)] for s in ("train", "val")])
    assert runs["a"] == runs["b"]
    train, val = runs["a"][1]
    assert sorted(train + val) == list(range(40)) and 3 <= len(val) <= 20
    assert runs["c"][0] != runs["a"][0] and set(runs["c"][1][1]) != set(val)  # another seed, another split


def test_embedded_default_gives_the_sft_instructions_as_prompts(tmp_path, tok_dir):
    from tidal.data.sft import pydocs_instructions

    out = str(tmp_path / "out")
    cfg = PromptDataConfig(limit=60)
    assert cfg.sources == ["embedded:pydocs_instruct"]
    m = prepare_prompts(cfg, tok_dir, out, **QUIET)
    prompts = _all(out)
    assert len(prompts) == 60 - m["counts"]["too_long"] >= 50 and m["counts"]["val"]["prompts"] >= 1
    wanted = {r["instruction"] for r in pydocs_instructions()[:60]}
    asked = {p["text"].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0] for p in prompts}
    assert asked <= wanted and all(p["text"].endswith(GEN) and p["meta"] == {} for p in prompts)


def test_files_are_written_atomically_and_checked(tmp_path, tok_dir, monkeypatch):
    from tidal.data import io as tio

    out = str(tmp_path / "out")
    path = _jsonl(tmp_path / "p.jsonl", RECORDS)
    prepare_prompts(_cfg(path), tok_dir, out, **QUIET)
    before = {n: (tmp_path / "out" / n).read_bytes() for n in ("train.jsonl", "val.jsonl")}
    # a preparation that dies while writing a split leaves the old file whole (and no manifest)
    _jsonl(tmp_path / "p.jsonl", RECORDS + [{"prompt": "What is a tuple?", "id": 8}])

    real = os.replace

    def crash(src, dst):
        if str(dst).endswith("train.jsonl"):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(tio.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        prepare_prompts(_cfg(path), tok_dir, out, **QUIET)
    monkeypatch.undo()
    assert {n: (tmp_path / "out" / n).read_bytes() for n in before} == before
    with pytest.raises(DataError, match="no manifest.json"):
        read_prompts(out)
    # a completed preparation; then a damaged file is refused, not half read
    m = prepare_prompts(_cfg(path), tok_dir, out, **QUIET)
    assert len(_all(out)) == 8
    train = tmp_path / "out" / "train.jsonl"
    train.write_bytes(train.read_bytes()[:-9])
    with pytest.raises(DataError, match="SHA-256"):
        read_prompts(out)
    # a line that is not a prompt is refused even with a matching hash
    bad = b'{"ids": "x", "text": "t", "meta": {}}\n'
    m["files"]["train"].update(sha256=hashlib.sha256(bad).hexdigest(), prompts=1)
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(m))
    train.write_bytes(bad)
    with pytest.raises(DataError, match="line 1: 'ids'"):
        read_prompts(out)


def test_ensure_post_data_reuses_and_prepares_again(tmp_path, tok_dir):
    from tidal.data.ready import ensure_post_data

    path = _jsonl(tmp_path / "p.jsonl", RECORDS)
    cfg = SimpleNamespace(model=SimpleNamespace(pretrained=tok_dir), data=_cfg(path))
    lines = []
    d, m = ensure_post_data(cfg, str(tmp_path / "store"), "prompts", log=lines.append)
    assert m["kind"] == "prompts" and d.startswith(str(tmp_path / "store")) and len(_all(d)) == 7
    assert any("no prepared prompts data" in x for x in lines)
    lines.clear()
    d2, m2 = ensure_post_data(cfg, str(tmp_path / "store"), "prompts", log=lines.append)
    assert (d2, m2) == (d, m) and not lines  # reused as it was
    _jsonl(tmp_path / "p.jsonl", RECORDS[:5])
    with pytest.raises(DataError, match="resumes from"):  # a resumed run never gets other prompts
        ensure_post_data(cfg, str(tmp_path / "store"), "prompts", log=lines.append, resuming="ckpt")
    d3, m3 = ensure_post_data(cfg, str(tmp_path / "store"), "prompts", log=lines.append)
    assert d3 == d and any("changed since it was prepared" in x for x in lines)
    assert len(_all(d)) == 5 and m3["prompt_hash"] != m["prompt_hash"]
    # another config pointed at the same directory is refused; SFT data is not taken for prompts
    other = SimpleNamespace(model=cfg.model, data=_cfg(path, seq_len=50, output_dir=d))
    with pytest.raises(ValueError, match="another config"):
        ensure_post_data(other, str(tmp_path / "store"), "prompts", **QUIET)
    same = SimpleNamespace(model=cfg.model, data=_cfg(path, output_dir=d))
    with pytest.raises(ValueError, match="another config"):
        ensure_post_data(same, str(tmp_path / "store"), "sft", **QUIET)
    with pytest.raises(ValueError, match="data kind 'nope'"):
        ensure_post_data(cfg, str(tmp_path / "store"), "nope", **QUIET)
