"""What the tasks share: autocast as the preset asks, quiet progress logging for short loops, scene drawing."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tasks import PresetError
from tasks.common import autocast, disc, log_progress, noisy_canvas, pixel_grid, to_uint8


def test_autocast_is_off_by_default_and_bf16_when_asked_on_cpu():
    with autocast(torch.device("cpu"), None):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_autocast_asks_torch_for_the_preset_precision(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: calls.append((args, kwargs)))
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for device, amp in ((cuda, None), (cuda, "bf16"), (cuda, "fp16"), (cpu, None), (cpu, "bf16")):
        autocast(device, amp)
    assert calls == [
        (("cuda",), {"enabled": False}),  # fp32, as the thesis trained
        (("cuda",), {"dtype": torch.bfloat16, "enabled": True}),
        (("cuda",), {"dtype": torch.float16, "enabled": True}),
        (("cpu",), {"enabled": False}),
        (("cpu",), {"dtype": torch.bfloat16, "enabled": True}),
    ]


def test_autocast_refuses_fp16_on_cpu_and_unknown_precisions():
    with pytest.raises(PresetError, match=r"amp='fp16' on a CPU: .*use amp=\"bf16\" there, or amp=None for fp32"):
        autocast(torch.device("cpu"), "fp16")
    with pytest.raises(PresetError, match=r"amp='fp32': expected None \(fp32\) or one of bf16, fp16"):
        autocast(torch.device("cuda"), "fp32")


def test_progress_is_silent_for_short_loops_and_periodic_for_long_ones(caplog, monkeypatch):
    logger = logging.getLogger("tasks.test")
    with caplog.at_level(logging.INFO, logger="tasks.test"):
        assert list(log_progress(range(10), total=10, what="quick", logger=logger)) == list(range(10))
    assert not caplog.records
    clock = iter(range(0, 1000, 7))  # every step takes 7 s
    monkeypatch.setattr("tasks.common.time", SimpleNamespace(perf_counter=lambda: next(clock)))
    with caplog.at_level(logging.INFO, logger="tasks.test"):
        assert list(log_progress(range(10), total=10, what="slow", logger=logger)) == list(range(10))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("slow: 2/10 (20%)") and lines[-2].startswith("slow: 10/10 (100%)")
    assert len(lines) == 6 and lines[-1].startswith("slow: done, 10 in")


def test_scene_helpers():
    rng = np.random.default_rng(0)
    yy, xx = pixel_grid(8, 12)
    assert yy.shape == xx.shape == (8, 12) and yy.dtype == np.float32 and xx[0, 11] == 11 and yy[7, 0] == 7
    canvas = noisy_canvas(rng, yy, xx)
    assert canvas.shape == (8, 12, 3)
    inside = disc(yy, xx, 4, 6, 2)
    assert inside[4, 6] and not inside[4, 8] and inside.sum() == 9  # strictly inside radius 2: a plus of 3 x 3
    image = to_uint8(np.array([[-5.0, 12.7, 300.0]]))
    assert image.dtype == np.uint8 and image.tolist() == [[0, 12, 255]]
