"""Our optimizers and schedules drop into the Hugging Face Trainer: it steps them, and its checkpoints resume."""

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

import trainlab.optim as optim
from trainlab.schedules import create_scheduler


class Regressor(nn.Module):
    """The Trainer's model contract: keyword inputs in, a dict with "loss" out."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.net(x).squeeze(-1), labels)}


def _dataset(n: int = 64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    y = x[:, :3].sum(-1)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _trainer(out, max_steps: int, algorithm: str = "stable-spam") -> tuple[Trainer, Regressor]:
    torch.manual_seed(0)
    model = Regressor()
    opt = optim.create(algorithm, model.named_parameters(), lr=1e-2)
    sched = create_scheduler("wsd", opt, total_steps=20)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=16,
        save_strategy="steps",
        save_steps=10,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=_dataset(), optimizers=(opt, sched)), model


def test_trainer_steps_our_optimizer_and_schedule(tmp_path):
    trainer, model = _trainer(tmp_path, max_steps=20)
    before = trainer.evaluate(_dataset())["eval_loss"]
    trainer.train()
    after = trainer.evaluate(_dataset())["eval_loss"]
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, optim.ChainOptimizer)
    assert after < 0.5 * before
    assert trainer.lr_scheduler.last_epoch == 20


def test_trainer_resume_matches_uninterrupted_run(tmp_path):
    full, full_model = _trainer(tmp_path / "full", max_steps=20)
    full.train()
    # The interrupted run stops at its step-10 checkpoint; a fresh Trainer resumes from it.
    cut, _ = _trainer(tmp_path / "cut", max_steps=10)
    cut.train()
    resumed, resumed_model = _trainer(tmp_path / "cut", max_steps=20)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-10"))
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
