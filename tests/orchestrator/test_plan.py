"""The sweep's pure helpers, without Ray: the plan, --space, resources, settings, the comparison table, summaries."""

import math

import pytest

from orchestrator import sweep, tables
from orchestrator.cli import CliError
from orchestrator.config import SweepSettings, TrialConfig
from orchestrator.loop import summarize


def make_plan(*argv: str, cuda: bool = False) -> sweep.Plan:
    return sweep.plan(sweep.get_args_parser().parse_args(list(argv)), cuda=cuda, now=0)


def test_plan_defaults_every_variant_three_seeds_cpu_preset():
    p = make_plan("--task", "classification")
    assert p.variants == ("zero", "partial", "gated", "edge", "affine") and p.seeds == (0, 1, 2)
    assert p.preset_name == "cpu" and p.preset.epochs == p.overrides.get("epochs", p.preset.epochs)
    assert p.name.startswith("classification-cpu-19700101-") and p.search == "grid"
    assert p.storage.endswith("/sweeps") and p.storage.startswith("/")  # absolute: Ray workers run elsewhere
    assert p.tracking_uri.startswith("sqlite:////") and p.tracking_uri.endswith("/mlflow.db")
    assert make_plan("--task", "classification", cuda=True).preset_name == "thesis"


def test_plan_applies_overrides_and_names():
    p = make_plan("--task", "segmentation", "--preset", "smoke", "--epochs", "2", "--variants", "zero", "edge")
    assert p.preset.epochs == 2 and p.overrides == {"epochs": 2} and p.variants == ("zero", "edge")
    assert make_plan("--name", "mine", "--resume").resume and make_plan("--name", "mine").path.endswith("sweeps/mine")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "segmentatoin"], "Unknown task 'segmentatoin'. Known tasks: classification"),
        (["--variants", "edgy"], "Unknown conv variant 'edgy'. Known variants: .*edge"),
        (["--preset", "huge"], "unknown preset 'huge'.*thesis, cpu, smoke"),
        (["--seeds", "0"], "--seeds must be at least 1, got 0"),
        (["--workers-per-trial", "0"], "--workers-per-trial must be at least 1"),
        (["--max-failures", "-1"], "--max-failures must be at least 0"),
        (["--cpus-per-worker", "0"], "--cpus-per-worker must be > 0"),
        (["--resume"], "--resume needs --name"),
        (["--epochs", "-3"], "epochs=-3"),
        (["--epochs", "0"], "epochs=0"),
        (["--search", "optuna"], "--search optuna needs at least one --space"),
        (["--space", "lrr=uniform:0:1"], "unknown preset key 'lrr'"),
        (["--space", "lr=normal:0:1"], "expected KEY=DIST:ARGS"),
        (["--space", "lr=uniform:a:b"], "could not read the numbers"),
        (["--space", "lr=uniform:0.1:0.01"], "lower bound must be below"),
        (["--space", "lr=loguniform:0:1"], "loguniform needs bounds > 0"),
        (["--space", "lr=uniform:-1:1"], "can sample lr=-1.0, which the preset refuses"),
        (["--space", "epochs=randint:0:3"], "can sample epochs=0"),
        (["--space", "batch_size=choice:16,-2"], "can sample batch_size=-2"),
        (["--space", "synthetic=choice:1"], "unknown preset key 'synthetic'"),
        (["--search", "bayes"], "invalid choice: 'bayes'.*see python -m orchestrator.sweep --help"),
        (["--seeds", "three"], "invalid int value: 'three'"),
        (["--variants", "gated:norm=middle"], "norm"),
        (["--amp", "fp8"], "invalid choice: 'fp8'"),
        (["--bad-images", "ignore"], "invalid choice: 'ignore'"),
        (["--space", "bad_images=choice:fail,skip"], "unknown preset key 'bad_images'"),
        (["--task", "classification", "--workers-per-trial", "5"], "batch of 32 .* does not split across 5 workers"),
    ],
)
def test_plan_refuses_bad_arguments_with_the_fix(argv, message):
    with pytest.raises(CliError, match=message) as caught:
        make_plan(*argv)
    assert str(caught.value).startswith("error: ")  # one style for argparse's errors and ours


def test_plan_takes_variant_specs_amp_and_the_presets_default_arms():
    p = make_plan("--task", "classification", "--variants", "zero", "gated:norm=inside", "edge_no7", "--amp", "bf16")
    assert p.variants == ("zero", "gated:norm=inside", "edge_no7") and p.preset.amp == "bf16"
    assert p.overrides == {"amp": "bf16"} and make_plan("--amp", "off").preset.amp is None
    assert p.preset.bad_images == "fail" and make_plan("--bad-images", "skip").preset.bad_images == "skip"
    thesis = make_plan("--task", "classification", "--preset", "thesis")
    assert thesis.variants == thesis.preset.variants and "edge_no7" in thesis.variants
    assert make_plan("--task", "classification", "--workers-per-trial", "2").preset.batch_size % 2 == 0


