"""The shared training loop without Ray: it learns, checkpoints atomically and resumes where it stopped."""

import logging
import re
import subprocess
import sys

import pytest
import torch

import convs
from orchestrator import loop
from orchestrator.config import TrialConfig
from orchestrator.loop import (
    CHECKPOINT_FILE,
    FAILURE_KEY,
    DivergedError,
    build_optimizer,
    prepare,
    train,
    train_one_epoch,
    variant_options,
)
from tasks import Evaluation, PresetError, get_task


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
        loader_workers=kw.pop("loader_workers", 0),
        **kw,
    )


@pytest.mark.parametrize("variant", ["zero", "partial"])
def test_smoke_preset_learns(cache, variant, caplog):
    with caplog.at_level(logging.INFO, logger="orchestrator.loop"):
        out = train(config(cache, variant=variant))
    assert len(out["history"]) == 4
    assert out["best/top1"] >= 50.0, f"4 classes: chance is 25%, got {out['best/top1']}"  # clearly above chance
    assert out["history"][-1]["train/loss"] < out["history"][0]["train/loss"]
    # one progress line per epoch: who, which epoch, loss, headline metric, speed, time left
    lines = [r.getMessage() for r in caplog.records if r.name == "orchestrator.loop"]
    pattern = (
        rf"classification {variant} seed 0: epoch (\d)/4  train/loss [\d.]+  val/top1 [\d.]+  \d+ images/s  about "
    )
    assert [int(re.match(pattern, line).group(1)) for line in lines] == [1, 2, 3, 4], lines
    assert lines[-1].endswith("about 0:00:00 left")


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


def test_resume_with_loader_workers_redoes_the_epochs_exactly(cache, tmp_path):
    """Real trials read through loader worker processes, which a resumed trial starts anew: its epochs still draw
    the uninterrupted trial's augmentations (each item seeded by seed, epoch and index), and 0 or 2 workers train
    alike. (Before, the new workers' RNG restarted: the resumed epochs repeated the first epoch's draws.)"""
    reports = []

    def report(metrics, folder):
        reports.append(torch.load(folder / CHECKPOINT_FILE, weights_only=False))

    full = train(config(cache, seed=3, loader_workers=2), report=report, workdir=tmp_path)
    resumed = train(config(cache, seed=3, loader_workers=2), resume=reports[1])
    alone = train(config(cache, seed=3))

    def losses(run):
        return [h["train/loss"] for h in run["history"]]

    assert losses(resumed) == pytest.approx(losses(full), rel=1e-6)
    assert losses(alone) == pytest.approx(losses(full), rel=1e-6)


class RecordingTracker:
    def __init__(self):
        self.calls = []

    def log_epoch(self, metrics, epoch):
        self.calls.append(("epoch", epoch, metrics))

    def log_best(self, best_checkpoint, evaluation):
        self.calls.append(("best", best_checkpoint.name, evaluation))

    def log_final(self, summary, curves):
        self.calls.append(("final", summary, curves))

    def log_model(self, net, weights, best_checkpoint, inputs, tags):
        best = torch.load(best_checkpoint, weights_only=False) if best_checkpoint.is_file() else None
        self.calls.append(("model", net, weights, best, inputs, tags))

    def logged_epochs(self, metric):
        return {c[1] for c in self.calls if c[0] == "epoch"}

    def log_failure(self, reason):
        self.calls.append(("failure", reason))


