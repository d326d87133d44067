"""The shared training loop without Ray: it learns, checkpoints atomically and resumes where it stopped."""

import pytest
import torch

from orchestrator.config import TrialConfig
from orchestrator.loop import CHECKPOINT_FILE, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def config(cache, **kw):
    return TrialConfig(
        task="classification",
        variant=kw.pop("variant", "zero"),
        seed=kw.pop("seed", 0),
        preset="smoke",
        cache_dir=cache,
        loader_workers=0,
        **kw,
    )


@pytest.mark.parametrize("variant", ["zero", "partial"])
def test_smoke_preset_learns(cache, variant):
    out = train(config(cache, variant=variant))
    assert len(out["history"]) == 4
    assert out["best/top1"] >= 50.0, f"4 classes: chance is 25%, got {out['best/top1']}"  # clearly above chance
    assert out["history"][-1]["train/loss"] < out["history"][0]["train/loss"]


def test_report_checkpoints_and_resume(cache, tmp_path):
    reports = []

    def report(metrics, folder):
        reports.append((metrics, torch.load(folder / CHECKPOINT_FILE, weights_only=False)))

    full = train(config(cache, seed=3), report=report, workdir=tmp_path)
    assert [m["epoch"] for m, _ in reports] == [0, 1, 2, 3]
    assert {"val/top1", "val/top5", "train/loss", "best/top1", "last5/top1"} <= set(reports[-1][0])
    assert not list(tmp_path.glob("**/.*.tmp")), "atomic writes leave no temporary file behind"
    # Resume from the epoch-1 checkpoint: the last two epochs are redone exactly as in the uninterrupted run.
    resumed = train(config(cache, seed=3), resume=reports[1][1])
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3]
    for a, b in zip(resumed["history"], full["history"], strict=True):
        assert a["val/top1"] == pytest.approx(b["val/top1"]) and a["train/loss"] == pytest.approx(b["train/loss"])


def test_same_seed_same_run(cache):
    a, b = train(config(cache, seed=5)), train(config(cache, seed=5))
    assert [h["train/loss"] for h in a["history"]] == [h["train/loss"] for h in b["history"]]


def test_bad_settings(cache):
    with pytest.raises(ValueError, match="Unknown preset key"):
        train(config(cache, overrides={"epoch": 3}))
    with pytest.raises(ValueError, match="does not support variant 'partail'; it supports"):
        train(config(cache, variant="partail"))
    with pytest.raises(ValueError, match="Known presets: thesis, cpu, smoke"):
        train(TrialConfig(task="classification", variant="zero", seed=0, preset="tiny", cache_dir=cache))
    with pytest.raises(ValueError, match="Unknown config key"):
        TrialConfig.from_dict({"task": "classification", "variant": "zero", "seed": 0, "lr": 0.1})
