"""One matrix over every registered adapter method on toy float64 models."""

from __future__ import annotations

import pytest
import torch
from adapter_toys import TOY_CALLBACKS, TOY_CONFIGS, adapted, mlp, mse, perturb, regression_batch
from torch import nn

import trainlab.adapters as adapters
from trainlab.optim import create, optimizer_names

X = regression_batch(9)[0]


def test_every_method_has_a_toy_config() -> None:
    assert set(adapters.adapter_names()) == set(TOY_CONFIGS)


def test_output_unchanged_at_init_where_promised(method: str) -> None:
    plain, model = adapted(method)
    gap = (model(X) - plain(X)).abs().max().item()
    if adapters.get_spec(method).identity_at_init:
        assert gap < 1e-12
    else:  # SNELL (kernel init) and WeLore (compression) change the function by design
        assert gap > 1e-6


def test_attach_copies_and_attach_underscore_modifies(method: str) -> None:
    plain = mlp()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    adapters.attach(plain, method, targets=[nn.Linear], **TOY_CONFIGS[method])
    assert not adapters.adapter_layers(plain)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    assert all(p.requires_grad for p in plain.parameters())
    same = adapters.attach_(plain, method, targets=[nn.Linear], **TOY_CONFIGS[method])
    assert same is plain and adapters.adapter_layers(plain)


def test_forward_equals_merged_equals_unmerged(method: str) -> None:
    _, model = adapted(method)
    perturb(model)
    bases = {n: layer.base.state_dict() for n, layer in adapters.adapter_layers(model).items()}
    bases = {n: {k: v.clone() for k, v in sd.items()} for n, sd in bases.items()}
    y = model(X)
    adapters.merge(model)
    y_merged = model(X)
    adapters.unmerge(model)
    y_unmerged = model(X)
    y_plain = adapters.merged_copy(model)(X)
    for other in (y_merged, y_unmerged, y_plain):
        torch.testing.assert_close(other, y, rtol=0, atol=1e-12)
    for name, layer in adapters.adapter_layers(model).items():  # unmerge restores the base weights
        for key, value in layer.base.state_dict().items():
            torch.testing.assert_close(value, bases[name][key], rtol=0, atol=1e-12)


def test_merged_copy_is_plain_and_trainable(method: str) -> None:
    _, model = adapted(method)
    plain = adapters.merged_copy(model)
    assert not adapters.adapter_layers(plain)
    assert all(p.requires_grad for p in plain.parameters())
    assert adapters.adapter_layers(model)  # the adapted model is untouched


def test_save_load_reproduces_outputs_under_another_seed(method: str, tmp_path) -> None:
    plain, model = adapted(method)
    perturb(model)
    adapters.save_adapter(model, tmp_path)
    torch.manual_seed(12345)
    loaded = adapters.load_adapter(plain, tmp_path)
    torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=1e-12)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter.safetensors"))
    expected = sum(
        layer.adapter_state()[k].numel()
        for layer in adapters.adapter_layers(model).values()
        for k in layer.adapter_state()
    )
    assert sum(t.numel() for t in saved.values()) == expected  # adapter tensors only: no base weight
    assert not any(".base." in k for k in saved)
    assert not list(tmp_path.glob("*.tmp"))


def test_trainable_count_equals_formula(method: str) -> None:
    plain, model = adapted(method)
    spec, config = adapters.get_spec(method), adapters.adapter_info(model)["config"]
    expected = sum(
        spec.count(plain.get_submodule(name).weight.detach(), {**config, **layer.layer_kwargs()})
        for name, layer in adapters.adapter_layers(model).items()
    )
    assert adapters.count_trainable(model) == expected > 0


# GradNorm-LoRP weight-normalizes every matrix, which is undefined for a zero-initialized factor: those go to its
# AdamW route by name, as its error message says.
ZERO_INIT = r"(lora_B|lora_E|hut_V|s2|bone_block)$"