def test_tracker_gets_every_epoch_the_typed_best_evaluation_and_the_summary(cache):
    tracker = RecordingTracker()
    out = train(config(cache, seed=1, overrides={"epochs": 2}), tracker=tracker)
    kinds = [c[0] for c in tracker.calls]
    assert kinds.count("epoch") == 2 and kinds[-2:] == ["final", "model"] and "best" in kinds
    for _, name, evaluation in (c for c in tracker.calls if c[0] == "best"):
        assert name == "best.pt" and isinstance(evaluation, Evaluation)
        assert evaluation.confusion.counts.shape == (4, 4) and len(evaluation.confusion.classes) == 4
        assert set(evaluation.scalars) == {"val/top1", "val/top5", "val/loss"}
    epoch_metrics = [c[2] for c in tracker.calls if c[0] == "epoch"]
    assert all(isinstance(v, float | int) for m in epoch_metrics for v in m.values())  # scalars only
    assert tracker.calls[-2][1] == {k: v for k, v in out.items() if k != "history"}
    assert tracker.calls[-2][2] == ["train/loss", "val/top1"]
    # Once, at the end: the trained model (what the task calls), the best epoch's checkpoint, a training batch.
    _, net, weights, best, inputs, tags = tracker.calls[-1]
    assert net is weights and isinstance(net, torch.nn.Module)  # classification: no masks, the model itself
    assert best["epoch"] == max(range(2), key=lambda e: out["history"][e]["val/top1"]) and "optimizer" not in best
    assert best["model"].keys() == net.state_dict().keys()
    assert inputs.shape == (16, 3, 32, 32)
    assert tags == {"task": "classification", "variant": "zero", "seed": "1", "preset": "smoke"}


def test_same_seed_same_run(cache):
    a, b = train(config(cache, seed=5)), train(config(cache, seed=5))
    assert [h["train/loss"] for h in a["history"]] == [h["train/loss"] for h in b["history"]]


def test_bad_settings(cache):
    with pytest.raises(ValueError, match="Unknown preset key"):
        train(config(cache, overrides={"epoch": 3}))
    with pytest.raises(PresetError, match=r"epochs=-3: expected an integer >= 1 \(e\.g\. --epochs 12\)"):
        train(config(cache, overrides={"epochs": -3}))
    with pytest.raises(PresetError, match=r"Unknown preset key\(s\) \['tile_size'\]"):  # segmentation's, not ours
        train(config(cache, overrides={"tile_size": 32}))
    with pytest.raises(ValueError, match="Unknown conv variant 'partail'. Known variants: .*partial"):
        train(config(cache, variant="partail"))
    with pytest.raises(ValueError, match="Known presets: thesis, cpu, smoke"):
        train(TrialConfig(task="classification", variant="zero", seed=0, preset="tiny", cache_dir=cache))
    with pytest.raises(ValueError, match="Unknown config key"):
        TrialConfig.from_dict({"task": "classification", "variant": "zero", "seed": 0, "lr": 0.1})


def test_a_resumed_trial_logs_each_epoch_once(cache, tmp_path):
    """Killed after its epoch-1 checkpoint but before logging epoch 1: the resume logs 1 from the checkpoint's
    history, then 2 and 3 as it trains them; no epoch twice, none missing."""
    checkpoints = []
    train(
        config(cache, seed=2),
        report=lambda m, folder: checkpoints.append(torch.load(folder / CHECKPOINT_FILE, weights_only=False)),
    )
    tracker = RecordingTracker()
    tracker.calls.append(("epoch", 0, {}))  # what the first worker logged before it died
    train(config(cache, seed=2), resume=checkpoints[1], tracker=tracker)
    assert [c[1] for c in tracker.calls if c[0] == "epoch"] == [0, 1, 2, 3]
    # A worker that outlived its dead controller logged epoch 2, never checkpointed: the retry trains it, logs it not.
    ahead = RecordingTracker()
    ahead.calls += [("epoch", 0, {}), ("epoch", 1, {}), ("epoch", 2, {})]
    train(config(cache, seed=2), resume=checkpoints[1], tracker=ahead)
    assert [c[1] for c in ahead.calls if c[0] == "epoch"] == [0, 1, 2, 3]
    backfilled = next(c[2] for c in tracker.calls if c[0] == "epoch" and c[1] == 1)
    assert backfilled["val/top1"] == checkpoints[1]["history"][1]["val/top1"] and "best/top1" in backfilled


