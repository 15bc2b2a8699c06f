import dataclasses
import math
import time

import pytest
import torch

from trainlab.lab.runner import train
from trainlab.optim import create


def _adamw(model):
    return create("adamw", model.parameters(), lr=1e-2)


class Killed(Exception):
    pass


@pytest.mark.parametrize("algorithm", ["adamw", "sgd", "torch-adamw"])
def test_resume_after_kill_is_bitwise_identical(tiny, tmp_path, algorithm):
    def make(model):
        return create(algorithm, model.parameters(), lr=1e-2)

    full = train(tiny, make, seed=3, steps=60)

    def kill_at_35(step, model):
        if step == 35:
            raise Killed

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Killed):
        train(tiny, make, seed=3, steps=60, on_gradients=kill_at_35, checkpoint=ckpt, checkpoint_every=20)
    assert torch.load(ckpt, weights_only=True)["run"]["step"] == 20
    resumed = train(tiny, make, seed=3, steps=60, checkpoint=ckpt, checkpoint_every=20, resume=True)
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.train_losses == full.train_losses
    assert [p["metric"] for p in resumed.curve] == [p["metric"] for p in full.curve]


def test_same_seed_same_run_other_seed_other_run(tiny):
    a, b, c = (train(tiny, _adamw, seed=s, steps=20) for s in (0, 0, 1))
    assert a.train_losses == b.train_losses
    assert a.train_losses != c.train_losses


def test_curve_and_time_to_target(tiny):
    result = train(tiny, _adamw, seed=0)
    assert [p["step"] for p in result.curve] == list(range(10, 61, 10))
    assert len(result.train_losses) == 60 and len(result.step_times_s) == 60
    assert result.steps_to_target is not None and result.steps_to_target % 10 == 0
    first_hit = next(p for p in result.curve if p["metric"] >= tiny.target)
    assert result.steps_to_target == first_hit["step"]
    assert result.time_to_target_s == first_hit["wall_time_s"] <= result.wall_time_s
    # the curve's train loss is the mean of the per-step losses since the previous evaluation
    assert result.curve[0]["train_loss"] == pytest.approx(sum(result.train_losses[:10]) / 10)
    assert result.best_metric == max(p["metric"] for p in result.curve)


def test_evaluation_and_data_loading_are_off_the_clock(tiny):
    def slow(fn, seconds):
        def wrapped(*args):
            time.sleep(seconds)
            return fn(*args)

        return wrapped

    # Six evaluations of 0.2 s and a first batch of 0.5 s (data loading) would add 1.7 s to the clock.
    calls = []

    def first_call_loads(*args):
        if not calls:
            time.sleep(0.5)
        calls.append(args)
        return tiny.make_batch(*args)

    slowed = dataclasses.replace(tiny, evaluate=slow(tiny.evaluate, 0.2), make_batch=first_call_loads)
    result = train(slowed, _adamw, seed=0)
    assert result.wall_time_s < 0.5 and result.wall_time_s >= sum(result.step_times_s)


def test_stop_at_target_stops_early(tiny):
    result = train(tiny, _adamw, seed=0, stop_at_target=True)
    assert result.curve[-1]["step"] == result.steps_to_target < 60


def _explode_at_13(step, model):
    if step == 13:
        for p in model.parameters():
            p.grad.fill_(float("nan"))


def _sgd(model):
    return create("sgd", model.parameters(), lr=0.1)


def test_divergence_is_recorded_with_its_step_and_the_last_finite_checkpoint_kept(tiny, tmp_path, capsys):
    ckpt = tmp_path / "div.pt"
    result = train(tiny, _sgd, seed=0, on_gradients=_explode_at_13, checkpoint=ckpt, checkpoint_every=10)
    # step 13 (0-based) poisons the weights, so the loss of step 15 (1-based) is the first non-finite one
    assert result.diverged and result.diverged_at == 15
    assert len(result.train_losses) == 15 and math.isnan(result.train_losses[-1])
    assert all(math.isfinite(v) for v in result.train_losses[:-1])
    assert math.isnan(result.final_metric)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["run"]["step"] == 10 and saved["run"]["diverged_at"] == -1
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    err = capsys.readouterr().err
    assert "non-finite training loss or weights at step 15" in err and f"{ckpt} keeps step 10" in err
    # resuming from the last finite state replays the divergence exactly
    again = train(tiny, _sgd, seed=0, on_gradients=_explode_at_13, checkpoint=ckpt, checkpoint_every=10, resume=True)
    assert again.diverged_at == 15 and again.train_losses[:14] == result.train_losses[:14]


