"""Checkpoint integrity: a checkpoint counts only once it is committed and verifies.

Each rank lists the files it wrote with their size and SHA-256 (``integrity/rank_<r>.json``,
uploaded with its shard). When every rank's upload has finished, rank 0 merges the lists
into ``COMMITTED.json``, written last and atomically. A directory without the marker is
a save that never finished (a crash, a preemption, a killed worker); a file whose size or
digest differs from the marker is a damaged one. Resuming walks the run's checkpoints from
newest to oldest and loads the first that verifies, reporting every one it skips.

With ``TIDAL_CHECKPOINT_KEY`` set (on the driver and every worker), the marker is signed
(HMAC-SHA256 over its canonical JSON, which lists every file's digest), and an unsigned or
mismatched marker is refused: whoever can write to the storage but does not hold the key
cannot make tidal load a checkpoint of theirs.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from typing import Dict, List, Optional, Tuple

from tidal.data import io as tio

COMMIT = "COMMITTED.json"
RANK_DIR = "integrity"
CKPT_RE = re.compile(r"^checkpoint_(\d+)$")
CHUNK = 8 << 20
KEY_ENV = "TIDAL_CHECKPOINT_KEY"
# what a resume or an export reads: a marker that does not cover these vouches for nothing
REQUIRED = (".metadata", "trainer_state.json")


def signing_key() -> Optional[bytes]:
    key = os.environ.get(KEY_ENV)
    return key.encode() if key else None


def _signature(marker: Dict, key: bytes) -> str:
    body = {k: v for k, v in marker.items() if k != "signature"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, blob, hashlib.sha256).hexdigest()


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def _sha256_local(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                return h.hexdigest()
            h.update(b)


def write_rank_manifest(local_dir: str, rank: int) -> Dict[str, Dict]:
    """Digest every file this rank wrote into ``local_dir`` (before it is uploaded)."""
    files = {}
    for root, _, names in os.walk(local_dir):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            if rel.startswith(RANK_DIR + "/"):
                continue
            files[rel] = {"bytes": os.path.getsize(full), "sha256": _sha256_local(full)}
    os.makedirs(os.path.join(local_dir, RANK_DIR), exist_ok=True)
    with open(os.path.join(local_dir, RANK_DIR, f"rank_{rank}.json"), "w") as f:
        json.dump(files, f, sort_keys=True)
    return files


def commit(ckpt_dir: str, world: int, step: int, extra: Optional[Dict] = None) -> Dict:
    """Rank 0, after every rank's upload: merge the rank lists and write the marker last."""
    files: Dict[str, Dict] = {}
    for r in range(world):
        part = json.loads(tio.read_bytes(tio.join(ckpt_dir, RANK_DIR, f"rank_{r}.json")))
        for rel, info in part.items():
            if rel in files and files[rel] != info:
                raise RuntimeError(f"checkpoint {ckpt_dir}: ranks wrote different {rel}")
            files[rel] = info
    marker = {"step": step, "world_size": world, "committed_at": time.time(), "files": files,
              # where it belongs: a signed record vouches for this run's checkpoint at this step
              "location": _location(ckpt_dir), **(extra or {})}
    key = signing_key()
    if key is not None:
        marker["signature"] = {"alg": "hmac-sha256", "value": _signature(marker, key)}
    tio.write_bytes(tio.join(ckpt_dir, COMMIT), json.dumps(marker, indent=1, sort_keys=True).encode())
    return marker


def _location(ckpt_dir: str) -> str:
    """``<run>/<checkpoint_N>``: the last two parts of a checkpoint's path."""
    parts = ckpt_dir.rstrip("/").replace(os.sep, "/").split("/")
    return "/".join(parts[-2:])


