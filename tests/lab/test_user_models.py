"""The user's own models and data from the command line: factories, calibration callables, local HF directories."""

import json
import textwrap

import pytest
import torch
from torch import nn

from trainlab.lab.user_models import (
    builtin_sentences,
    calibration_for,
    is_hf_directory,
    load_batches,
    load_model,
    load_object,
)

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def batches():
        g = torch.Generator().manual_seed(1)
        return [torch.randn(5, 8, generator=g) for _ in range(3)]

    not_a_model = 3

    def returns_a_number():
        return 3
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_models_fixture.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_models_fixture"


def test_factory_and_calibration_callables_load(user_module):
    user = load_model(f"{user_module}:make_model")
    assert isinstance(user.model, nn.Sequential) and user.hf_dir is None
    batches = load_batches(f"{user_module}:batches")
    assert len(batches) == 3 and batches[0].shape == (5, 8)
    assert calibration_for(user, f"{user_module}:batches", 4)[0][0].shape == (5, 8)
    assert calibration_for(user, None, 4)[0] == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "expects pkg.module:name"),
        ("surely_not_a_module_xyz:make", "cannot import module"),
        ("{m}:make_modle", "did you mean make_model"),
        ("{m}:not_a_model", "not a callable"),
        ("{m}:returns_a_number", "not a torch.nn.Module"),
    ],
)
def test_bad_model_specs_say_what_is_wrong(user_module, spec, message):
    with pytest.raises(ValueError, match=message):
        load_model(spec.format(m=user_module))


def test_a_path_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="without a config.json"):
        load_model(str(tmp_path))


def test_calibration_spec_must_give_batches(user_module):
    with pytest.raises(ValueError, match="iterable of batches"):
        load_batches(f"{user_module}:not_a_model")
    assert load_object(f"{user_module}:make_model")().__class__ is nn.Sequential


def test_builtin_sentences_are_fixed_and_offline():
    first, again = builtin_sentences(40), builtin_sentences(40)
    assert first == again and len(first) == 40 and len(set(first)) == 40
    assert all(len(s.split()) >= 4 for s in first)


def test_local_hugging_face_directory_loads_offline_with_its_class(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    assert is_hf_directory(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    user = load_model(str(tmp_path))
    assert type(user.model).__name__ == "BertForSequenceClassification" and user.hf_dir == tmp_path
    assert not user.model.training
