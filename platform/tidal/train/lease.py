"""One driver per run: a lease in the run's storage, kept alive by a heartbeat.

Two drivers on the same ``run.name`` would prune and overwrite each other's checkpoints.
Before any Ray work a driver writes ``<run storage>/LEASE.json`` with an exclusive create
(``O_EXCL`` locally; a conditional put, ``If-None-Match: *``, on S3; a generation-0
precondition on GCS). A second driver finds it and stops at once, naming the holder and
how to take over. The holder refreshes its heartbeat every ``lease_stale_s / 4`` seconds
with a compare-and-swap; a lease whose heartbeat is older than ``lease_stale_s`` is taken
over, as is one whose driver process is gone on this same host, or any with
``run.take_over=true``. A holder that finds its lease taken stops its run.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from tidal.data import io as tio

LEASE = "LEASE.json"


class LeaseHeld(RuntimeError):
    """Another driver holds the run."""


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time (tells a live process from a recycled pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me() -> Dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
            "user": getpass.getuser(), "started_at": time.time()}


def _gone(info: Dict) -> bool:
    """Whether the holder is a process of this host that no longer exists."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    start = _proc_start(info["pid"])
    if start is None:
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return info.get("pid_start") is not None and start != info["pid_start"]


# -- storage backends: create / read / compare-and-swap / delete --------------------------

