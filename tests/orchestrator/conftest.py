"""One local Ray session for all orchestrator tests (ray.init costs seconds; share it)."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server on 127.0.0.1 (started only for tests that ask for it), see s3_server.py."""
    from .s3_server import S3Server

    server = S3Server.start()
    yield server
    server.stop()
