"""The ground floor: the eval-mode context restores every submodule's own mode; seeded batch generators."""

import pytest
import torch
from torch import nn

from trainlab.runtime import atomic_path, batch_generator, evaluating


def test_evaluating_restores_each_submodules_own_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2)))
    model.eval()
    model[0].train()  # mixed modes, as in a wrapped model whose head trains under a frozen backbone
    before = [m.training for m in model.modules()]
    with evaluating(model):
        assert not any(m.training for m in model.modules())
        assert not torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == before


def test_evaluating_restores_modes_after_an_exception():
    model = nn.Sequential(nn.Dropout(0.1), nn.Linear(2, 2))
    model.train()
    model[1].eval()
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("boom")
    assert model.training and model[0].training and not model[1].training


def test_batch_generator_is_seeded_per_run_and_step():
    draw = lambda seed, step: torch.rand(3, generator=batch_generator(seed, step))  # noqa: E731
    assert torch.equal(draw(1, 5), draw(1, 5))
    assert not torch.equal(draw(1, 5), draw(1, 6))
    assert not torch.equal(draw(1, 5), draw(2, 5))


def test_atomic_path_writes_whole_files_or_nothing(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "new"
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]
