"""The `trainlab compress` command-line runs share one cache of short dense training runs."""

import pytest

from trainlab.cli import main

DENSE_STEPS = 40  # a short dense run keeps the tests fast; the checkpoint is cached per (workload, seed, steps)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def dense_steps() -> int:
    return DENSE_STEPS


@pytest.fixture(scope="session")
def compress_cli():
    """``compress_cli(cache, out, *args)``: `trainlab compress ARGS` on a DENSE_STEPS-step dense model; exit code."""

    def run(cache, out, *args) -> int:
        argv = ["compress", *args, "--steps", str(DENSE_STEPS), "--cache-dir", str(cache), "--out", str(out)]
        return main([*argv, "--quiet"])

    return run
