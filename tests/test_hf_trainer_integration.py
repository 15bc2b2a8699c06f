"""trainlab optimizers in the Hugging Face Trainer: selection by name, real per-group learning rates logged, and
AdaHessian through a Trainer that steps with a closure."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from trainlab.integrations.hf_trainer import ClosureTrainer, GroupLearningRates, trainer_optimizer  # noqa: E402


def _model():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (16, 6), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": int(ids[i, 0] % 2)}
            for i in range(16)]  # fmt: skip


def _args(tmp_path, **extra):
    return transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True, **extra)  # fmt: skip


def test_muon_by_name_with_each_groups_real_learning_rate_logged(tmp_path):
    model = _model()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, learning_rate=1.0), train_dataset=_data(),
                                   optimizer_cls_and_kwargs=trainer_optimizer("muon", lr=0.02, adamw_lr=1e-3),
                                   callbacks=[GroupLearningRates()])  # fmt: skip
    before = model.bert.embeddings.word_embeddings.weight.detach().clone()
    trainer.train()
    chains = {id(p): g["chain"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert chains[id(model.bert.embeddings.word_embeddings.weight)] == "adamw"  # by module type
    assert chains[id(model.classifier.weight)] == "adamw" and chains[id(model.bert.pooler.dense.weight)] == "muon"
    logged = [entry for entry in trainer.state.log_history if any(k.startswith("lr/") for k in entry)]
    assert len(logged) == 4  # three steps and the closing summary
    first = logged[0]
    muon = [v for k, v in first.items() if k.startswith("lr/muon")]
    adamw = [v for k, v in first.items() if k.startswith("lr/adamw")]
    # the Trainer's linear decay scales each group from its own lr: 0.02 and 1e-3 at the same ratio
    assert muon and adamw and muon[0] / adamw[0] == pytest.approx(20)
    assert not torch.equal(before, model.bert.embeddings.word_embeddings.weight)


def test_adahessian_needs_the_closure_trainer(tmp_path):
    with pytest.raises(ValueError, match="pass a closure"):
        transformers.Trainer(model=_model(), args=_args(tmp_path), train_dataset=_data(),
                             optimizer_cls_and_kwargs=trainer_optimizer("adahessian", lr=0.1)).train()  # fmt: skip
    model = _model()
    trainer = ClosureTrainer(model=model, args=_args(tmp_path, max_grad_norm=0.0), train_dataset=_data(),
                             optimizer_cls_and_kwargs=trainer_optimizer("adahessian", lr=0.1))  # fmt: skip
    before = model.classifier.weight.detach().clone()
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss)) and result.global_step == 3
    assert not torch.equal(before, model.classifier.weight)
    state = trainer.optimizer.state[model.classifier.weight]
    assert any("hessian" in k or "exp_hessian" in k or "hz" in k.lower() for k in state)  # the curvature was measured


def test_bad_names_fail_before_the_trainer_starts():
    with pytest.raises(ValueError, match="unknown optimizer"):
        trainer_optimizer("adamW")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        trainer_optimizer("muon", lrr=0.1)
