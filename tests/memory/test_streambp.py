"""StreamBP gives standard backprop's loss and gradients, with fewer bytes saved for backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainlab.lab.runner import train
from trainlab.lab.workloads.pylm import ByteTransformer, lm_loss, pylm
from trainlab.memory import SavedTensorMeter, adapter_for, streambp_backward, streambp_lm_loss, streambp_loss


def _small(dtype: torch.dtype, t: int = 256) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = ByteTransformer(context=t, d_model=64, n_layers=2, n_heads=4).to(dtype)
    g = torch.Generator().manual_seed(1)
    return model, torch.randint(0, 256, (2, t), generator=g), torch.randint(0, 256, (2, t), generator=g)


def _standard(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, (tokens, targets))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _max_grad_diff(model: nn.Module, ref: dict) -> float:
    return max((p.grad - ref[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize(("chunk", "logits_chunk"), [(64, 128), (100, 77), (256, 256), (37, 1)])
def test_loss_and_gradients_equal_standard_backprop(dtype, tol, chunk, logits_chunk):
    model, tokens, targets = _small(dtype)
    ref_loss, ref = _standard(model, tokens, targets)
    model.zero_grad(set_to_none=True)
    loss = streambp_backward(model, tokens, targets, chunk_size=chunk, logits_chunk_size=logits_chunk)
    assert loss.dtype == dtype
    assert abs(loss.item() - ref_loss) <= tol
    assert _max_grad_diff(model, ref) <= tol


def test_ignore_index_scaled_loss_and_accumulation_match_standard():
    model, tokens, targets = _small(torch.float64, t=64)
    targets[:, :10] = -100
    model.zero_grad(set_to_none=True)
    ref_loss = 3 * lm_loss(model, (tokens, targets))
    ref_loss.backward()
    lm_loss(model, (tokens, targets)).backward()  # accumulates: 4x the gradient in all
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = 3 * streambp_loss(model, tokens, targets, chunk_size=24, logits_chunk_size=16)
    loss.backward()
    streambp_backward(model, tokens, targets, chunk_size=64)
    assert abs(loss.item() - ref_loss.item()) <= 1e-10
    assert _max_grad_diff(model, ref) <= 1e-10


def test_default_chunks_and_frozen_head_and_embeddings():
    model, tokens, targets = _small(torch.float64, t=128)
    for p in (model.lm_head.weight, model.embed.weight, model.pos_embed.weight):
        p.requires_grad_(False)
    _, ref = _standard(model, tokens, targets)
    model.zero_grad(set_to_none=True)
    streambp_backward(model, tokens, targets)
    assert model.lm_head.weight.grad is None
    assert _max_grad_diff(model, ref) <= 1e-10


def test_peak_saved_bytes_halve_at_context_1024():
    torch.manual_seed(0)
    model = ByteTransformer(context=1024)  # the pylm model, at a long context
    g = torch.Generator().manual_seed(0)
    tokens, targets = torch.randint(0, 256, (2, 1024), generator=g), torch.randint(0, 256, (2, 1024), generator=g)
    with SavedTensorMeter(exclude=model.parameters()) as standard:
        lm_loss(model, (tokens, targets)).backward()
    model.zero_grad(set_to_none=True)
    with SavedTensorMeter(exclude=model.parameters()) as stream:
        streambp_backward(model, tokens, targets)
    assert standard.live_bytes == stream.live_bytes == 0  # every graph was freed
    # The blocks' inputs (3 x 2x1024x128 floats) are saved by StreamBP itself, so this is not a trivial bound.
    assert stream.peak_bytes > 3 * 2 * 1024 * 128 * 4
    assert standard.peak_bytes >= 2 * stream.peak_bytes


def test_meter_counts_saved_bytes_until_the_graph_is_freed():
    w = nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorMeter(exclude=[w]) as meter:
        y = torch.tanh(x @ w)  # saves x (w excluded) and tanh's output: 2 x 32 floats
        assert meter.live_bytes == 2 * 32 * 4
        y.sum().backward()
    assert meter.peak_bytes == 2 * 32 * 4
    assert meter.live_bytes == 0


def test_training_steps_equal_standard_steps():
    model, tokens, targets = _small(torch.float64, t=96)
    twin = ByteTransformer(context=96, d_model=64, n_layers=2, n_heads=4).to(torch.float64)
    twin.load_state_dict(model.state_dict())
    opt, twin_opt = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, twin))
    for step in range(3):
        batch = tokens.roll(step, 1), targets.roll(step, 1)
        opt.zero_grad(set_to_none=True)
        streambp_backward(model, *batch, chunk_size=40, logits_chunk_size=30)
        opt.step()
        twin_opt.zero_grad(set_to_none=True)
        lm_loss(twin, batch).backward()
        twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


def test_runner_trains_pylm_with_streambp_loss():
    # SGD, not Adam: Adam's first steps are ~lr * sign(g), which turns float32 rounding of near-zero gradient
    # entries into lr-sized differences. The float64 AdamW test above covers Adam exactly.
    workload = pylm()
    runs = [
        train(workload, lambda m: torch.optim.SGD(m.parameters(), lr=0.3), steps=3, batch_size=4, loss_fn=fn)
        for fn in (None, streambp_lm_loss)
    ]
    assert runs[1].train_losses == pytest.approx(runs[0].train_losses, abs=1e-6)
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_rejects_bad_arguments_and_models():
    model, tokens, targets = _small(torch.float32, t=32)
    with pytest.raises(ValueError, match="chunk_size"):
        streambp_loss(model, tokens, targets, chunk_size=0)
    with pytest.raises(ValueError, match="logits_chunk_size"):
        streambp_loss(model, tokens, targets, logits_chunk_size=2.5)
    with pytest.raises(ValueError, match="targets"):
        streambp_loss(model, tokens, targets[:, 1:])
    with pytest.raises(ValueError, match="context"):
        streambp_loss(model, torch.zeros(1, 33, dtype=torch.long), torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="missing: .*ln_f"):
        streambp_loss(nn.Sequential(nn.Embedding(256, 8)), tokens, targets)
    model.blocks[0].mlp.add_module("drop", nn.Dropout(0.1))
    with pytest.raises(ValueError, match="dropout"):
        streambp_loss(model, tokens, targets)


def test_adapter_matches_the_model_forward():
    model, tokens, _ = _small(torch.float64, t=64)
    adapter = adapter_for(model)
    with torch.no_grad():
        h = adapter.embed(tokens)
        for block in adapter.blocks:
            h = torch.cat([adapter.block_chunk(block, h[:, :e], s) for s, e in ((0, 20), (20, 50), (50, 64))], 1)
        torch.testing.assert_close(adapter.head(h), model(tokens), rtol=0, atol=1e-12)
        torch.testing.assert_close(F.log_softmax(adapter.head(h), -1).exp().sum(-1), torch.ones(2, 64, dtype=h.dtype))
