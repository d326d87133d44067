"""Run a function in several processes joined in one gloo process group on localhost (the hotels tests of the
distributed loss and of the sharded evaluation)."""

import datetime
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_process(rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(1)  # a forked child: no OpenMP pool inherited from the parent
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a collective one worker misses fails the test after a minute instead of hanging it for gloo's half hour
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[..., None], *args, world_size: int = 2) -> None:
    """Run `fn(rank, *args)` in `world_size` processes joined in one gloo process group on localhost, one thread
    each. Forked (Linux): the workers start with the parent's imports, in a second instead of importing torch again;
    they hand results back through files."""
    port = _free_port()
    mp.start_processes(
        _gloo_process, args=(world_size, port, fn, args), nprocs=world_size, join=True, start_method="fork"
    )
