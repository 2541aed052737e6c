"""Reading sources into documents: ``{"source", "unit", "text", "error"}`` rows.

Each file becomes a Ray Data task that streams its records; a record that cannot be
read (bad UTF-8, a jsonl line that is not JSON, a missing text field) becomes a row with an
``error`` and no text, so the pipeline counts and sets it aside instead of failing. A file
that cannot be used at all (damaged compression, empty, binary) is one such row. The SFT
and preference readers (``tidal.data.sft``) use the same file and JSON helpers.
"""
from __future__ import annotations

import gzip
import json
import re
import zlib
from typing import Dict, Iterator, List, Optional, Tuple

from tidal.config.schema import DataConfig, SourceConfig
from tidal.data import io as tio
from tidal.data.corpus import embedded_docs
from tidal.data import MissingInput

# git's rule for "binary": a NUL byte near the start. Text in UTF-8 never has one; images,
# archives, pickles and UTF-16 files almost always do within the first few KB.
BINARY_PROBE = 8000
EMPTY, BINARY = "empty file", "binary file (not UTF-8 text)"
TOO_DEEP = "JSON nested too deeply"


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


class CorruptFile(ValueError):
    """A compressed file whose stream is damaged or cut short."""


def _unzstd(data: bytes) -> bytes:
    """Every frame of a .zst file. Decompression objects are used frame by frame because
    zstandard's stream reader returns what it has, silently, for a truncated frame."""
    import zstandard

    out = []
    try:
        while data:
            frame = zstandard.ZstdDecompressor().decompressobj()
            out.append(frame.decompress(data))
            if not frame.eof:
                raise CorruptFile("zstd stream ends inside a frame (truncated file)")
            data = frame.unused_data
    except zstandard.ZstdError as e:
        raise CorruptFile(f"ZstdError: {e}") from e
    return b"".join(out)


def _decompress(uri: str, data: bytes) -> bytes:
    lower = uri.lower()
    if lower.endswith(".gz"):
        return gzip.decompress(data)
    if lower.endswith((".zst", ".zstd")):
        return _unzstd(data)
    return data


def _describe(e: BaseException) -> str:
    if isinstance(e, CorruptFile):
        return str(e)
    name = "zlib.error" if isinstance(e, zlib.error) else type(e).__name__
    return f"{name}: {e}"


def read_raw(uri: str) -> Tuple[bytes, str]:
    """A text or JSON file's bytes, decompressed (.gz, .zst), and ``""``; or ``b""`` and why
    the file cannot be used: unreadable (missing, damaged or truncated compression), empty,
    or binary. Parquet files are read by pyarrow instead."""
    try:
        data = _decompress(uri, tio.read_bytes(uri))
    # OSError: I/O failures and BadGzipFile; EOFError: truncated gzip; zlib.error: a corrupt
    # deflate block (not an OSError); CorruptFile: a damaged or truncated zstd stream
    except (OSError, EOFError, zlib.error, CorruptFile) as e:
        return b"", f"unreadable file: {_describe(e)}"
    if not data or data.isspace():
        return b"", EMPTY
    if b"\0" in data[:BINARY_PROBE]:
        return b"", BINARY
    return data, ""


def _loads(text: bytes) -> Tuple[object, Optional[str]]:
    """``(value, None)`` or ``(None, why)``. Untrusted JSON can nest deeper than the parser's
    recursion limit (``"[" * 100000``), which raises RecursionError, not ValueError."""
    try:
        return json.loads(text), None
    except RecursionError:
        return None, TOO_DEEP
    except ValueError as e:  # includes UnicodeDecodeError
        return None, str(e)


def json_records(raw: bytes) -> Iterator[Tuple[int, object, str]]:
    """``(unit, record, error)`` for every record of a JSON list (e.g. Alpaca) or a JSONL
    file; a line that is not JSON is set aside alone, a broken JSON list as a whole."""
    if re.match(rb"\s*\[", raw):  # (no copy of a large file, unlike lstrip)
        records, why = _loads(raw)
        if why is not None:
            yield 0, None, why if why == TOO_DEEP else f"not valid JSON: {why}"
            return
        yield from ((i, r, "") for i, r in enumerate(records))
        return
    for i, line in enumerate(raw.split(b"\n")):
        if not line.strip():
            continue
        rec, why = _loads(line)
        if why is not None and why != TOO_DEEP:
            why = "line is not JSON"  # the parser's detail would make one reason per line
        yield i, rec, why or ""


def reasons_text(reasons: Dict[str, int]) -> str:
    """``{"empty file": 1, "line is not JSON": 3}`` -> ``"empty file, line is not JSON (3)"``."""
    return ", ".join(r if n == 1 else f"{r} ({n:,})" for r, n in reasons.items())


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
    for i, rec, error in json_records(raw):
        value = rec.get(field) if isinstance(rec, dict) else None
        if error:
            yield _row(uri, i, error=error)
        elif not isinstance(value, str):
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


def _file_rows(uri: str, cfg: SourceConfig) -> List[Dict]:
    fmt = detect_format(uri, cfg.format)
    if fmt == "parquet":
        return list(_parquet_units(uri, cfg.text_field))
    raw, problem = read_raw(uri)
    if problem:
        return [_row(uri, 0, error=problem)]
    return list(_jsonl_units(uri, raw, cfg.text_field) if fmt == "jsonl" else
                _text_units(uri, raw, cfg.text_unit))


def read_file(item: Dict, cfg: SourceConfig) -> List[Dict]:
    """Ray Data ``flat_map`` body: all documents of one file, or one error row."""
    uri = item["uri"]
    try:
        rows = _file_rows(uri, cfg)
    except (OSError, ValueError) as e:  # an unreadable or damaged parquet file
        rows = [_row(uri, 0, error=f"unreadable file: {_describe(e)}")]
    # a file that yields nothing is still counted: an input silently contributing no
    # documents is how a wrong path or an export bug goes unnoticed
    rows = rows or [_row(uri, 0, error=EMPTY)]
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
                raise MissingInput(f"data source '{src}' matched no files")
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