def test_parse_space_reads_every_distribution():
    preset = make_plan("--task", "classification", "--preset", "smoke").preset
    space = sweep.parse_space(
        ["lr=loguniform:1e-4:1e-2", "weight_decay=uniform:0:1e-3", "epochs=randint:2:6", "batch_size=choice:16,32"],
        preset,
    )
    assert space == {
        "lr": ("loguniform", [1e-4, 1e-2]),
        "weight_decay": ("uniform", [0.0, 1e-3]),
        "epochs": ("randint", [2, 6]),
        "batch_size": ("choice", [16, 32]),
    }
    assert sweep.parse_space(["optimizer=choice:sgd,adam"], preset) == {"optimizer": ("choice", ["sgd", "adam"])}


def test_trial_resources_fit_the_cluster():
    p = make_plan("--task", "classification")
    assert sweep.trial_resources(p, {"CPU": 2.0}) == sweep.Resources(0.0, 2, 0)
    # loader workers per training process: (16 cores - 4 training processes - 1 for the node) // 4 GPUs
    assert sweep.trial_resources(p, {"CPU": 16.0, "GPU": 4.0}) == sweep.Resources(1.0, 4, 2)
    # per node, the smallest GPU node decides (a CPU-only head node does not count); half a GPU per worker: two
    # training processes per GPU
    nodes = [{"CPU": 4.0}, {"CPU": 16.0, "GPU": 1.0}, {"CPU": 32.0, "GPU": 2.0}]
    assert sweep.trial_resources(p, {"CPU": 52.0, "GPU": 3.0}, nodes).loader_workers == 14
    half = make_plan("--task", "classification", "--gpus-per-worker", "0.5")
    assert sweep.trial_resources(half, {"CPU": 52.0, "GPU": 3.0}, nodes).loader_workers == 6
    explicit = make_plan("--task", "classification", "--loader-workers", "3")
    assert sweep.trial_resources(explicit, {"CPU": 16.0, "GPU": 4.0}).loader_workers == 3
    two = make_plan("--task", "classification", "--workers-per-trial", "2", "--max-concurrent", "1")
    assert sweep.trial_resources(two, {"CPU": 16.0, "GPU": 8.0}).max_concurrent == 1
    with pytest.raises(CliError, match="one trial needs 2 CPUs and 0 GPUs but the cluster has 1 CPUs"):
        sweep.trial_resources(make_plan("--workers-per-trial", "2"), {"CPU": 1.0})
    with pytest.raises(CliError, match="needs 1 CPUs and 1 GPUs but the cluster has 4 CPUs and 0 GPUs"):
        sweep.trial_resources(make_plan("--gpus-per-worker", "1"), {"CPU": 4.0})
    # An autoscaling cluster with no GPU worker yet: every trial starts and waits for the nodes Ray adds for it.
    cluster = make_plan("--address", "auto", "--gpus-per-worker", "1", "--seeds", "2")
    assert cluster.preset_name == "thesis" and cluster.trial_count == 2 * len(cluster.variants)
    assert sweep.trial_resources(cluster, {"CPU": 4.0}) == sweep.Resources(
        1.0, cluster.trial_count, sweep.DEFAULT_GPU_LOADER_WORKERS
    )
    capped = make_plan("--address", "auto", "--gpus-per-worker", "1", "--max-concurrent", "3")
    assert sweep.trial_resources(capped, {"CPU": 4.0, "GPU": 1.0}).max_concurrent == 3


def test_sweep_settings_round_trip_and_read_an_older_sweep():
    settings = SweepSettings("s", "sqlite:////x.db", "1", "abc", ["zero", "edge"], [0, 1], "/tmp/s/train")
    assert SweepSettings.from_dict(settings.to_dict()) == settings
    # A sweep started before `local` existed resumes with the default.
    old = {k: v for k, v in settings.to_dict().items() if k != "local"}
    assert SweepSettings.from_dict(old).local is False
    with pytest.raises(ValueError, match=r"Unknown sweep setting\(s\) \['colour'\]"):
        SweepSettings.from_dict({**settings.to_dict(), "colour": "red"})
    # Optuna's Repeater index: variant-major, then init, then seed.
    assert [settings.identity({"__trial_index__": i}) for i in range(4)] == [
        ("zero", "scratch", 0),
        ("zero", "scratch", 1),
        ("edge", "scratch", 0),
        ("edge", "scratch", 1),
    ]
    two = SweepSettings.from_dict({**settings.to_dict(), "inits": ["scratch", "runs:/abc"]})
    assert [two.identity({"__trial_index__": i}) for i in (0, 1, 2, 3, 4, 7)] == [
        ("zero", "scratch", 0),
        ("zero", "scratch", 1),
        ("zero", "runs:/abc", 0),
        ("zero", "runs:/abc", 1),
        ("edge", "scratch", 0),
        ("edge", "runs:/abc", 1),
    ]
    assert SweepSettings.from_dict(old).inits == ["scratch"]  # a sweep from before --init
    config = {"task": "classification", "preset": "smoke", "space.lr": 0.01, "__trial_index__": 3}
    assert settings.trial_config(config) == TrialConfig(
        task="classification",
        variant="edge",
        seed=1,
        preset="smoke",
        overrides={"lr": 0.01},
        tracking_uri="sqlite:////x.db",
    )