class _Local:
    def __init__(self, path: str):
        self.path = path

    def _lock(self):
        import fcntl

        fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _unlock(self, fd) -> None:
        os.close(fd)  # releases the flock

    def create(self, body: bytes) -> Optional[str]:
        """Written whole beside the lease, then hard-linked to its name: the link is the
        exclusive create (it fails if the lease exists), and nobody ever reads a half file."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.new{os.getpid()}-{uuid.uuid4().hex[:6]}"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            os.remove(tmp)
        return self._token(body)

    @staticmethod
    def _token(body: bytes) -> str:
        import hashlib

        return hashlib.sha256(body).hexdigest()

    def read(self) -> Optional[Tuple[bytes, str]]:
        try:
            with open(self.path, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None
        return body, self._token(body)

    def modified(self) -> float:
        try:
            return os.path.getmtime(self.path)
        except OSError:
            return 0.0

    def swap(self, body: bytes, token: str) -> Optional[str]:
        fd = self._lock()
        try:
            cur = self.read()
            if cur is None or cur[1] != token:
                return None
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return self._token(body)
        finally:
            self._unlock(fd)

    def delete(self, token: str) -> bool:
        fd = self._lock()
        try:
            cur = self.read()
            if cur is None or cur[1] != token:
                return False
            os.remove(self.path)
            return True
        finally:
            self._unlock(fd)


class _S3:
    def __init__(self, uri: str):
        import boto3

        bucket, _, key = uri[len("s3://"):].partition("/")
        self.bucket, self.key = bucket, key
        self.client = boto3.client("s3")

    # the object changed or went away under a conditional request: the lease is not ours
    LOST = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404")

    def _put(self, body: bytes, **cond) -> Optional[str]:
        from botocore.exceptions import ClientError

        try:
            out = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **cond)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in self.LOST:
                return None
            raise
        return out["ETag"]

    def create(self, body: bytes) -> Optional[str]:
        return self._put(body, IfNoneMatch="*")

    def read(self) -> Optional[Tuple[bytes, str]]:
        from botocore.exceptions import ClientError

        try:
            out = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return out["Body"].read(), out["ETag"]

    def swap(self, body: bytes, token: str) -> Optional[str]:
        return self._put(body, IfMatch=token)

    def modified(self) -> float:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key)["LastModified"].timestamp()
        except Exception:  # noqa: BLE001 - gone meanwhile
            return 0.0

    def delete(self, token: str) -> bool:
        from botocore.exceptions import ClientError

        cur = self.read()
        if cur is None or cur[1] != token:
            return False
        try:  # conditional: a take-over between the read and here keeps the new lease
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in self.LOST:
                return False
            raise
        return True


class _GCS:
    def __init__(self, uri: str):
        from google.cloud import storage  # optional: pip install google-cloud-storage

        bucket, _, key = uri.split("://", 1)[1].partition("/")
        self.blob_of = lambda: storage.Client().bucket(bucket).blob(key)
        from google.api_core.exceptions import NotFound, PreconditionFailed

        self.errors = (NotFound, PreconditionFailed)

    def create(self, body: bytes) -> Optional[str]:
        return self._upload(body, 0)

    def _upload(self, body: bytes, generation: int) -> Optional[str]:
        blob = self.blob_of()
        try:
            blob.upload_from_string(body, if_generation_match=generation)
        except self.errors:
            return None
        return str(blob.generation)

    def read(self) -> Optional[Tuple[bytes, str]]:
        blob = self.blob_of()
        try:
            body = blob.download_as_bytes()
        except self.errors:
            return None
        return body, str(blob.generation)

    def swap(self, body: bytes, token: str) -> Optional[str]:
        return self._upload(body, int(token))

    def modified(self) -> float:
        blob = self.blob_of()
        try:
            blob.reload()
        except self.errors:
            return 0.0
        return blob.updated.timestamp() if blob.updated else 0.0

    def delete(self, token: str) -> bool:
        try:
            self.blob_of().delete(if_generation_match=int(token))
        except self.errors:
            return False
        return True


class _BestEffort:
    """Object stores reached without a conditional-write client (``gs://`` without
    google-cloud-storage): read-compare-write, which narrows but does not close the race
    between two drivers starting within the same second."""

    def __init__(self, uri: str):
        self.uri = uri

    @staticmethod
    def _token(body: bytes) -> str:
        import hashlib

        return hashlib.sha256(body).hexdigest()

    def create(self, body: bytes) -> Optional[str]:
        if tio.exists(self.uri):
            return None
        tio.write_bytes(self.uri, body)
        return self._token(body) if self.read() == (body, self._token(body)) else None

    def read(self) -> Optional[Tuple[bytes, str]]:
        if not tio.exists(self.uri):
            return None
        body = tio.read_bytes(self.uri)
        return body, self._token(body)

    def swap(self, body: bytes, token: str) -> Optional[str]:
        cur = self.read()
        if cur is None or cur[1] != token:
            return None
        tio.write_bytes(self.uri, body)
        return self._token(body)

    def delete(self, token: str) -> bool:
        cur = self.read()
        if cur is None or cur[1] != token:
            return False
        tio.remove(self.uri)
        return True

    def modified(self) -> float:
        import pyarrow.fs as pafs

        fs, path = tio.resolve(self.uri)
        info = fs.get_file_info(path)
        return info.mtime.timestamp() if info.type == pafs.FileType.File and info.mtime else 0.0


def _backend(uri: str, log=print):
    if uri.startswith("s3://"):
        return _S3(uri)
    if tio.is_cloud(uri):
        try:
            return _GCS(uri)
        except ImportError:
            log("warning: google-cloud-storage is not installed: the run lease on gs:// is "
                "checked without a conditional write (pip install google-cloud-storage)")
            return _BestEffort(uri)
    return _Local(uri)


# -- the lease ----------------------------------------------------------------------------

@dataclass
class Lease:
    uri: str
    run: str
    info: Dict
    token: str
    stale_s: float
    lost: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: Optional[threading.Thread] = None
    taken_by: Optional[Dict] = None


def _body(info: Dict) -> bytes:
    return json.dumps(dict(info, heartbeat_at=time.time()), indent=1).encode()


def _describe(info: Dict) -> str:
    age = time.time() - info.get("heartbeat_at", 0)
    return (f"{info.get('user', '?')}@{info.get('host', '?')} pid {info.get('pid', '?')}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('started_at', 0)))}, "
            f"last heartbeat {age:.0f}s ago")


def acquire(run_storage: str, run: str, stale_s: float, take_over: bool = False, log=print,
            on_lost: Optional[Callable[[Dict], None]] = None) -> Lease:
    """Hold ``run``'s lease (see the module doc) and keep its heartbeat; raises LeaseHeld."""
    uri = tio.join(run_storage, LEASE)
    store = _backend(uri, log)
    info = dict(_me(), holder=uuid.uuid4().hex, run=run)
    token = store.create(_body(info))
    while token is None:
        cur = store.read()
        if cur is None:  # released meanwhile
            token = store.create(_body(info))
            continue
        try:
            held = json.loads(cur[0])
        except ValueError:
            held = {}
        if not isinstance(held, dict) or "heartbeat_at" not in held:
            # not a lease tidal wrote whole: judge it by how long it has been unchanged
            held = {"heartbeat_at": store.modified(), "user": "?", "host": "?", "pid": "?"}
        age = time.time() - held.get("heartbeat_at", 0)
        reason = ("run.take_over=true" if take_over else
                  "its driver process is gone" if _gone(held) else
                  f"no heartbeat for {age:.0f}s (run.lease_stale_s={stale_s:g})" if age > stale_s else None)
        if reason is None:
            raise LeaseHeld(
                f"run '{run}' is being run by another driver ({_describe(held)}; lease {uri}). Wait "
                f"for it to finish, use another run.name, or, if that driver is gone, pass "
                f"run.take_over=true (a lease without a heartbeat for run.lease_stale_s={stale_s:g}s "
                "is taken over automatically)")
        token = store.swap(_body(info), cur[1])
        if token is not None and held:
            log(f"took over run '{run}' from {_describe(held)}: {reason}")
    lease = Lease(uri=uri, run=run, info=info, token=token, stale_s=stale_s)
    lease.thread = threading.Thread(target=_heartbeat, args=(lease, store, on_lost, log),
                                    daemon=True, name=f"tidal-lease-{run}")
    lease.thread.start()
    return lease


def _heartbeat(lease: Lease, store, on_lost, log) -> None:
    interval = max(0.2, lease.stale_s / 4)
    while not lease.stop.wait(interval):
        try:
            token = store.swap(_body(lease.info), lease.token)
        except Exception as e:  # noqa: BLE001 - a storage hiccup: try again next beat
            log(f"warning: lease heartbeat failed ({type(e).__name__}: {e})")
            continue
        if token is None:  # someone took it over: this driver no longer owns the run
            cur = store.read()
            try:
                lease.taken_by = json.loads(cur[0]) if cur else {}
            except ValueError:
                lease.taken_by = {}
            lease.lost.set()
            log(f"lease of run '{lease.run}' was taken over by "
                f"{_describe(lease.taken_by) if lease.taken_by else 'another driver'}: stopping")
            if on_lost is not None:
                on_lost(lease.taken_by)
            return
        lease.token = token


def release(lease: Optional[Lease]) -> None:
    """Stop the heartbeat and remove the lease, unless another driver holds it now."""
    if lease is None:
        return
    lease.stop.set()
    if lease.thread is not None:
        lease.thread.join(timeout=10)
    if not lease.lost.is_set():
        _backend(lease.uri, log=lambda m: None).delete(lease.token)
