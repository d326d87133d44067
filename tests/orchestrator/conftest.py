"""One local Ray session for all orchestrator tests (ray.init costs seconds; share it)."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, configure_logging=False)
    yield ray
    ray.shutdown()
