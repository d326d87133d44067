"""Run a function in several processes joined in one gloo process group on localhost (the tests of the distributed
hotels loss and of every task's sharded evaluation), and train a trial on such workers."""

import contextlib
import datetime
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from orchestrator.config import TrialConfig
from orchestrator.loop import MaskInput, prepare, train, variant_options
from orchestrator.weights import initialize, parse_init


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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread within the block, as the gloo workers: a reference computed in the test process then
    splits its sums as theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(rank: int, cfg: TrialConfig, folder: Path) -> None:
    out = train(
        cfg, device=torch.device("cpu"), rank=rank, world_size=dist.get_world_size(), workdir=folder / str(rank)
    )
    torch.save(out, folder / f"rank{rank}.pt")


def train_on_gloo(cfg: TrialConfig, folder: Path, *, world_size: int = 2) -> list[dict[str, Any]]:
    """What `orchestrator.loop.train(cfg)` returns on each of `world_size` gloo workers (CPU), in rank order; rank
    r's checkpoints stay in `folder/<r>` (rank 0's best model: `folder/0/best.pt`). Generate the trial's data
    before (`ensure_synthetic` in `cfg.cache_dir`), else every worker writes it."""
    run_gloo(_train, cfg, folder, world_size=world_size)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def best_model(cfg: TrialConfig, folder: Path) -> nn.Module:
    """The model of the `best.pt` that `train_on_gloo(cfg, folder)` left from rank 0, as the loop evaluated it:
    converted to the trial's variant, and called with (images, masks) for a task that takes masks."""
    task, preset, root = prepare(cfg)
    model = task.build_model(preset, num_classes=task.num_classes(root))
    initialize(model, task, cfg.variant, variant_options(cfg, preset), parse_init(cfg.init), None)
    model.load_state_dict(torch.load(folder / "0" / "best.pt", weights_only=False)["model"])
    return MaskInput(model) if getattr(task, "takes_masks", False) else model
