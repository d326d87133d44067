"""The classification task and its smoke-sized synthetic dataset, generated once for all classification tests."""

import pytest

from tasks import ensure_synthetic, get_task


@pytest.fixture(scope="session")
def task():
    return get_task("classification")


@pytest.fixture(scope="session")
def root(task, tmp_path_factory):
    return ensure_synthetic(task, task.presets["smoke"], tmp_path_factory.mktemp("classification-cache"))
