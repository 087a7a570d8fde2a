"""The recipes' training loop on a user's own, smaller data (issue #23) and its checkpoints (issue #20): training length
that scales with the data, best-epoch selection and early stopping, the warning on a useless model, adapter-only
checkpoints with a total limit, and trackers that are installed."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipes import (  # (the recipe tests' fixture data and runner)
    _tiny_bert,
    adapter,
    assert_clean_error,
    assert_same_weights,
    run_recipe,
    small,
    write_conll,
    write_movielens,
    write_sst2,
)

# recipes/ is on sys.path through test_recipes
ckpt = importlib.import_module("common.checkpoint")
loop = importlib.import_module("common.loop")
methods = importlib.import_module("common.methods")
planning = importlib.import_module("common.schedule")
text_classification = importlib.import_module("common.text_classification")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert", dropout=0.1)


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def same_as_adapter(state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint's trainable state (PeftModel names) holds exactly the weights of a saved adapter."""
    def in_model(key: str) -> str:  # the saved adapter's names drop PEFT's adapter name
        key = re.sub(r"\.(lra_\w+)$", r".\1.default", key)
        return re.sub(r"^(base_model\.model\.classifier)\.", r"\1.modules_to_save.default.", key)

    assert all(in_model(k) in state for k in saved), sorted(set(map(in_model, saved)) - state.keys())[:3]
    return all(torch.equal(state[in_model(k)], v) for k, v in saved.items())


# ------------------------------------------------------------------------------------------- training length
# Training examples of the shipped datasets (Banking77: train.csv less its 10 % validation split).
SHIPPED = {"ner": 14041, "sentiment": 67349, "intent": 9000, "recommend": 2412}


