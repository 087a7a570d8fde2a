"""PEFT's own LoRA inits in the recipes (`--method lora --init_lora_weights pissa|corda|lora_ga`, issue 18 §4).

These inits move part of W into the adapter, so an adapter saved as trained is wrong on the original base. The
recipes save it converted (PEFT's `path_initial_model_for_weight_conversion`): checked here by reloading onto the
original base, in-process and through a recipe run.
"""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import test_recipes as recipe_tests
import torch
from conftest import VOCAB, make_bert_seq_cls
from peft import LoraConfig, PeftModel, get_peft_model

lora_inits = importlib.import_module("common.lora_inits")
tiny_model = recipe_tests.tiny_model  # the session fixture: a tiny BERT folder with a tokenizer
run_recipe, small = recipe_tests.run_recipe, recipe_tests.small

TARGETS = ["query", "value", "dense"]
INITS = ["pissa", "corda", "lora_ga"]


def batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 10), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(n)]


def logits(model, data) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"]).logits for b in data])


@pytest.mark.parametrize("init", INITS)
def test_trained_adapter_reloads_onto_the_original_base(init, tmp_path):
    base = make_bert_seq_cls().eval()
    model = copy.deepcopy(base)
    args = type("Args", (), {"init_lora_weights": init})()
    config = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, task_type="SEQ_CLS",
                        **lora_inits.lora_init_kwargs(args))
    data = batches()
    if init in lora_inits.DATA_AWARE_LORA_INITS:
        def run_model() -> None:  # one sequence per pass: PEFT's CorDA hook squeezes the batch dimension
            for batch in data:
                loss = model(**{k: v[:1] for k, v in batch.items()}).loss
                if init == "lora_ga":
                    loss.backward()
        lora_inits.preprocess_lora(model, config, run_model)
    peft_model = get_peft_model(model, config).eval()
    lora_inits.keep_initial_adapter(peft_model)
    # The init moved W into the adapter: the base layer is no longer the original W.
    dense = peft_model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert not torch.equal(dense.base_layer.weight, base.bert.encoder.layer[0].attention.self.query.weight)
    torch.testing.assert_close(logits(peft_model, data), logits(base, data), rtol=0, atol=1e-4)
    with torch.no_grad():  # "training": move every factor and the head
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trained = logits(peft_model, data)

    lora_inits.save_adapter(peft_model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True  # PEFT's rank-2r LoRA for the original W
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    torch.testing.assert_close(logits(reloaded, data), trained, rtol=0, atol=1e-4)


def test_plain_lora_is_saved_as_is(tmp_path):
    peft_model = get_peft_model(make_bert_seq_cls(), LoraConfig(r=4, target_modules=TARGETS, task_type="SEQ_CLS"))
    lora_inits.keep_initial_adapter(peft_model)
    assert not lora_inits.is_converted_on_save(peft_model)


@pytest.mark.parametrize("init", INITS)
def test_intent_recipe_with_a_peft_lora_init_saves_an_adapter_for_the_original_base(tiny_model, tmp_path, init):
    out = tmp_path / "out"
    run_recipe("intent.py", *small(tiny_model, recipe_tests.write_banking(tmp_path / "banking"), out,
                                   "--method", "lora", "--init_lora_weights", init, "--r", "4",
                                   "--calibration_samples", "16", "--max_train_steps", "4", "--learning_rate", "5e-3"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["init_lora_weights"] == init
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True

    # The reader's route: the original base (the tiny model folder) plus the saved adapter reproduces the test score.
    accuracy = recipe_tests.reloaded_intent_accuracy(out, tiny_model, tmp_path / "banking")
    assert accuracy == pytest.approx(metrics["test_accuracy"])


@pytest.mark.parametrize("extra, fragment", [
    (("--method", "lra", "--init_lora_weights", "pissa"), "--init_lora_weights pissa is for --method lora"),
    (("--method", "lora", "--init_lora_weights", "corda", "--load_in_4bit"), "needs the full-precision base"),
])
def test_lora_init_flag_misuse_is_a_clear_error(tiny_model, tmp_path, extra, fragment):
    proc = run_recipe("intent.py", *small(tiny_model, tmp_path / "nowhere", tmp_path / "out", *extra), check=False)
    recipe_tests.assert_clean_error(proc, fragment)
