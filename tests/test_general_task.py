"""The general Task: any input structure, its loss, distillation by output kind, the optimizer, pretrained teachers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from autocompress import inputs as pytree
from autocompress.compress.distill import OptimizerSettings, fit, kd_loss, soft_loss
from autocompress.config import FinetuneConfig, TeacherConfig
from autocompress.errors import AutocompressError
from autocompress.evaluators import evaluate
from autocompress.tasks import Task
from autocompress.teacher import get_teacher


class TokenData(Dataset):
    """Dict inputs with int64 ids and a mask; the target is the sum of the unmasked ids mod 2."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 20, (n, 6), generator=g)
        self.mask = (torch.rand(n, 6, generator=g) > 0.2).long()
        self.y = ((self.ids * self.mask).sum(1) % 2).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.y[i]


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.fc = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.fc(h.sum(1))


def token_task(**kw) -> Task:
    kw.setdefault("build_model", TokenModel)
    return Task(name="tokens", train=TokenData(64, 0), val=TokenData(32, 1), test=TokenData(32, 2), **kw)


def test_dict_int64_inputs_train_and_evaluate_and_give_real_example_inputs():
    task = token_task()
    example = task.example_input(3)
    assert set(example) == {"input_ids", "attention_mask"} and example["input_ids"].dtype == torch.int64
    assert torch.equal(example["input_ids"], task.val.ids[:3])  # from the data, not randn
    assert pytree.batch_size(task.example_input(40)) == 40  # repeats a small split to the batch asked
    model = task.build_model()
    history = fit(model, task.loader("train", 16, shuffle=True), epochs=2,
                  optimizer=OptimizerSettings("adamw", lr=1e-2, weight_decay=0.0, warmup=0.2),
                  evaluate=lambda m: evaluate(m, task.loader("val", 16), task.metric))
    assert len(history.val_metric) == 2 and 0.0 <= history.val_metric[-1] <= 1.0
    assert history.train_loss[-1] < history.train_loss[0]


def test_distillation_follows_the_output_kind():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    assert soft_loss(s, 2 * s, "embedding").item() == pytest.approx(0.0, abs=1e-6)  # same direction
    assert soft_loss(s, -s, "embedding").item() == pytest.approx(2.0)
    assert soft_loss(s, s + 1, "regression").item() == pytest.approx(1.0)
    assert soft_loss(s, s, "logits").item() == pytest.approx(0.0, abs=1e-6)
    y = torch.tensor([0.5])
    mse = kd_loss(s.sum(1), (s + 1).sum(1), y, alpha=0.5, loss=F.mse_loss, kind="regression")
    assert mse.item() == pytest.approx(0.5 * 9.0 + 0.5 * (6.0 - 0.5) ** 2)
    assert kd_loss(s, s + 1, None, alpha=0.3, loss=None, kind="regression").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no loss of its own"):
        kd_loss(s, None, None, loss=None)


def test_warmup_then_cosine_schedule():
    param = nn.Parameter(torch.zeros(1))
    opt, schedule = OptimizerSettings("adamw", lr=1.0, warmup=0.25).build([param], total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:2] == pytest.approx([0.5, 1.0]) and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] < 0.2
    with pytest.raises(ValueError, match="optimizer 'adam'"):
        OptimizerSettings("adam")


def test_optimizer_settings_resolve_experiment_then_task_then_defaults():
    task_defaults = {"optimizer": "adamw", "lr": 5e-5, "warmup": 0.1}
    assert FinetuneConfig().optimizer_settings() == {"name": "sgd", "lr": 0.02, "weight_decay": 5e-4, "warmup": 0.0}
    assert FinetuneConfig().optimizer_settings(task_defaults) == {
        "name": "adamw", "lr": 5e-5, "weight_decay": 0.01, "warmup": 0.1}
    assert FinetuneConfig(lr=1e-3).optimizer_settings(task_defaults)["lr"] == 1e-3
    # The task's lr suits its optimizer; the experiment choosing SGD gets SGD's defaults.
    assert FinetuneConfig(optimizer="sgd").optimizer_settings(task_defaults)["lr"] == 0.02
    assert TeacherConfig().optimizer_settings()["lr"] == 0.05


def test_teacher_epochs_zero_uses_a_pretrained_model_as_it_is():
    torch.manual_seed(0)
    ready = TokenModel()
    task = token_task(pretrained=True, build_model=lambda: ready)
    teacher = get_teacher(task, {}, TeacherConfig(epochs=0), seed=0, log=lambda line: None)
    assert teacher.source == "pretrained" and teacher.model is ready
    assert teacher.val_metric == pytest.approx(evaluate(ready, task.loader("val", 8), task.metric))


def test_teacher_epochs_zero_refuses_an_untrained_model_before_any_work():
    with pytest.raises(AutocompressError, match="teacher.epochs 0: task 'tokens' builds an untrained model"):
        get_teacher(token_task(), {}, TeacherConfig(epochs=0), seed=0, log=lambda line: None)


def test_regression_task_trains_on_its_own_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1
    data = TensorDataset(x, y.unsqueeze(1))
    task = Task(name="reg", build_model=lambda: nn.Linear(4, 1), train=data, val=data, test=data,
                loss=F.mse_loss, metric=lambda o, t: F.mse_loss(o, t).item(), metric_name="mse",
                higher_is_better=False, output_kind="regression")
    model = task.build_model()
    before = evaluate(model, task.loader("val", 32), task.metric)
    fit(model, task.loader("train", 16, shuffle=True), epochs=20, loss=task.loss,
        optimizer=OptimizerSettings("adamw", lr=0.05, weight_decay=0.0))
    after = evaluate(model, task.loader("val", 32), task.metric)
    assert task.better(after, before) and after < 0.05