@pytest.mark.parametrize("task, steps", [("ner", 3 * 439), ("sentiment", 2105), ("intent", 3 * 282), ("recommend", 76)])
def test_shipped_datasets_keep_their_default_number_of_steps(task, steps):
    args = importlib.import_module(task).parse_args([])
    schedule = planning.plan_schedule(args, SHIPPED[task], num_processes=1)
    assert schedule.max_train_steps == steps and schedule.num_train_epochs == args.task_num_train_epochs
    assert "reach --min_train_steps" in schedule.reason


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_one_rule_for_every_recipe(task):
    """The minimum is MIN_TRAIN_STEPS (800), or the steps of the task's default run on its shipped data when fewer
    (recommend: 2,412 / 32 = 76); data an eighth of the shipped size then trains more epochs
    than the default."""
    args = importlib.import_module(task).parse_args([])
    shipped_steps = args.task_num_train_epochs * -(-SHIPPED[task] // args.per_device_train_batch_size)
    assert args.min_train_steps == min(800, shipped_steps) == {"recommend": 76}.get(task, 800)
    schedule = planning.plan_schedule(args, SHIPPED[task] // 8, num_processes=1)
    assert schedule.num_train_epochs > args.task_num_train_epochs
    assert args.min_train_steps <= schedule.max_train_steps < args.min_train_steps + schedule.updates_per_epoch
    assert f"fewer than --min_train_steps {args.min_train_steps}: raised to {schedule.num_train_epochs}" in \
        schedule.reason


def test_small_data_without_an_epoch_flag_trains_at_least_the_minimum_number_of_steps():
    ner = importlib.import_module("ner")
    args = ner.parse_args([])
    schedule = planning.plan_schedule(args, 3000, num_processes=1)  # 94 steps per epoch
    assert (schedule.num_train_epochs, schedule.max_train_steps) == (9, 846)
    assert "default 3 epoch(s) would be only 282 steps of 94, fewer than --min_train_steps 800: raised to 9 epochs" \
        in schedule.reason
    assert args.num_train_epochs == 9  # what metrics.json's args record
    # An explicit flag is obeyed as given.
    assert planning.plan_schedule(ner.parse_args(["--num_train_epochs", "1"]), 3000, 1).max_train_steps == 94
    assert planning.plan_schedule(ner.parse_args(["--max_train_steps", "7"]), 3000, 1).max_train_steps == 7
    assert planning.plan_schedule(ner.parse_args(["--min_train_steps", "0"]), 3000, 1).max_train_steps == 282
    # --max_train_samples cuts the data for a quick run: the default epochs, and the log says why.
    quick = planning.plan_schedule(ner.parse_args(["--max_train_samples", "3000"]), 3000, 1)
    assert quick.max_train_steps == 282 and "--max_train_samples 3000 is a quick run" in quick.reason


def test_recipe_on_a_small_slice_runs_more_epochs_and_records_why(tiny_model, tmp_path):
    out = tmp_path / "out"
    # 16 sentences at batch 4: 4 steps per epoch, so a minimum of 10 steps takes 3 epochs instead of the default 1.
    run_recipe("sentiment.py", *small(tiny_model, write_sst2(tmp_path / "sst2"), out, "--min_train_steps", "10"))
    metrics = metrics_of(out)
    assert metrics["epochs"] == 3 and metrics["train_steps"] == 12 and len(metrics["history"]) == 3
    length = metrics["train_length"]
    assert length["planned_epochs"] == length["epochs_run"] == 3 and length["steps_run"] == 12
    assert "default 1 epoch(s) would be only 4 steps" in length["reason"]
    assert metrics["args"]["num_train_epochs"] == 3


@pytest.mark.parametrize("task, minimum, default_epochs", [("ner", 800, 3), ("recommend", 76, 1)])
def test_recipe_on_small_data_at_its_defaults_runs_more_epochs_and_records_why(tiny_model, tmp_path, task, minimum,
                                                                             default_epochs):
    """Two recipes, each at its own default minimum (no --min_train_steps): the run is longer than the default epochs
    and metrics.json says why; a --max_train_samples cut of the same data keeps the default epochs and says why."""
    out = tmp_path / "out"
    if task == "ner":  # 320 sentences at batch 4: 80 steps per epoch, so 800 steps are 10 epochs
        data, extra = write_conll(tmp_path / "conll", n_train=320), []
    else:
        data, extra = write_movielens(tmp_path / "ml"), ["--num_eval_negatives", "9"]
    run_recipe(f"{task}.py", *small(tiny_model, data, out, *extra))
    metrics = metrics_of(out)
    length = metrics["train_length"]
    per_epoch = metrics["train_steps"] // metrics["epochs"]
    assert metrics["epochs"] > default_epochs and length["epochs_run"] == length["planned_epochs"] == metrics["epochs"]
    assert minimum <= length["steps_run"] == metrics["train_steps"] < minimum + per_epoch
    assert (f"default {default_epochs} epoch(s) would be only {default_epochs * per_epoch} steps of {per_epoch}, "
            f"fewer than --min_train_steps {minimum}: raised to {metrics['epochs']} epochs") in length["reason"]

    quick = tmp_path / "quick"
    run_recipe(f"{task}.py", *small(tiny_model, data, quick, *extra, "--max_train_samples", "8"))
    length = metrics_of(quick)["train_length"]
    assert length["epochs_run"] == default_epochs and length["steps_run"] == 2 * default_epochs
    assert "--max_train_samples 8 is a quick run, where --min_train_steps does not apply" in length["reason"]


# --------------------------------------------------------------------------------- best epoch and early stopping
class ScriptedAccuracy:
    """Stands in for `classification_metrics`: real metrics, but the validation accuracy of epoch i is `scores[i]`."""

    def __init__(self, scores: list[float]) -> None:
        self.scores, self.calls = list(scores), 0
        self.real = text_classification.classification_metrics

    def __call__(self, gold, pred, labels):
        metrics, report = self.real(gold, pred, labels)
        if self.calls < len(self.scores):  # the validation calls come first, one per epoch; then test
            metrics["accuracy"] = self.scores[self.calls]
        self.calls += 1
        return metrics, report


def test_load_best_model_at_end_keeps_the_epoch_with_the_best_validation_score(tiny_model, tmp_path, monkeypatch):
    data, out = write_sst2(tmp_path / "sst2"), tmp_path / "out"
    monkeypatch.setattr(text_classification, "classification_metrics", ScriptedAccuracy([0.6, 0.9, 0.7]))
    run_recipe("sentiment.py", *small(tiny_model, data, out, "--num_train_epochs", "3", "--load_best_model_at_end",
                                      "--checkpointing_steps", "epoch"))
    metrics = metrics_of(out)
    assert metrics["eval_accuracy"] == 0.9 and metrics["epochs"] == 3  # validation of the model kept, all epochs run
    assert metrics["train_length"]["best"] == {"epoch": 1, "step": 8, "metric": "accuracy", "value": 0.9}
    # The adapter saved (and tested) is the one of epoch 1, not the last: compare with the epoch checkpoints.
    saved = adapter(out)
    assert same_as_adapter(load_file(out / "epoch_1" / ckpt.TRAINABLE_STATE_FILE), saved)
    assert not same_as_adapter(load_file(out / "epoch_2" / ckpt.TRAINABLE_STATE_FILE), saved)

    # Resumable: from epoch_1's checkpoint, the remaining epoch scores worse and the best kept is still epoch 1's.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "epoch_1", resumed / "epoch_1")
    monkeypatch.setattr(text_classification, "classification_metrics", ScriptedAccuracy([0.7]))
    run_recipe("sentiment.py", *small(tiny_model, data, resumed, "--num_train_epochs", "3",
                                      "--load_best_model_at_end", "--resume_from_checkpoint"))
    assert_same_weights(adapter(out), adapter(resumed), atol=0)
    assert metrics_of(resumed)["train_length"]["best"] == metrics["train_length"]["best"]


def test_without_the_flag_the_last_epoch_is_kept(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(text_classification, "classification_metrics", ScriptedAccuracy([0.6, 0.9, 0.7]))
    run_recipe("sentiment.py", *small(tiny_model, write_sst2(tmp_path / "sst2"), out, "--num_train_epochs", "3"))
    metrics = metrics_of(out)
    assert metrics["eval_accuracy"] == 0.7 and metrics["train_length"]["best"] is None


def test_early_stopping_patience_1_stops_after_a_worse_epoch(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(text_classification, "classification_metrics", ScriptedAccuracy([0.6, 0.9, 0.8, 0.95, 0.99]))
    proc = run_recipe("sentiment.py", *small(tiny_model, write_sst2(tmp_path / "sst2"), out, "--num_train_epochs",
                                             "5", "--load_best_model_at_end", "--early_stopping_patience", "1"))
    metrics = metrics_of(out)
    assert metrics["epochs"] == 3 and metrics["train_steps"] == 12  # epochs 0, 1 and the worse epoch 2
    assert metrics["train_length"]["early_stopped"] and metrics["train_length"]["planned_epochs"] == 5
    assert "--early_stopping_patience 1" in metrics["train_length"]["reason"]
    assert metrics["eval_accuracy"] == 0.9 and metrics["train_length"]["best"]["epoch"] == 1
    assert "Stopped early at epoch 2" in proc.stdout + proc.stderr


def test_early_stopping_without_load_best_model_at_end_is_refused(tiny_model, tmp_path):
    proc = run_recipe("sentiment.py", *small(tiny_model, write_sst2(tmp_path / "sst2"), tmp_path / "o",
                                             "--early_stopping_patience", "1"), check=False)
    assert_clean_error(proc, "--early_stopping_patience", "--load_best_model_at_end")


# -------------------------------------------------------------------------------------- the useless-model warning
def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"num_train_epochs": 1, "learning_rate": 1e-3, **kw})


def test_useless_model_warning_fires_for_a_majority_class_model_and_not_for_a_trained_one():
    gold = [0] * 6 + [1] * 3 + [2] * 1
    majority, _ = text_classification.classification_metrics(gold, [0] * len(gold), ["a", "b", "c"])
    assert majority["accuracy"] == majority["majority_class_accuracy"] == 0.6
    warning = loop.useless_model_warning(majority, _args(), steps=3, epochs=1)
    assert warning and "majority-class rate" in warning and "3 optimizer steps" in warning
    assert "--num_train_epochs" in warning and "--learning_rate" in warning
    trained, _ = text_classification.classification_metrics(gold, gold[:-2] + [1, 2], ["a", "b", "c"])
    assert loop.useless_model_warning(trained, _args(), steps=3, epochs=1) is None

    ner = {"precision": 0.02, "recall": 0.01, "f1": 0.0141, "token_accuracy": 0.83}
    assert "almost no entities" in loop.useless_model_warning(ner, _args(), steps=106, epochs=1)
    assert loop.useless_model_warning({**ner, "f1": 0.57}, _args(), steps=470, epochs=5) is None
    ranking = {"ndcg_at_10": 0.30, "popularity_ndcg_at_10": 0.31}
    assert "popularity" in loop.useless_model_warning(ranking, _args(), steps=10, epochs=1)
    assert loop.useless_model_warning({**ranking, "ndcg_at_10": 0.45}, _args(), steps=10, epochs=1) is None


def test_useless_model_warning_is_printed_once_and_recorded(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # The fixture's dev split is balanced: a validation accuracy of 0.5 is the majority-class rate.
    monkeypatch.setattr(text_classification, "classification_metrics", ScriptedAccuracy([0.5]))
    proc = run_recipe("sentiment.py", *small(tiny_model, write_sst2(tmp_path / "sst2"), out, "--num_train_epochs", "1"))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "majority-class rate" in lines[0] and "--num_train_epochs" in lines[0]
    assert metrics_of(out)["warnings"] == [lines[0].removeprefix("warning: ")]


# ------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_hold_the_trainable_state_only_and_the_total_limit_keeps_the_newest(tiny_model, tmp_path):
    out = tmp_path / "out"
    run_recipe("ner.py", *small(tiny_model, write_conll(tmp_path / "conll"), out, "--num_train_epochs", "2",
                                "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"))
    # 24 sentences at batch 4: 12 steps, a checkpoint every 2; the newest two are left.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step_")) == ["step_10", "step_12"]
    files = {p.name for p in (out / "step_12").iterdir()}
    assert ckpt.TRAINABLE_STATE_FILE in files and not any(n.startswith(("model", "pytorch_model")) for n in files)
    state = load_file(out / "step_12" / ckpt.TRAINABLE_STATE_FILE)
    # The adapter and head weights as trained to the last step (those saved), and no frozen base weight.
    assert same_as_adapter(state, adapter(out))
    assert not any(k.endswith("base_layer.weight") or "word_embeddings" in k for k in state)

    # --checkpointing_steps epoch names them epoch_N as the no_trainer examples do, and a limit of 1 leaves one.
    epochs = tmp_path / "epochs"
    run_recipe("ner.py", *small(tiny_model, write_conll(tmp_path / "conll"), epochs, "--num_train_epochs", "3",
                                "--checkpointing_steps", "epoch", "--checkpoints_total_limit", "1"))
    assert [p.name for p in epochs.iterdir() if p.is_dir() and p.name.startswith(("epoch_", "step_"))] == ["epoch_2"]


def test_checkpoint_of_a_minilm_adapter_run_is_a_few_megabytes(tmp_path):
    out = tmp_path / "out"  # the default model: MiniLM, 92 MB of weights
    run_recipe("ner.py", "--data_dir", str(write_conll(tmp_path / "conll")), "--output_dir", str(out),
               "--max_train_steps", "2", "--per_device_train_batch_size", "4", "--checkpointing_steps", "1",
               "--checkpoints_total_limit", "1")
    assert [p.name for p in out.iterdir() if p.name.startswith("step_")] == ["step_2"]
    size = sum(p.stat().st_size for p in (out / "step_2").rglob("*") if p.is_file())
    # The adapter, its initial factors and the head (2.7 MB) and the Adam moments of the trainable part (2.8 MB).
    assert size < 8e6, size


def test_resume_reads_a_checkpoint_written_before_adapter_only_checkpoints(tiny_model, tmp_path):
    data, out = write_conll(tmp_path / "conll", n_train=40), tmp_path / "out"
    args = ("--num_train_epochs", "2", "--checkpointing_steps", "epoch")
    run_recipe("ner.py", *small(tiny_model, data, out, *args))
    # Rewrite epoch_0 the old way: Accelerate's full model.safetensors instead of the trainable state, named step_10.
    old = tmp_path / "old"
    old.mkdir()
    shutil.copytree(out / "epoch_0", old / "step_10")
    ner = importlib.import_module("ner")
    model = _model_at(ner, tiny_model, old / "step_10")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old / "step_10" / "model.safetensors"))
    (old / "step_10" / ckpt.TRAINABLE_STATE_FILE).unlink()
    run_recipe("ner.py", *small(tiny_model, data, old, *args, "--resume_from_checkpoint"))
    assert_same_weights(adapter(out), adapter(old), atol=0)


def _model_at(ner, model_path: Path, checkpoint: Path) -> torch.nn.Module:
    """The recipe's model with a checkpoint's trainable state loaded, as Accelerate's full state dict would hold it."""
    from transformers import AutoModelForTokenClassification

    labels = ["B-LOC", "B-ORG", "B-PER", "I-ORG", "O"]
    args = ner.parse_args(["--model_name_or_path", str(model_path)])
    model = methods.load_model(AutoModelForTokenClassification, args, num_labels=len(labels),
                         id2label=dict(enumerate(labels)), label2id={t: i for i, t in enumerate(labels)})
    model = methods.apply_method(model, args, "TOKEN_CLS", 10)
    ckpt.load_trainable_state(model, load_file(checkpoint / ckpt.TRAINABLE_STATE_FILE), str(checkpoint))
    return model


# ---------------------------------------------------------------------------------------------------- tracking
def test_with_tracking_names_a_missing_tracker_package_before_training(tiny_model, tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])  # as if tensorboard were missing
    out = tmp_path / "o"
    proc = run_recipe("sentiment.py", *small(tiny_model, write_sst2(tmp_path / "sst2"), out, "--with_tracking"),
                      check=False)
    assert_clean_error(proc, "tensorboard", "pip install tensorboard", "--report_to")
    assert not (out / "metrics.json").exists()
    proc = run_recipe("sentiment.py", *small(tiny_model, write_sst2(tmp_path / "sst2"), out, "--with_tracking",
                                             "--report_to", "all"), check=False)
    assert_clean_error(proc, "no tracker package is installed")


# ---------------------------------------------------------------------------------------------- parameter counts
def test_parameter_counts_of_a_4bit_adapter_run_are_peft_s(tiny_model, tmp_path):
    out = tmp_path / "out"
    run_recipe("sentiment.py", *small(tiny_model, write_sst2(tmp_path / "sst2"), out, "--max_train_steps", "1",
                                      "--load_in_4bit"))
    metrics = metrics_of(out)
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import lra_peft  # noqa: F401

    # The same adapter on the full-precision base: PEFT counts a 4-bit weight as the parameters it stores, so the
    # totals agree, where summing numel() over the 4-bit model counts half of each quantized weight. (The adapter
    # names its base by Hub id, never by the local path, so the test loads the local base itself.)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=2)
    model = PeftModel.from_pretrained(base, str(out))
    assert metrics["total_params"] == model.get_nb_trainable_parameters()[1]
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