def test_non_finite_weights_are_caught_at_a_checkpoint_before_the_next_evaluation(tiny, tmp_path, capsys):
    def poison_weights_at_11(step, model):
        if step == 11:  # the weights after step 12 (1-based) are NaN; the evaluation at step 20 is not reached
            for p in model.parameters():
                p.grad.fill_(float("inf"))

    ckpt = tmp_path / "div.pt"
    result = train(tiny, _sgd, seed=0, eval_every=20, on_gradients=poison_weights_at_11, checkpoint=ckpt,
                   checkpoint_every=12)  # fmt: skip
    assert result.diverged_at == 12 and result.curve[-1]["step"] == 12
    assert not ckpt.exists()  # the checkpoint due at step 12 held NaN weights: not written
    assert "no finite checkpoint was written before it" in capsys.readouterr().err


def test_the_final_step_is_checkpointed(tiny, tmp_path):
    ckpt = tmp_path / "run.pt"
    train(tiny, _adamw, seed=0, steps=25, checkpoint=ckpt, checkpoint_every=10)
    assert torch.load(ckpt, weights_only=True)["run"]["step"] == 25


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 40}, "steps: checkpoint 60, now 40"),
        ({"config": {"lr": 0.5}}, "lr: checkpoint 0.01, now 0.5"),
        ({"config": {"lr": 0.01, "schedule": "wsd"}}, "schedule: checkpoint '(unset)', now 'wsd'"),
        ({"seed": 1}, "seed: checkpoint 0, now 1"),
    ],
)
def test_resume_refuses_another_configuration_naming_the_fields(tiny, tmp_path, change, message):
    ckpt = tmp_path / "run.pt"
    train(tiny, _adamw, seed=0, steps=60, checkpoint=ckpt, checkpoint_every=20, config={"lr": 0.01})
    kwargs = {"seed": 0, "steps": 60, "config": {"lr": 0.01}, **change}
    with pytest.raises(ValueError, match="another run configuration") as err:
        train(tiny, _adamw, checkpoint=ckpt, checkpoint_every=20, resume=True, **kwargs)
    assert message in str(err.value)


def test_a_truncated_checkpoint_is_named_with_what_to_do(tiny, tmp_path):
    ckpt = tmp_path / "run.pt"
    train(tiny, _adamw, seed=0, steps=20, checkpoint=ckpt, checkpoint_every=10)
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    with pytest.raises(ValueError, match=f"checkpoint {ckpt} cannot be read .*delete it to start that run from step 0"):
        train(tiny, _adamw, seed=0, steps=20, checkpoint=ckpt, checkpoint_every=10, resume=True)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"batch_size": -1}, {"eval_every": 1.5}])
def test_bad_arguments(tiny, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        train(tiny, _adamw, **kwargs)


def test_growing_batch_counts_samples_and_resumes_bitwise(tiny, tmp_path):
    from trainlab.schedules.batch_size import AdaptiveBatchSize

    def controller():  # grows 4 -> 26 over the 30 steps
        return AdaptiveBatchSize(4, 64, eta=1.0, test_samples=16)

    full_sizes = controller()
    full = train(tiny, _adamw, seed=1, steps=30, eval_every=10, batch_sizes=full_sizes)
    sizes = full_sizes.history
    assert len(sizes) == 30 and sizes[0] == 4 and sizes == sorted(sizes) and sizes[-1] > 4
    assert full.samples == sum(sizes) and [p["samples"] for p in full.curve] == [sum(sizes[:k]) for k in (10, 20, 30)]

    def kill_at_25(step, model):
        if step == 25:
            raise Killed

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Killed):
        train(
            tiny,
            _adamw,
            seed=1,
            steps=30,
            eval_every=10,
            batch_sizes=controller(),
            on_gradients=kill_at_25,
            checkpoint=ckpt,
            checkpoint_every=10,
        )
    resumed_sizes = controller()
    resumed = train(
        tiny,
        _adamw,
        seed=1,
        steps=30,
        eval_every=10,
        batch_sizes=resumed_sizes,
        checkpoint=ckpt,
        checkpoint_every=10,
        resume=True,
    )
    assert resumed_sizes.history == sizes and resumed.samples == full.samples
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
