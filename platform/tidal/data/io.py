"""Local paths and cloud URIs (s3://, gs://) behind one pyarrow filesystem interface."""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import posixpath
from typing import List, Tuple

import numpy as np
import pyarrow.fs as pafs

CLOUD_PREFIXES = ("s3://", "gs://", "gcs://")


def is_cloud(uri: str) -> bool:
    return uri.startswith(CLOUD_PREFIXES)


def resolve(uri: str) -> Tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or a cloud URI."""
    if is_cloud(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if is_cloud(uri) else os.path.join(uri, *parts)


def expand(uri: str) -> List[str]:
    """Expand a file, directory (recursively) or glob into a sorted list of file URIs/paths."""
    fs, path = resolve(uri)
    scheme = uri.split("://", 1)[0] + "://" if is_cloud(uri) else ""
    has_glob = any(c in path for c in "*?[")
    base = path
    if has_glob:
        base = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File and not has_glob:
        return [uri]
    if info.type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = sorted(f.path for f in found if f.type == pafs.FileType.File
                   and not posixpath.basename(f.path).startswith("."))
    if has_glob:
        files = [f for f in files if fnmatch.fnmatch(f, path)]
    return [scheme + f for f in files]


def sha256_file(uri: str, chunk: int = 1 << 20) -> Tuple[str, int]:
    fs, path = resolve(uri)
    h, size = hashlib.sha256(), 0
    with fs.open_input_stream(path, compression=None) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            size += len(b)
    return h.hexdigest(), size


def listing_problems(root: str, files: dict, full: bool, what: str) -> list:
    """Problems of the files under ``root`` against a record ``{relative path: {"bytes",
    "sha256"}}`` (a checkpoint's commit record, an export's marker): missing, another size,
    and with ``full`` (True, or a collection of paths) another SHA-256. ``what`` names the
    record in the messages."""
    problems = []
    for rel, info in sorted(files.items()):
        path = join(root, *rel.split("/"))
        size = file_size(path)
        if size is None:
            problems.append(f"{rel}: missing")
        elif size != info["bytes"]:
            problems.append(f"{rel}: {size} bytes, {what} {info['bytes']} (truncated or overwritten)")
        elif (full is True or (full and rel in full)) and sha256_file(path)[0] != info["sha256"]:
            problems.append(f"{rel}: content differs from its {what} SHA-256 (corrupted)")
    return problems


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file whole: local files appear atomically (temp file + rename); object stores
    publish an object only when its upload completes."""
    fs, path = resolve(uri)
    if not is_cloud(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def remove(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def file_size(uri: str):
    """Size in bytes, or None when there is no such file."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def list_dir(uri: str) -> List[str]:
    """Names directly inside a directory (empty when it does not exist)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(posixpath.basename(i.path.rstrip("/"))
                  for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def remove_tree(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def local_dir(uri: str) -> str:
    """A local directory holding the contents of ``uri``: the path itself when local, else a
    copy downloaded once into ``~/.cache/tidal/remote`` (tokenizers load from local files)."""
    if not is_cloud(uri):
        return uri
    fs, path = resolve(uri)
    # Keyed by the remote listing (names, sizes, times): a changed directory is fetched anew.
    listing = sorted((f.path, f.size, str(f.mtime)) for f in
                     fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:16]
    cache = os.path.join(os.path.expanduser("~/.cache/tidal/remote"), key)
    if not os.path.isdir(cache):
        tmp = f"{cache}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        pafs.copy_files(path, tmp, source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        try:
            os.rename(tmp, cache)
        except OSError:  # another process finished first
            pass
    return cache


def upload_dir(local: str, uri: str) -> None:
    fs, path = resolve(uri)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def save_npy(uri: str, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy and return its sha256."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    data = buf.getvalue()
    write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


def load_npy(uri: str) -> np.ndarray:
    """Memory-map a local .npy; read a remote one whole."""
    if not is_cloud(uri):
        return np.load(uri, mmap_mode="r", allow_pickle=False)
    return np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False)
