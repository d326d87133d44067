"""The task registry and the interface every task honours (parametrized: a new task is checked automatically)."""

from dataclasses import fields

import pytest

import tasks
from tasks import Preset, get_task


def test_unknown_task_lists_choices():
    with pytest.raises(ValueError, match="Unknown task 'segmentatoin'. Known tasks: classification"):
        get_task("segmentatoin")


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_task_has_the_same_shape(name):
    task = get_task(name)
    assert task.name == name and issubclass(task.preset_class, Preset)
    assert {"thesis", "cpu", "smoke"} <= set(task.presets)
    for preset in task.presets.values():
        assert type(preset) is task.preset_class
    assert task.metric == task.table_metrics[0] and "/" in task.metric  # "val/top1", "test_unoccluded/..."
    assert "zero" in task.variants and task.layout and isinstance(task.takes_masks, bool)
    for method in ("check_layout", "write_synthetic", "build_loaders", "build_model", "load_pretrained", "loss"):
        assert callable(getattr(task, method)), method
    package = __import__(f"tasks.{name}", fromlist=["*"])
    for module in ("data", "synthetic", "model", "metrics", "presets", "task"):
        assert hasattr(package, module), f"tasks/{name}/{module}.py: every task package has the same files"


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_preset_fields_are_the_shared_ones_plus_the_task_own(name):
    own = {f.name for f in fields(get_task(name).preset_class)}
    assert {f.name for f in fields(Preset)} < own
