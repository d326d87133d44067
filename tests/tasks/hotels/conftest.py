"""The hotels stand-in at smoke size, generated once for all hotel tests.

Written with `write_synthetic` directly (not `tasks.ensure_synthetic`, which needs the registered task), with the
smoke preset's spec and seed 0; `plan` is what the generator planted, to check the loader against.
"""

import pytest

from tasks.hotels.data import load_index
from tasks.hotels.presets import PRESETS
from tasks.hotels.synthetic import synthetic_plan, write_synthetic


@pytest.fixture(scope="session")
def preset():
    return PRESETS["smoke"]


@pytest.fixture(scope="session")
def plan(preset):
    return synthetic_plan(preset.synthetic, seed=0)


@pytest.fixture(scope="session")
def root(preset, tmp_path_factory):
    root = tmp_path_factory.mktemp("hotels-cache") / "hotels-smoke"
    write_synthetic(root, preset.synthetic, seed=0)
    return root


@pytest.fixture(scope="session")
def index(root, preset):
    return load_index(root, min_images=preset.min_images)
