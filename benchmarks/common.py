"""Timing and memory helpers for the benchmarks: interleaved rounds, medians, ratios against a baseline."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable

import torch

from orchestrator.tables import markdown_table as table  # noqa: F401  (one table writer for the project)


def with_baseline(variants: list[str]) -> list[str]:
    """The variants to measure, each checked by name, with `zero` (the baseline of every ratio) first."""
    import convs

    for v in variants:
        convs.get(v)
    return ["zero"] + [v for v in variants if v != "zero"]


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when present, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def add_gpu_format_options(parser: argparse.ArgumentParser) -> None:
    """--amp and --channels-last, each on by default on a GPU and off on a CPU (`gpu_formats`)."""
    for flag, what in (("--amp", "bf16 autocast"), ("--channels-last", "channels_last memory format")):
        parser.add_argument(
            flag,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"{what} (default: on for GPU, off for CPU)",
        )


def gpu_formats(args: argparse.Namespace, device: torch.device) -> tuple[bool, bool]:
    """(amp, channels_last) as asked, else on for a GPU and off for a CPU."""
    gpu = device.type == "cuda"
    return (gpu if args.amp is None else args.amp), (gpu if args.channels_last is None else args.channels_last)


def describe(device: torch.device) -> str:
    """One line naming the machine a number came from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(cases: dict[str, Callable[[], None]], *, rounds: int, warmup: int, device: torch.device) -> dict:
    """Run every case once per round, in turn, so that machine noise hits all of them alike; return seconds."""
    for _ in range(warmup):
        for step in cases.values():
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, step in cases.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def saved_activation_bytes(step: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward during `step()` (the activation memory).

    Tensors that share storage with one in `exclude` (pass the model's parameters) are not counted: a conv saves
    its weight for backward, but the weight is there anyway, so counting it would charge a layer with more
    parameters twice. Casts made for backward (an autocast conv's bf16 weight) are new storage and do count.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(storages.values())


def verdict(ratio: float, goal: float, *, at_most: bool = True) -> str:
    """'<= 1.15x ok' style text for a ratio against its goal."""
    met = ratio <= goal if at_most else ratio >= goal
    return f"{'<=' if at_most else '>='} {goal:.2f}x {'ok' if met else 'MISSED'}"


def peak_cuda_bytes(step: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)
