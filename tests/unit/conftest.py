import os
import socket

import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def single_rank_group():
    """A real one-rank gloo process group (what FSDP2 and the engine's device mesh need),
    torn down after the module."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()