def test_the_preset_precision_is_checked_before_training_and_bf16_trains(cache):
    with pytest.raises(PresetError, match=r"amp='fp16' on a CPU: CPUs train in bf16 or fp32 only"):
        train(config(cache, overrides={"amp": "fp16"}), device=torch.device("cpu"))
    with pytest.raises(PresetError, match=r"amp='fp8': expected None or one of bf16, fp16"):
        train(config(cache, overrides={"amp": "fp8"}))
    out = train(config(cache, overrides={"amp": "bf16", "epochs": 1}), device=torch.device("cpu"))
    assert len(out["history"]) == 1 and out["history"][0]["train/loss"] > 0


class StartingConv(torch.nn.Conv2d):
    """A variant that, like the layers convs is gaining, takes a `start` option."""

    @classmethod
    def convert_options(cls):
        return ["start", "norm"]


def test_the_preset_start_goes_to_variants_that_take_one(cache, monkeypatch):
    _, smoke, _ = prepare(config(cache))
    assert smoke.variant_start == "copy"  # the smoke preset: every variant learns within a few epochs
    preset = smoke.updated(variant_start="random")  # as the comparison presets (cpu, thesis)
    assert variant_options(config(cache, variant="zero"), preset) == {}  # nn.Conv2d: no convert_options at all
    for name in sorted(convs.VARIANTS):  # before and after convs' layers learn `start`
        takes = "start" in getattr(convs.get(name), "convert_options", list)()
        assert variant_options(config(cache, variant=name), preset) == ({"start": "random"} if takes else {})
    monkeypatch.setattr(convs, "get", lambda name: StartingConv)
    assert variant_options(config(cache, variant="gated", variant_options={"norm": "inside"}), preset) == {
        "norm": "inside",
        "start": "random",
    }
    own = config(cache, variant="gated", variant_options={"start": "copy"})
    assert variant_options(own, preset) == {"start": "copy"}  # the trial's own option wins
    assert variant_options(config(cache), preset.updated(variant_start="copy")) == {"start": "copy"}
    monkeypatch.undo()
    assert variant_options(config(cache, variant="edge:start=copy"), preset) == {}  # the spec's own start wins
    assert variant_options(config(cache, variant="edge_no7"), preset) == {"start": "random"}


@pytest.mark.parametrize("variant", ["gated:norm=inside", "edge_no7"])
def test_variant_specs_and_aliases_train(cache, variant):
    """The thesis presets' arms are specs and aliases (gated:norm=inside, edge_no7): the loop takes them as such."""
    out = train(config(cache, variant=variant, overrides={"epochs": 1, "max_batches": 2}))
    assert len(out["history"]) == 1
    with pytest.raises(ValueError, match=r"Unknown conv variant 'edgy'"):
        prepare(config(cache, variant="edgy:start=copy"))


def test_loss_scaling_for_fp16_changes_nothing_but_the_scale(cache):
    """The fp16 path's GradScaler (exercised on CPU in fp32): a power-of-two scale, unscaled before the step, gives
    the same losses bit for bit as no scaler; its state travels in the checkpoint."""
    task, preset, root = prepare(config(cache, overrides={"max_batches": 3}))
    train_loader, _ = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    losses = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        torch.manual_seed(0)
        model = task.build_model(preset, num_classes=4)
        optimizer = build_optimizer(model, preset)
        device = torch.device("cpu")
        losses.append(
            [train_one_epoch(model, task, train_loader, optimizer, device, preset, e, scaler=scaler) for e in range(2)]
        )
    assert losses[0] == losses[1]
    checkpoints = []
    train(
        config(cache, overrides={"epochs": 1}),
        report=lambda m, f: checkpoints.append(torch.load(f / CHECKPOINT_FILE, weights_only=False)),
    )
    assert checkpoints[0]["scaler"] == {}  # fp32: a disabled scaler, nothing to restore


