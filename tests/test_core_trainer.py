"""An unmodified transformers.Trainer run trains an LRA model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_bert_seq_cls
from peft import PeftModel, get_peft_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from lra_peft import LRAConfig


class ThresholdTask(Dataset):
    """Label 1 when the first token id is in the upper half of the vocabulary: learnable in a few dozen steps."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (n, 8), generator=gen)
        self.labels = (self.input_ids[:, 0] >= VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


@pytest.mark.parametrize("init", [True, "principal"])
def test_trainer_loss_goes_down(tmp_path: Path, init) -> None:
    torch.manual_seed(0)
    model = get_peft_model(make_bert_seq_cls(num_labels=2),
                           LRAConfig(r=4, target_modules=["query", "value", "dense"], task_type="SEQ_CLS",
                                     init_weights=init, orth_reg_weight=0.01))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=16,
                             learning_rate=5e-2, logging_steps=8, report_to=[], save_strategy="no",
                             use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ThresholdTask(512, seed=1))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 5
    assert losses[-1] < 0.8 * losses[0], losses
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(make_bert_seq_cls(num_labels=2), tmp_path / "adapter").eval()
    model.eval()
    batch = ThresholdTask(16, seed=2).input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch).logits, model(input_ids=batch).logits,
                                   rtol=1e-5, atol=1e-5)


def test_trainer_with_lra_optimizer_keeps_the_scaled_uv_learning_rate(tmp_path: Path) -> None:
    from lra_peft import create_lra_optimizer
    from lra_peft.layer import LRALayer

    torch.manual_seed(0)
    base = make_bert_seq_cls(num_labels=2)
    with torch.no_grad():  # pretrained-like gains, so that the U/V factor is below 1
        for name, module in base.named_modules():
            if name.endswith("query"):
                module.weight.mul_(50.0)
    model = get_peft_model(base, LRAConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                           init_weights="principal"))
    layer = next(m for m in model.modules() if isinstance(m, LRALayer))
    optimizer = create_lra_optimizer(model, lr=1e-2)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    u_group, lam_group = group_of[id(layer.lra_U["default"])], group_of[id(layer.lra_lambda["default"])]
    ratio = u_group["lr"] / lam_group["lr"]
    assert ratio < 1
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=16,
                             learning_rate=1e-2, warmup_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                             seed=0, disable_tqdm=True)
    ratios: list[float] = []

    class RecordRatio(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
            lam_lr = groups[id(layer.lra_lambda["default"])]["lr"]
            if lam_lr > 0:
                ratios.append(groups[id(layer.lra_U["default"])]["lr"] / lam_lr)

    trainer = Trainer(model=model, args=args, train_dataset=ThresholdTask(160, seed=1), optimizers=(optimizer, None),
                      callbacks=[RecordRatio()])
    u_before = layer.lra_U["default"].detach().clone()
    trainer.train()
    assert not torch.equal(u_before, layer.lra_U["default"].detach())
    # Trainer's schedule multiplies every group's own learning rate: the ratio survives warmup and decay.
    assert len(ratios) >= 8
    assert ratios == pytest.approx([ratio] * len(ratios))
