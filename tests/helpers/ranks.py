"""Two CPU ranks in one test: a free port for the rendezvous and the entry point `torch.multiprocessing` spawns."""

import os
import socket
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_entry(rank: int, world: int, port: int, scenario, out: str) -> None:
    """A spawned rank: launcher environment, one torch thread, then ``scenario(rank, Path(out))``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from lisa_trainer.distributed import shutdown

    try:
        scenario(rank, Path(out))
    finally:
        shutdown()
