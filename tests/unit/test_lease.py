"""One driver per run: the lease refuses a second driver, is taken over when its holder is
gone or silent, and a holder that loses it learns so at its next heartbeat."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tidal.train import lease
from tidal.train.lease import LeaseHeld


def _other_holder(path, heartbeat_age=0.0, pid=None, host=None):
    """A lease written by another (live) driver."""
    info = {"host": host or socket.gethostname(), "pid": pid or os.getppid(),
            "pid_start": lease._proc_start(pid or os.getppid()), "user": "someone",
            "started_at": time.time() - 100, "holder": "other", "run": "r",
            "heartbeat_at": time.time() - heartbeat_age}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(info, f)


def test_a_second_driver_is_refused_naming_the_holder(tmp_path):
    run = str(tmp_path / "run")
    first = lease.acquire(run, "r", stale_s=60)
    try:
        with pytest.raises(LeaseHeld) as e:
            lease.acquire(run, "r", stale_s=60)
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg
        assert "run.take_over=true" in msg and "another run.name" in msg
    finally:
        lease.release(first)
    assert not os.path.exists(os.path.join(run, lease.LEASE))
    again = lease.acquire(run, "r", stale_s=60)  # free once released
    lease.release(again)


def test_stale_gone_or_forced_leases_are_taken_over(tmp_path):
    path = str(tmp_path / "run" / lease.LEASE)
    notes = []
    _other_holder(path, heartbeat_age=500)
    held = lease.acquire(os.path.dirname(path), "r", stale_s=120, log=notes.append)
    assert "no heartbeat for" in notes[-1]
    lease.release(held)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _other_holder(path, pid=dead.pid)  # fresh heartbeat, but its process is gone
    held = lease.acquire(os.path.dirname(path), "r", stale_s=120, log=notes.append)
    assert "driver process is gone" in notes[-1]
    lease.release(held)

    _other_holder(path, host="another-host")  # alive as far as anyone here can tell
    with pytest.raises(LeaseHeld, match="another-host"):
        lease.acquire(os.path.dirname(path), "r", stale_s=120)
    held = lease.acquire(os.path.dirname(path), "r", stale_s=120, take_over=True, log=notes.append)
    assert "run.take_over=true" in notes[-1]
    lease.release(held)


def test_the_displaced_holder_learns_at_its_next_heartbeat(tmp_path):
    run = str(tmp_path / "run")
    lost = []
    first = lease.acquire(run, "r", stale_s=0.8, on_lost=lost.append, log=lambda m: None)
    time.sleep(0.5)
    second = lease.acquire(run, "r", stale_s=0.8, take_over=True, log=lambda m: None)
    deadline = time.time() + 10
    while not first.lost.is_set() and time.time() < deadline:
        time.sleep(0.1)
    assert first.lost.is_set() and lost and lost[0]["holder"] == second.info["holder"]
    lease.release(first)  # must not remove the new holder's lease
    assert json.load(open(os.path.join(run, lease.LEASE)))["holder"] == second.info["holder"]
    time.sleep(0.6)
    assert not second.lost.is_set()  # the heartbeat keeps the new holder's lease its own
    lease.release(second)


def test_a_lease_file_tidal_did_not_write_whole_counts_by_its_age(tmp_path):
    path = tmp_path / "run" / lease.LEASE
    path.parent.mkdir()
    path.write_text('{"holder": "x", "heartbe')  # no tidal driver writes this (link-created)
    with pytest.raises(LeaseHeld):  # fresh: someone may be writing it
        lease.acquire(str(path.parent), "r", stale_s=60)
    old = time.time() - 120
    os.utime(path, (old, old))
    held = lease.acquire(str(path.parent), "r", stale_s=60, log=lambda m: None)
    assert json.load(open(path))["holder"] == held.info["holder"]
    assert not [p for p in os.listdir(path.parent) if ".new" in p]  # no temporary left
    lease.release(held)


@pytest.fixture()
def s3_bucket(monkeypatch):
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (dev extra) not installed")
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="leases")
    yield "s3://leases/runs"
    server.stop()


def test_s3_lease_uses_conditional_writes(s3_bucket):
    """S3 stand-in: moto's server, which implements If-None-Match / If-Match on PUT."""
    run = f"{s3_bucket}/r"
    first = lease.acquire(run, "r", stale_s=60)
    with pytest.raises(LeaseHeld, match="another driver"):
        lease.acquire(run, "r", stale_s=60)
    second = lease.acquire(run, "r", stale_s=60, take_over=True, log=lambda m: None)
    lease.release(first)  # the displaced holder's release leaves the new lease in place
    store = lease._backend(f"{run}/{lease.LEASE}")
    assert json.loads(store.read()[0])["holder"] == second.info["holder"]
    lease.release(second)
    assert store.read() is None
