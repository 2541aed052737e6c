"""What a manifest records about its inputs, and whether they still match.

Prepared shards may be reused only while the files they were made from are unchanged.
Each file input is recorded with its SHA-256, its size and its modification time (what
pyarrow's ``FileInfo`` gives, for local files and object stores alike); embedded corpora
with the Python version that produced them. Checking is cheap in the common case: a file
whose size and time are as recorded is not read. A changed time alone does not make a file
stale (a copy, a ``touch``, a checkout): only a different hash does.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import pyarrow.fs as pafs

from tidal.data import io as tio
from tidal.data.corpus import embedded_version

EMBEDDED = "embedded:"


def _stat(uri: str) -> Optional[pafs.FileInfo]:
    """The file's info, or None when it is not (or no longer) a file."""
    fs, path = tio.resolve(uri)
    info = fs.get_file_info(path)
    return info if info.type == pafs.FileType.File else None


def describe_file(uri: str) -> Dict:
    """``{"sha256", "bytes", "mtime_ns"}`` for a manifest's input entry. The time is taken
    before the content is hashed: a file rewritten meanwhile then shows a newer time than
    recorded and is hashed again at the next check, never passed as unchanged."""
    info = _stat(uri)
    digest, size = tio.sha256_file(uri)
    return {"sha256": digest, "bytes": size, "mtime_ns": info.mtime_ns if info else None}


def describe_embedded(uri: str) -> Dict:
    return {"uri": uri, "version": embedded_version()}


def _file_change(entry: Dict) -> Optional[str]:
    """Why a recorded file input no longer matches, or None when it does."""
    uri = entry["uri"]
    info = _stat(uri)
    if info is None:
        return f"{uri}: missing"
    if entry.get("bytes") is not None and info.size != entry["bytes"]:
        return f"{uri}: size changed ({entry['bytes']} -> {info.size} bytes)"
    if entry.get("mtime_ns") is not None and info.mtime_ns == entry["mtime_ns"]:
        return None  # same size and time: not read again
    # a new time, or an old manifest without one: the content decides
    if entry.get("sha256") and tio.sha256_file(uri)[0] != entry["sha256"]:
        return f"{uri}: content changed (sha256 differs)"
    return None


def _embedded_change(entry: Dict) -> Optional[str]:
    # manifests written before versions were recorded for post-training sets have none:
    # nothing to compare, so they are taken as matching
    then, now = entry.get("version"), embedded_version()
    if then is not None and then != now:
        return f"{entry['uri']}: built from {then}, now {now}"
    return None


def _configured_sources(data_cfg) -> List[str]:
    """The sources a data config names: a mixture's groups, or its own list."""
    groups = getattr(data_cfg, "mixture", None)
    if groups:
        return [s for g in groups for s in g.sources]
    return list(data_cfg.sources)


def _new_inputs(recorded: set, data_cfg) -> List[str]:
    """Files the config's sources match now that the manifest does not list, expanded as
    ``sources.list_inputs`` and ``sft.read_examples`` expand them (file, directory, glob)."""
    out = []
    for src in _configured_sources(data_cfg):
        if src.startswith(EMBEDDED):
            continue
        files = tio.expand(src)
        if not files:
            out.append(f"data source {src!r} matches no files now")
        out += [f"{f}: new input (matched by data source {src!r}, not in the manifest)"
                for f in files if f not in recorded]
    return out


def changed_inputs(manifest: Dict, data_cfg=None) -> List[str]:
    """One human-readable reason per input that no longer matches what ``manifest``
    recorded (missing, resized, new content, another embedded corpus version), plus, when
    ``data_cfg`` is given, every file its sources match now that the manifest lacks. An
    empty list means the prepared shards are still made from these inputs."""
    reasons = []
    for entry in manifest.get("inputs", []):
        change = _embedded_change(entry) if entry["uri"].startswith(EMBEDDED) else _file_change(entry)
        if change:
            reasons.append(change)
    # with data.limit the reading stopped early: files past the limit were never read, so
    # their absence from the manifest says nothing
    if data_cfg is not None and getattr(data_cfg, "limit", None) is None:
        reasons += _new_inputs({e["uri"] for e in manifest.get("inputs", [])}, data_cfg)
    return reasons
