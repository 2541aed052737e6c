"""Exports never destroy what tidal did not write, and a crash never leaves a mix."""
import hashlib
import json
import multiprocessing
import os

import pytest

from tidal.train import publish
from tidal.train.publish import ExportRefused


def _tree(root):
    """{relative path: sha256} of every file under root."""
    out = {}
    for base, _, names in os.walk(root):
        for n in names:
            p = os.path.join(base, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _writer(content):
    def write(local):
        with open(os.path.join(local, "model.safetensors"), "w") as f:
            f.write(content)
        os.makedirs(os.path.join(local, "sub"))
        with open(os.path.join(local, "sub", "config.json"), "w") as f:
            json.dump({"v": content}, f)
    return write


def test_a_foreign_directory_is_refused_and_left_byte_identical(tmp_path):
    dest = tmp_path / "outputs"
    (dest / "run-a").mkdir(parents=True)
    (dest / "run-a" / "metrics.jsonl").write_text('{"step": 1}\n')
    (dest / "notes.txt").write_text("mine")
    before = _tree(dest)
    with pytest.raises(ExportRefused, match="not a tidal export.*overwrite=true"):
        publish.publish(str(dest), _writer("new"))
    assert _tree(dest) == before
    assert sorted(os.listdir(tmp_path)) == ["outputs"]  # no temporary left behind

    # overwrite=true: the export goes in, the foreign files are moved aside, not deleted
    publish.publish(str(dest), _writer("new"), overwrite=True, log=lambda m: None)
    aside = [p for p in os.listdir(tmp_path) if p.startswith("outputs.replaced-")]
    assert len(aside) == 1 and _tree(tmp_path / aside[0]) == before
    assert publish.export_problems(str(dest)) == []


def test_a_previous_export_is_replaced_and_verifies(tmp_path):
    dest = str(tmp_path / "hf")
    publish.publish(dest, _writer("one"))
    marker = json.load(open(os.path.join(dest, publish.MARKER)))
    assert set(marker["files"]) == {"model.safetensors", "sub/config.json"}
    publish.publish(dest, _writer("two"))
    assert open(os.path.join(dest, "model.safetensors")).read() == "two"
    assert publish.export_problems(dest, full=True) == []
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    # an empty directory is fine too
    empty = tmp_path / "empty"
    empty.mkdir()
    publish.publish(str(empty), _writer("x"))
    assert publish.export_problems(str(empty)) == []


def _die_between_renames(dest):
    real = os.replace
    calls = []

    def replace(a, b):
        calls.append((a, b))
        real(a, b)
        if len(calls) == 1:  # the old export is aside, the new one not yet in: die here
            os._exit(9)
    os.replace = replace
    publish.publish(dest, _writer("new"))


def test_death_between_the_renames_keeps_the_previous_export(tmp_path):
    dest = str(tmp_path / "hf")
    publish.publish(dest, _writer("old"))
    proc = multiprocessing.get_context("fork").Process(target=_die_between_renames, args=(dest,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9
    assert not os.path.exists(dest)  # the window the crash hit
    assert os.path.isdir(dest + publish.PREVIOUS)
    # the next reader (or export) puts the previous export back, complete and intact
    assert publish.check_readable(dest) == []
    assert open(os.path.join(dest, "model.safetensors")).read() == "old"
    assert publish.export_problems(dest, full=True) == []
    leftovers = [p for p in os.listdir(tmp_path) if p != "hf"]
    assert leftovers == []  # the dead export's temporary directory was its own: cleared


def test_readers_refuse_unfinished_or_damaged_exports(tmp_path):
    dest = tmp_path / "hf"
    publish.publish(str(dest), _writer("ok"))
    (dest / "model.safetensors").write_text("truncat")
    assert "model.safetensors: 7 bytes, exported 2 (truncated" in publish.check_readable(str(dest))[0]

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    (partial / publish.PARTIAL).write_text("")
    assert "unfinished tidal export" in publish.check_readable(str(partial))[0]
    # an export may replace its own unfinished attempt
    publish.publish(str(partial), _writer("done"))
    assert publish.check_readable(str(partial)) == []

    foreign = tmp_path / "someone-elses-model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    assert publish.check_readable(str(foreign)) == []  # any HF directory tidal did not write


def test_an_export_with_files_someone_added_is_not_replaced_silently(tmp_path):
    dest = tmp_path / "hf"
    publish.publish(str(dest), _writer("one"))
    (dest / "MODEL_CARD.md").write_text("my notes")
    with pytest.raises(ExportRefused, match="added to one"):
        publish.publish(str(dest), _writer("two"))
    assert (dest / "MODEL_CARD.md").read_text() == "my notes"
    publish.publish(str(dest), _writer("two"), overwrite=True, log=lambda m: None)
    aside = [p for p in os.listdir(tmp_path) if p.startswith("hf.replaced-")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "MODEL_CARD.md").read_text() == "my notes"


def test_a_marker_cannot_name_files_outside_the_export(tmp_path):
    dest = tmp_path / "hf"
    publish.publish(str(dest), _writer("one"))
    marker = json.load(open(dest / publish.MARKER))
    marker["files"]["../victim.txt"] = {"bytes": 1, "sha256": "0"}
    json.dump(marker, open(dest / publish.MARKER, "w"))
    (tmp_path / "victim.txt").write_text("v")
    assert publish.export_problems(str(dest)) == [
        f"an unfinished tidal export (no valid {publish.MARKER}): the export was interrupted"]
    assert (tmp_path / "victim.txt").read_text() == "v"
