"""The lab's compression glue hands the library a workload's batches and loss: calibration inputs are the inputs
of the calibration batches (a seed no training run uses), and PERP on a workload is the library's PERP on the
workload's training batches."""

import copy

import torch

from trainlab.compress import recover
from trainlab.compress.plan import Plan
from trainlab.lab import compression
from trainlab.lab.workloads import get_workload
from trainlab.runtime import batch_generator


def test_calibration_inputs_are_the_calibration_batches_inputs_and_not_training_batches():
    w = get_workload("digits-mlp")
    inputs = compression.calibration_inputs(w, 3)
    batches = compression.calibration_batches(w, 3)
    assert len(inputs) == 3 and all(torch.equal(x, b[0]) for x, b in zip(inputs, batches, strict=True))
    assert inputs[0].shape[0] == w.batch_size
    train0 = w.make_batch(w.batch_size, batch_generator(0, 0))[0]
    assert not torch.equal(inputs[0], train0)


def test_perp_on_a_workload_is_the_library_perp_on_its_training_batches():
    w = get_workload("digits-mlp")
    torch.manual_seed(0)
    model = w.make_model()
    Plan([(".*", "magnitude", 0.7)]).apply(model)
    twin = copy.deepcopy(model)
    torch.manual_seed(1)
    fraction = compression.recover_perp(model, w, steps=4, lr=1e-3, seed=3)
    torch.manual_seed(1)  # the LoRA factors' initialization draws from the global generator
    batches = [w.make_batch(w.batch_size, batch_generator(3, step)) for step in range(4)]
    assert recover.recover_perp(twin, batches, w.loss, lr=1e-3) == fraction
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True))