def test_where_a_trial_trains_decides_what_its_tune_function_holds():
    """A single worker on a local Ray trains in the Tune function (Train's local mode): the function holds the
    worker's CPUs and GPUs. Otherwise Train's workers hold them and the function only a token of memory."""
    settings = SweepSettings("s", "sqlite:////x.db", "1", "abc", ["zero"], [0], "/tmp/s/train", in_function=True)
    assert settings.function_resources() == {"CPU": 1.0}
    gpu = SweepSettings.from_dict({**settings.to_dict(), "cpus_per_worker": 4.0, "gpus_per_worker": 0.5})
    assert gpu.function_resources() == {"CPU": 4.0, "GPU": 0.5}
    train = SweepSettings.from_dict({**gpu.to_dict(), "in_function": False})
    assert train.function_resources() == {"CPU": 0, "memory": 2**20}
    # A sweep saved before trials trained in their functions resumes them with Train's workers, as they started.
    old = {k: v for k, v in gpu.to_dict().items() if k != "in_function"}
    assert not SweepSettings.from_dict(old).in_function
    # The sweep decides it: one worker per trial on a local Ray; a cluster or DDP keeps Train's workers.
    assert make_plan("--task", "classification").trials_in_function
    assert not make_plan("--task", "classification", "--address", "auto").trials_in_function
    assert not make_plan("--task", "classification", "--workers-per-trial", "2").trials_in_function
    # Tune asks for it per trial, from the settings in the trial's own config (a resumed trial keeps its own).
    group = sweep.function_resources({SweepSettings.KEY: gpu.to_dict(), "seed": 0})
    assert group.bundles == [{"CPU": 4.0, "GPU": 0.5}]


def test_build_param_space_grid_and_optuna():
    p = make_plan("--task", "classification", "--variants", "zero", "edge", "--seeds", "2")
    settings = SweepSettings("s", "sqlite:////x.db", "1", "abc", list(p.variants), list(p.seeds), "/tmp/s/train")
    space, search, samples = sweep.build_param_space(p, settings, data_root=None, cache_dir="/c", loader_workers=0)
    assert search is None and samples == 1
    assert space["variant"] == {"grid_search": ["zero", "edge"]} and space["seed"] == {"grid_search": [0, 1]}
    assert SweepSettings.from_dict(space[SweepSettings.KEY]) == settings
    p = make_plan(
        *("--task", "classification", "--variants", "zero", "edge", "--seeds", "2"),
        *("--search", "optuna", "--num-samples", "3", "--space", "lr=loguniform:1e-4:1e-2"),
    )
    space, search, samples = sweep.build_param_space(p, settings, data_root=None, cache_dir="/c", loader_workers=0)
    assert samples == 3 * 4 and "variant" not in space and "space.lr" in space and search is not None


def test_columns_every_metric_at_the_best_epoch_then_last5_of_the_headline():
    assert tables.columns(("val/miou", "val/miou_tile")) == ["best/miou", "best/miou_tile", "last5/miou"]


def test_summarize_best_and_last_five():
    history = [{"val/top1": v, "val/top5": v + 10} for v in (10.0, 50.0, 40.0, 30.0, 20.0, 35.0, 45.0)]
    summary = summarize(history, ("val/top1", "val/top5"))
    assert summary["best/top1"] == 50.0 and summary["last5/top1"] == pytest.approx((40 + 30 + 20 + 35 + 45) / 5)
    assert summary["best/top5"] == 60.0
    assert summarize(history[:2], ("val/top1",)) == {"best/top1": 50.0, "last5/top1": 30.0}  # fewer than 5 epochs


def test_summarize_reports_every_mode_at_the_headline_best_epoch():
    """Thesis table 4.4: one model per run in three modes. The tiles peak at epoch 2, the whole image at epoch 1:
    best/miou_tile is the tiles' value at epoch 1, not their own maximum; ties go to the earliest epoch."""
    miou = (60.0, 70.0, 65.0, 70.0)
    tile = (61.0, 69.0, 75.0, 71.0)
    history = [{"val/miou": m, "val/miou_tile": t} for m, t in zip(miou, tile, strict=True)]
    summary = summarize(history, ("val/miou", "val/miou_tile"))
    assert summary == {
        "best/miou": 70.0,
        "last5/miou": pytest.approx(sum(miou) / 4),
        "best/miou_tile": 69.0,  # epoch 1, the first of the two epochs at 70.0
        "last5/miou_tile": pytest.approx(sum(tile) / 4),
    }
    history[0]["val/miou"] = math.nan  # an epoch without a value never wins
    assert summarize(history[:2], ("val/miou", "val/miou_tile"))["best/miou_tile"] == 69.0
