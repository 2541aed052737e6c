"""Publishing an export directory (an HF model, a PEFT adapter) so that nothing is lost.

- A complete tidal export carries ``tidal_export.json``, written last: every file's size and
  SHA-256. Readers (``model.pretrained``, evaluation, the post-training jobs) refuse a tidal
  export that is unfinished or damaged (:func:`check_readable`); a directory tidal never
  wrote (any HF model) has no marker and is read as it is.
- An export replaces only an absent or empty destination or a tidal export (complete, or
  an unfinished one of its own) holding nothing but its own files. Anything else is
  refused unless ``overwrite`` is given, and even then it is moved aside
  (``<dest>.replaced-<time>``), never deleted: tidal removes only what it created. On object
  stores, where nothing can be moved aside safely, it is always refused.
- Locally the new export is written beside the destination and swapped in with two
  renames; a process that dies between them leaves ``<dest>.tidal-previous``, which the
  next export or reader puts back (:func:`recover`).
- On object stores (no rename) the files are uploaded under a temporary prefix, copied in
  under an in-progress sentinel, and the marker is written last.
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from typing import Callable, Dict, List, Optional

from tidal.data import io as tio

MARKER = "tidal_export.json"
PARTIAL = ".tidal-partial"  # present while an export is being written: the directory is tidal's
PREVIOUS = ".tidal-previous"
TMP = ".tidal-tmp-"


class ExportRefused(ValueError):
    """The destination holds something an export must not replace."""


def _listing(root: str) -> Dict[str, int]:
    """``{relative path: size}`` of every file under ``root`` (local or cloud)."""
    import pyarrow.fs as pafs

    fs, path = tio.resolve(root)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return {}
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    base = path.rstrip("/") + "/"
    return {i.path[len(base):]: i.size for i in infos if i.type == pafs.FileType.File}


def _safe_rel(rel) -> bool:
    parts = rel.split("/") if isinstance(rel, str) else [""]
    return not rel.startswith("/") and ".." not in parts and "" not in parts


def _marker(root: str) -> Optional[Dict]:
    """The export's completion record, when it is one (paths inside the export only)."""
    try:
        data = json.loads(tio.read_bytes(tio.join(root, MARKER)))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(
            _safe_rel(k) and isinstance(v, dict) and isinstance(v.get("bytes"), int)
            and isinstance(v.get("sha256"), str) for k, v in files.items()):
        return None
    return data


def export_problems(root: str, full: bool = False) -> Optional[List[str]]:
    """None when ``root`` is not a tidal export (no marker, no sentinel); else the list of
    problems (empty: complete and intact). ``full`` also compares every file's SHA-256."""
    marker = _marker(root)
    if marker is None:
        if tio.exists(tio.join(root, PARTIAL)) or tio.exists(tio.join(root, MARKER)):
            return [f"an unfinished tidal export (no valid {MARKER}): the export was interrupted"]
        return None
    return tio.listing_problems(root, marker["files"], full, "exported")


def check_readable(root: str) -> List[str]:
    """Problems that make ``root`` unusable as a model to start from or evaluate: an
    unfinished or damaged tidal export. A directory tidal did not write passes."""
    if not tio.is_cloud(root):
        recover(root)
    return export_problems(root) or []


def _kind(dest: str) -> str:
    """absent | empty | export (tidal's alone, complete or unfinished) | foreign (anything
    else, including an export someone added their own files to)."""
    listing = _listing(dest)
    if not listing:
        return "empty" if tio.exists(dest) else "absent"
    marker = _marker(dest)
    if marker is not None:
        extra = set(listing) - set(marker["files"]) - {MARKER, PARTIAL}
        return "foreign" if extra else "export"
    if PARTIAL in listing:
        return "export"
    return "foreign"


def check_destination(dest: str, overwrite: bool, key: str = "output") -> str:
    """Refuse (before any work) a destination an export may not replace; its kind."""
    if not tio.is_cloud(dest):
        recover(dest)
        if os.path.exists(dest) and not os.path.isdir(dest):
            raise ExportRefused(f"{key}: {dest} is a file, not a directory")
    kind = _kind(dest)
    if kind == "foreign" and tio.is_cloud(dest):
        raise ExportRefused(
            f"{key}: {dest} already holds files tidal did not export; nothing was written. "
            "Choose another (empty) prefix: on object stores nothing can be moved aside safely")
    if kind == "foreign" and not overwrite:
        raise ExportRefused(
            f"{key}: {dest} already holds files that are not a tidal export (or were added to "
            f"one) ({len(_listing(dest))} file(s)); nothing was written. Choose another output, "
            "or pass overwrite=true to move them aside (they are kept, never deleted)")
    return kind


