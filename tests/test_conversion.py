"""PEFT's own LoRA converter (`peft.convert_to_lora` / `peft.save_as_lora`) on LRA models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_bert_seq_cls, make_gpt2, rel_err
from peft import PeftModel, convert_to_lora, get_peft_model, save_as_lora
from torch import nn

from lra_peft import LRAConfig


def train_like(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=gen))


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


CASES = {
    # Linear layers, a trained head, principal init (the adapter owns the residual W − ΔW₀ of its base).
    "bert_principal": (make_bert_seq_cls, dict(target_modules=["query", "value", "dense"], task_type="SEQ_CLS",
                                               init_weights="principal")),
    # GPT-2's Conv1D (fan_in_fan_out), minor init.
    "gpt2_minor": (make_gpt2, dict(target_modules=["c_attn", "c_fc"], init_weights="minor")),
    "bert_zero_init": (make_bert_seq_cls, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_save_as_lora_reproduces_the_lra_model_on_the_original_base(case: str, tmp_path: Path) -> None:
    make, kwargs = CASES[case]
    model = get_peft_model(make(), LRAConfig(r=4, lra_alpha=8, **kwargs))
    train_like(model)
    input_ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    expected = logits(model, input_ids)

    save_as_lora(tmp_path / "lora", model, rank=64)  # PEFT's own converter, as its docs show it
    lora = PeftModel.from_pretrained(make(), tmp_path / "lora")  # stock LoRA on a fresh copy of the original base
    assert lora.peft_config["default"].peft_type == "LORA"
    assert rel_err(logits(lora, input_ids), expected) <= 1e-5
    # The exact form: rank r, or 2r with an SVD initialisation ([U | U₀], [V | V₀]), whatever the rank asked for.
    config, state = convert_to_lora(model, rank=64)
    ranks = {state[k].shape[0] for k in state if k.endswith("lora_A.weight")}
    assert ranks == ({4} if case == "bert_zero_init" else {8})


def test_a_lower_rank_is_the_best_approximation_of_the_delta_on_the_original_weight() -> None:
    """rank < the exact rank truncates the SVD of the residual-free ΔW (not of ΔW on the residual base)."""
    model = get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                                          init_weights="principal"))
    train_like(model)
    config, state = convert_to_lora(model, rank=3)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    original = make_bert_seq_cls().bert.encoder.layer[0].attention.self.query.weight
    with torch.no_grad():
        effective = layer.get_base_weight() + layer.get_delta_weight("default")  # what the LRA model computes with
        U, S, Vh = torch.linalg.svd((effective - original).double())
    best = (U[:, :3] * S[:3]) @ Vh[:3]
    key = "base_model.model.bert.encoder.layer.0.attention.self.query"
    delta = state[f"{key}.lora_B.weight"].double() @ state[f"{key}.lora_A.weight"].double()
    assert state[f"{key}.lora_A.weight"].shape[0] == 3
    assert torch.allclose(delta, best, atol=1e-5)


def test_embedding_layers_are_refused_and_export_lora_is_the_way() -> None:
    model = get_peft_model(make_bert_seq_cls(), LRAConfig(r=2, target_modules=["word_embeddings", "query"],
                                                          task_type="SEQ_CLS"))
    with pytest.raises(TypeError, match="Embedding"):
        convert_to_lora(model, rank=8)
