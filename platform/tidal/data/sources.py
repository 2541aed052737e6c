"""Reading sources into documents: ``{"source", "unit", "text", "error"}`` rows.

Each file becomes a Ray Data task that streams its records; a record that cannot be
read (bad UTF-8, a jsonl line that is not JSON, a missing text field) becomes a row with an
``error`` and no text, so the pipeline counts and sets it aside instead of failing.
"""
from __future__ import annotations

import gzip
import io
import json
import re
from typing import Dict, Iterator, List, Tuple

from tidal.config.schema import DataConfig, SourceConfig
from tidal.data import io as tio
from tidal.data.corpus import embedded_docs



def detect_format(uri: str, configured: str) -> str:
    if configured != "auto":
        return configured
    name = uri.lower()
    for suffix in (".gz", ".zst", ".zstd"):
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _open_bytes(uri: str) -> bytes:
    data = tio.read_bytes(uri)
    lower = uri.lower()
    if lower.endswith(".gz"):
        return gzip.decompress(data)
    if lower.endswith((".zst", ".zstd")):
        import zstandard  # optional dependency

        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return data


def _row(source: str, unit: int, text: str = "", error: str = "", input_index: int = 0) -> Dict:
    """A document. ``doc_id`` orders documents globally (input file, then position in it)
    and identifies them in the curation report and dedup clusters."""
    return {"doc_id": (input_index << 32) | unit, "source": source, "unit": unit, "text": text,
            "error": error}


def _decode_units(raw: bytes, unit: str) -> Iterator[tuple]:
    """``(index, text or None)`` per unit; a unit with invalid UTF-8 is None (set aside
    alone: one bad byte does not cost the whole file)."""
    raw = raw.replace(b"\r\n", b"\n")
    if unit == "file":
        pieces = [raw]
    elif unit == "paragraph":
        pieces = re.split(rb"\n[ \t]*\n", raw)
    else:
        pieces = raw.split(b"\n")
    for i, piece in enumerate(pieces):
        try:
            yield i, piece.decode("utf-8")
        except UnicodeDecodeError:
            yield i, None


def _text_units(uri: str, raw: bytes, unit: str) -> Iterator[Dict]:
    for i, piece in _decode_units(raw, unit):
        if piece is None:
            yield _row(uri, i, error="invalid utf-8")
        elif piece.strip():
            yield _row(uri, i, piece.strip("\n"))


def _jsonl_units(uri: str, raw: bytes, field: str) -> Iterator[Dict]:
    stripped = raw.lstrip()
    if stripped.startswith(b"["):  # a JSON list of records (e.g. Alpaca)
        try:
            records = json.loads(raw)
        except ValueError as e:
            yield _row(uri, 0, error=f"not valid JSON: {e}")
            return
        lines = [(i, r) for i, r in enumerate(records)]
    else:
        lines = []
        for i, line in enumerate(raw.split(b"\n")):
            if not line.strip():
                continue
            try:
                lines.append((i, json.loads(line)))
            except ValueError:
                yield _row(uri, i, error="line is not JSON")
    for i, rec in lines:
        value = rec.get(field) if isinstance(rec, dict) else None
        if not isinstance(value, str):
            yield _row(uri, i, error=f"record has no string field '{field}'")
        else:
            yield _row(uri, i, value)


def _parquet_units(uri: str, field: str) -> Iterator[Dict]:
    import pyarrow.parquet as pq

    fs, path = tio.resolve(uri)
    table = pq.read_table(path, filesystem=fs, columns=[field])
    for i, value in enumerate(table.column(field).to_pylist()):
        if isinstance(value, str):
            yield _row(uri, i, value)
        else:
            yield _row(uri, i, error=f"record has no string field '{field}'")


def read_file(item: Dict, cfg: SourceConfig) -> List[Dict]:
    """Ray Data ``flat_map`` body: all documents of one file, or one error row."""
    uri = item["uri"]
    fmt = detect_format(uri, cfg.format)
    try:
        if fmt == "parquet":
            rows = list(_parquet_units(uri, cfg.text_field))
        else:
            raw = _open_bytes(uri)
            rows = list(_jsonl_units(uri, raw, cfg.text_field) if fmt == "jsonl" else
                        _text_units(uri, raw, cfg.text_unit))
    except (OSError, EOFError, ValueError) as e:  # truncated gzip, unreadable file
        rows = [_row(uri, 0, error=f"unreadable file: {type(e).__name__}: {e}")]
    for r in rows:
        r["doc_id"] |= item["index"] << 32
        r["mix"] = item["mix"]
    return rows


def source_groups(cfg: DataConfig) -> List[SourceConfig]:
    """The named sources to read: the mixture, or the data config's own sources as one."""
    if cfg.mixture:
        return list(cfg.mixture)
    return [SourceConfig(name=cfg.name, sources=list(cfg.sources), format=cfg.format,
                         text_field=cfg.text_field, text_unit=cfg.text_unit)]


def list_inputs(cfg: DataConfig) -> List[Tuple[str, int]]:
    """Every input as ``(uri, group index)``, expanded: embedded corpora by name, files of
    each path, directory or glob in sorted order."""
    out: List[Tuple[str, int]] = []
    for g, group in enumerate(source_groups(cfg)):
        for src in group.sources:
            if src.startswith("embedded:"):
                out.append((src, g))
                continue
            files = tio.expand(src)
            if not files:
                raise FileNotFoundError(f"data source '{src}' matched no files")
            out.extend((f, g) for f in files)
    return out


def documents(cfg: DataConfig, inputs: List[Tuple[str, int]]):
    """A Ray Dataset of document rows over ``inputs`` (order preserved); each row's ``mix``
    names its source group."""
    import ray.data

    datasets = []
    for g, group in enumerate(source_groups(cfg)):
        files = []
        for i, (src, gi) in enumerate(inputs):
            if gi != g:
                continue
            if src.startswith("embedded:"):
                docs = [dict(_row(sid, k, text, input_index=i), mix=group.name)
                        for k, (sid, text) in enumerate(embedded_docs(src.split(":", 1)[1]))]
                datasets.append(ray.data.from_items(docs, override_num_blocks=8))
            else:
                files.append({"uri": src, "index": i, "mix": group.name})
        if files:  # one task per file, read with this group's format and text field
            ds = ray.data.from_items(files, override_num_blocks=len(files))
            datasets.append(ds.flat_map(read_file, fn_kwargs={"cfg": group}))
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])
