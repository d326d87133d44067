"""The segmentation task and its smoke-sized synthetic dataset, generated once for all segmentation tests."""

import pytest

from tasks import ensure_synthetic, get_task


@pytest.fixture(scope="session")
def task():
    return get_task("segmentation")


@pytest.fixture(scope="session")
def root(task, tmp_path_factory):
    return ensure_synthetic(task, task.presets["smoke"], tmp_path_factory.mktemp("segmentation-cache"))