def verify(ckpt_dir: str, full=True, copy: bool = False) -> List[str]:
    """Problems with ``ckpt_dir`` (empty when it is committed and intact). ``full`` checks
    every file's digest, False sizes only (cheap, for a first look from the driver), or a
    collection of names whose digests to check. A ``copy`` (a local download of a
    checkpoint verified in storage) is not held to the signed location."""
    try:
        marker = json.loads(tio.read_bytes(tio.join(ckpt_dir, COMMIT)))
    except FileNotFoundError:
        return [f"no {COMMIT} (the save never finished)"]
    except (OSError, ValueError) as e:
        return [f"unreadable {COMMIT}: {e}"]
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in marker["files"].values()):
        return [f"{COMMIT} is not a commit record"]
    key = signing_key()
    if key is not None:
        problem = _signature_problem(marker, key, None if copy else _location(ckpt_dir))
        if problem:
            return [problem]
    problems = [f"{COMMIT} does not cover {name}" for name in REQUIRED if name not in marker["files"]]
    unsafe = [rel for rel in marker["files"] if not _safe_rel(rel)]
    problems += [f"{rel}: not a path inside the checkpoint" for rel in unsafe]
    listed = {rel: info for rel, info in marker["files"].items() if rel not in unsafe}
    problems += tio.listing_problems(ckpt_dir, listed, full, "committed")
    if not marker.get("files"):
        problems.append(f"{COMMIT} lists no files")
    if full is True and not problems:
        problems += _metadata_problems(ckpt_dir)
    return problems


def _signature_problem(marker: Dict, key: bytes, location: Optional[str]) -> Optional[str]:
    sig = marker.get("signature")
    if not isinstance(sig, dict) or not isinstance(sig.get("value"), str):
        return f"{COMMIT} is not signed and {KEY_ENV} is set: unsigned checkpoints are refused"
    if not hmac.compare_digest(sig["value"].encode(), _signature(marker, key).encode()):
        return f"{COMMIT}: signature does not match {KEY_ENV} (tampered with, or signed with another key)"
    if location is not None and marker.get("location") != location:
        return (f"{COMMIT}: signed for {marker.get('location')!r}, found at {location!r} (a signed "
                "checkpoint is bound to its run and step)")
    return None


def _metadata_problems(ckpt_dir: str) -> List[str]:
    """The DCP metadata must pass the restricted loader: a checkpoint whose metadata would
    be refused at load time is skipped like a damaged one, not retried."""
    from tidal.train.safe_dcp import UnsafeCheckpointError, check_metadata

    try:
        check_metadata(tio.read_bytes(tio.join(ckpt_dir, ".metadata")), tio.join(ckpt_dir, ".metadata"))
    except UnsafeCheckpointError as e:
        return [str(e)]
    return []


def _safe_rel(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts


def require_valid(ckpt_dir: str, what: str = "checkpoint", copy: bool = False) -> None:
    """Raise ValueError unless ``ckpt_dir`` is committed, intact (every digest) and, with a
    key set, signed: checked before anything in it is loaded."""
    problems = verify(ckpt_dir, full=True, copy=copy)
    if problems:
        raise ValueError(f"{what}: {ckpt_dir} is not a committed, intact checkpoint: "
                         + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))


def list_checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """``[(step, path)]`` of the run's checkpoint directories, newest first."""
    out = []
    for name in tio.list_dir(run_dir):
        m = CKPT_RE.match(name)
        if m:
            out.append((int(m.group(1)), tio.join(run_dir, name)))
    return sorted(out, reverse=True)


def latest_valid(run_dir: str, full: bool = True, log=None) -> Tuple[Optional[str], List[Dict]]:
    """The newest committed, intact checkpoint of the run, and the ones skipped (with why)."""
    skipped = []
    for step, path in list_checkpoints(run_dir):
        problems = verify(path, full=full)
        if not problems:
            return path, skipped
        skipped.append({"checkpoint": path, "step": step, "problems": problems})
        if log is not None:
            log(f"skipping checkpoint {path}: " + "; ".join(problems[:3])
                + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
    return None, skipped


def prune(run_dir: str, keep: int, log=None) -> List[str]:
    """Keep the newest ``keep`` committed checkpoints; remove older ones, and unfinished
    ones older than the newest committed (a newer unfinished one may still be uploading)."""
    removed, committed = [], 0
    for _, path in list_checkpoints(run_dir):
        ok = tio.exists(tio.join(path, COMMIT))
        if ok:
            committed += 1
            if committed <= keep:
                continue
        elif committed == 0:
            continue
        tio.remove_tree(path)
        removed.append(path)
        if log is not None:
            log(f"removed checkpoint {path}" + ("" if ok else " (never committed)"))
    return removed