def _write_marker(local: str, source: Optional[Dict]) -> Dict:
    files = {}
    for rel in sorted(_listing(local)):
        if rel in (MARKER, PARTIAL):
            continue
        digest, size = tio.sha256_file(os.path.join(local, rel))
        files[rel] = {"bytes": size, "sha256": digest}
    marker = {"format": "tidal-export", "version": 1, "created_at": time.time(),
              "source": source or {}, "files": files}
    return marker


def publish(dest: str, write: Callable[[str], None], overwrite: bool = False,
            source: Optional[Dict] = None, log=print) -> str:
    """Write an export with ``write(local_dir)`` and publish it at ``dest`` (see module doc)."""
    kind = check_destination(dest, overwrite)
    if tio.is_cloud(dest):
        local = tempfile.mkdtemp(prefix="tidal-export-")
    else:
        parent = os.path.dirname(os.path.abspath(dest))
        os.makedirs(parent, exist_ok=True)
        local = f"{dest}{TMP}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        os.makedirs(local)
    try:
        open(os.path.join(local, PARTIAL), "w").close()  # a leftover is recognisably tidal's
        write(local)
        marker = _write_marker(local, source)
        os.remove(os.path.join(local, PARTIAL))
        with open(os.path.join(local, MARKER), "w") as f:
            json.dump(marker, f, indent=1, sort_keys=True)
        if tio.is_cloud(dest):
            _publish_cloud(local, dest, marker, kind, log)
        else:
            _swap_local(local, dest, kind, log)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return dest


def _swap_local(local: str, dest: str, kind: str, log) -> None:
    aside = None
    if kind == "empty":
        os.rmdir(dest)
    elif kind == "foreign":
        aside = f"{dest}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(dest, aside)
        log(f"overwrite=true: moved the previous contents of {dest} to {aside} (kept)")
    elif kind == "export":
        aside = dest + PREVIOUS
        shutil.rmtree(aside, ignore_errors=True)  # a finished swap's leftover, tidal's own
        os.replace(dest, aside)
    os.replace(local, dest)  # a death before this line: recover() puts the previous one back
    if kind == "export":
        shutil.rmtree(aside, ignore_errors=True)


def recover(dest: str, log=print) -> None:
    """Finish or undo a local swap that a dead process left half done, and clear its
    unfinished temporary directories (only tidal's own, only of dead processes)."""
    prev = dest + PREVIOUS
    if os.path.isdir(prev):
        if not os.path.exists(dest):
            os.replace(prev, dest)
            log(f"restored the previous export at {dest} (an export died while swapping)")
        elif _marker(dest) is not None:
            shutil.rmtree(prev, ignore_errors=True)
    parent, name = os.path.split(os.path.abspath(dest))
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if not entry.startswith(name + TMP):
            continue
        path = os.path.join(parent, entry)
        pid = entry[len(name + TMP):].split("-", 1)[0]
        ours = any(os.path.exists(os.path.join(path, m)) for m in (PARTIAL, MARKER))
        if pid.isdigit() and not _alive(int(pid)) and ours:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_object(src: str, dst: str) -> None:
    """Server-side copy; on S3 through boto3's managed copy (multipart above 5 GiB, where a
    single CopyObject stops)."""
    if src.startswith("s3://"):
        import boto3

        sb, _, sk = src[5:].partition("/")
        db, _, dk = dst[5:].partition("/")
        boto3.client("s3").copy({"Bucket": sb, "Key": sk}, db, dk)
        return
    fs, src_path = tio.resolve(src)
    _, dst_path = tio.resolve(dst)
    fs.create_dir(posixpath.dirname(dst_path), recursive=True)
    fs.copy_file(src_path, dst_path)


def _publish_cloud(local: str, dest: str, marker: Dict, kind: str, log) -> None:
    """Upload under a temporary prefix, then copy in under the in-progress sentinel and write
    the marker last. (Object stores have no rename: while the copy runs, the destination
    reads as an unfinished export, never as a complete one.)"""
    staging = f"{dest.rstrip('/')}{TMP}{uuid.uuid4().hex[:8]}"
    try:
        tio.upload_dir(local, staging)  # the marker travels, but is copied in last
        old = _marker(dest) if kind == "export" else None
        tio.write_bytes(tio.join(dest, PARTIAL), b"")  # from here on: tidal's, in progress
        tio.remove(tio.join(dest, MARKER))
        for rel in marker["files"]:
            _copy_object(tio.join(staging, *rel.split("/")), tio.join(dest, *rel.split("/")))
        for rel in (old or {}).get("files", {}):
            if rel not in marker["files"]:  # the previous export's own files, no longer part of it
                tio.remove(tio.join(dest, *rel.split("/")))
        tio.write_bytes(tio.join(dest, MARKER), json.dumps(marker, indent=1, sort_keys=True).encode())
        tio.remove(tio.join(dest, PARTIAL))
    finally:
        tio.remove_tree(staging)