def _train(model: nn.Module, method: str, optimizer: str, steps: int = 4) -> None:
    if optimizer == "gradnorm-lorp":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = create(optimizer, named, lr=1e-2, exclude=ZERO_INIT)
    else:
        opt = create(optimizer, adapters.trainable_parameters(model), lr=1e-2)
    callback = adapters.training_callback(model, **TOY_CALLBACKS.get(method, {}))
    for step in range(1, steps + 1):
        batch = regression_batch(100 + step)

        def closure(batch=batch) -> torch.Tensor:
            opt.zero_grad()
            loss = mse(model, batch) + callback.regularizer()
            loss.backward()
            return loss

        opt.step(closure)
        callback.step(step)


def test_only_adapter_parameters_change(method: str) -> None:
    plain, model = adapted(method)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_before = mse(model, regression_batch(7)).item()
    _train(model, method, "adamw", steps=6)
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], v) for n, v in frozen.items())
    assert any(not torch.equal(named[n], v) for n, v in trainable.items())
    assert mse(model, regression_batch(7)).item() != loss_before


@pytest.mark.parametrize("optimizer", optimizer_names())
def test_trains_with_every_trainlab_optimizer(method: str, optimizer: str) -> None:
    _, model = adapted(method)
    before = [p.clone() for p in adapters.trainable_parameters(model)]
    if optimizer == "mkor":  # preconditions nn.Linear/Conv2d weights only; adapter factors live in neither
        with pytest.raises(RuntimeError, match=r"mkor has not seen(.|\n)*adapter factors(.|\n)*train those with adamw"):
            _train(model, method, optimizer, steps=2)
        return
    _train(model, method, optimizer, steps=2)
    after = adapters.trainable_parameters(model)
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_bad_targets_raise_naming_the_pattern(method: str) -> None:
    model, config = mlp(), TOY_CONFIGS[method]
    with pytest.raises(ValueError, match="'attn.nowhere'"):
        adapters.attach(model, method, targets=["attn.nowhere"], **config)
    with pytest.raises(TypeError, match=r"'1'.*ReLU"):  # Sequential index 1 is the ReLU
        adapters.attach(model, method, targets=["0", "1"], **config)
    with pytest.raises(ValueError, match="targets"):
        adapters.attach(model, method, targets=[], **config)
    with pytest.raises(ValueError, match="unknown option"):
        adapters.attach(model, method, targets=[nn.Linear], not_an_option=1, **config)


def test_conv2d_only_where_the_method_defines_it(method: str) -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    config = dict(TOY_CONFIGS[method])
    if method in ("lora", "lora-ga", "adalora", "hut", "snell"):
        config["r"] = 2
    if "conv2d" not in adapters.get_spec(method).layer_types:
        with pytest.raises(TypeError, match="Conv2d"):
            adapters.attach(conv, method, targets=[nn.Conv2d], **config)
        return
    model = adapters.attach(conv, method, targets=[nn.Conv2d], **config)
    adapters.prepare(model, [x], loss=lambda m, b: m(b).pow(2).mean())
    perturb(model)
    y = model(x)
    torch.testing.assert_close(adapters.merged_copy(model)(x), y, rtol=0, atol=1e-12)


def test_unknown_method_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown adapter method 'nope'"):
        adapters.attach(mlp(), "nope", targets=[nn.Linear])
    with pytest.raises(ValueError, match="r=0"):
        adapters.attach(mlp(), "lora", targets=[nn.Linear], r=0)
    with pytest.raises(TypeError, match="r must be an integer"):
        adapters.attach(mlp(), "lora", targets=[nn.Linear], r=2.5)
    with pytest.raises(ValueError, match="direction"):
        adapters.attach(mlp(), "lora-ga", targets=[nn.Linear], r=2, direction="sideways")


def test_lora_ga_refuses_to_train_unprepared() -> None:
    model = adapters.attach(mlp(), "lora-ga", targets=[nn.Linear], r=4)
    with pytest.raises(RuntimeError, match="prepare"):
        mse(model, regression_batch(0)).backward()


def test_hf_conv1d_is_adapted_like_a_linear() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(32, 16), nn.ReLU(), Conv1D(16, 32)).double()
    for method in ("lora", "adalora", "bone", "welore"):
        adapted_model = adapters.attach(model, method, targets=[Conv1D], **TOY_CONFIGS[method])
        perturb(adapted_model)
        torch.testing.assert_close(adapters.merged_copy(adapted_model)(X), adapted_model(X), rtol=0, atol=1e-12)
