"""An unmodified transformers.Trainer run trains an LRA model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_bert_seq_cls
from peft import PeftModel, get_peft_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

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