def test_a_diverging_trial_stops_at_the_first_bad_batch_and_says_why(cache, tmp_path):
    """A model whose logits overflow (classifier weights x 1e38, finite) gives an infinite loss at the first batch:
    the trial stops there, reports the reason once without a checkpoint, and its tracker records it."""
    task = get_task("classification")
    model = task.build_model(task.presets["smoke"], num_classes=4)
    state = model.state_dict()
    state["fc.weight"] = state["fc.weight"] * 1e38
    torch.save(state, tmp_path / "overflowing.pt")
    reports, tracker = [], RecordingTracker()
    out = train(
        config(cache, init=str(tmp_path / "overflowing.pt")),
        report=lambda metrics, folder: reports.append((metrics, folder)),
        tracker=tracker,
    )
    assert out["history"] == [] and out[FAILURE_KEY].startswith("diverged: train/loss is inf at epoch 0 batch 0")
    ((metrics, folder),) = reports  # once, with nothing to resume from: the last good checkpoint stays the last
    assert folder is None and metrics[FAILURE_KEY] == out[FAILURE_KEY] and metrics["epoch"] == 0
    assert [c[0] for c in tracker.calls] == ["epoch", "failure"] and tracker.calls[1][1] == out[FAILURE_KEY]


class BreaksAt(torch.nn.Module):
    """`model`, whose logits become non-finite after its `at`-th call (calls counted in `calls`)."""

    def __init__(self, model, at):
        super().__init__()
        self.model, self.at, self.calls = model, at, 0

    def forward(self, x):
        self.calls += 1
        out = self.model(x)
        return out * torch.inf if self.calls > self.at else out


def test_losses_are_read_once_per_window_and_name_the_first_bad_batch(cache, monkeypatch):
    """The loop reads the losses on the host every LOSS_READ_EVERY batches, not after each one: a loss that turns
    non-finite at batch 5 with windows of 4 stops the epoch at the end of that window (batch 7), and the failure
    names batch 5. A finite epoch's mean loss is the same whatever the window."""
    task, preset, root = prepare(config(cache, overrides={"max_batches": 10, "batch_size": 8}))
    train_loader, _ = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    assert loop.train_batches(train_loader, preset) == 10  # two full windows and a partial one
    monkeypatch.setattr(loop, "LOSS_READ_EVERY", 4)
    torch.manual_seed(0)
    model = BreaksAt(task.build_model(preset, num_classes=4), at=5)
    optimizer = build_optimizer(model, preset)
    with pytest.raises(DivergedError, match=r"^diverged: train/loss is (nan|inf) at epoch 3 batch 5 \(lr "):
        train_one_epoch(model, task, train_loader, optimizer, torch.device("cpu"), preset, 3)
    assert model.calls == 8  # batches 0-7: the window holding batch 5 ran to its end, no further

    means = []
    for window in (4, 1):
        monkeypatch.setattr(loop, "LOSS_READ_EVERY", window)
        torch.manual_seed(0)
        model = task.build_model(preset, num_classes=4)
        optimizer = build_optimizer(model, preset)
        means.append(train_one_epoch(model, task, train_loader, optimizer, torch.device("cpu"), preset, 0))
    assert means[0] == means[1] and means[0] > 0


STEP_FAULTS = """
import resource, sys, torch
from torch import nn
import convs
from orchestrator.loop import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
convs.convert(model, "edge")
optimizer = torch.optim.Adam(model.parameters())
x = torch.randn(8, 3, 96, 96)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    optimizer.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    optimizer.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[2:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc options")
def test_freed_memory_is_reused_by_the_next_steps():
    """With `keep_freed_memory` the steps after the first two fault almost no pages in: the memory their tensors
    need is what the previous step freed. Without it glibc unmaps large blocks on free and maps them again."""

    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert kept * 4 < default, (kept, default)
