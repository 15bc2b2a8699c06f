"""`trainlab federate --engine ray`: Flower's Ray simulation gives the in-process grid's run; a clear error without
Ray."""

from __future__ import annotations

import sys

import pytest
import torch

from trainlab.lab.federate import FederateJob, _run


def test_engine_ray_without_ray_says_how_to_install(monkeypatch, capsys, tmp_path):
    from trainlab.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(["federate", "--engine", "ray", "--clients", "2", "--rounds", "1", "--out", str(tmp_path)]) == 2
    assert "pip install 'trainlab[federated-ray]'" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_simulation_matches_the_in_process_grid():
    pytest.importorskip("ray", reason="the federated-ray extra")
    job = dict(clients=4, rounds=2, eval_every=1, participation="uniform")
    ray = _run(FederateJob(**job, engine="ray"), "fedau", {})
    grid = _run(FederateJob(**job, engine="flower"), "fedau", {})
    assert ray.history == grid.history and [len(h["participants"]) for h in ray.history] != [0, 0]
    for key, value in grid.model.state_dict().items():
        torch.testing.assert_close(ray.model.state_dict()[key], value, rtol=0, atol=0)
