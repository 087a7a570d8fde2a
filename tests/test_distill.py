"""Knowledge distillation in the recipes (recipes/common/distill.py): the loss, and recipe runs with a teacher.

The loss tests use tiny tensors and a tiny BERT; the recipe tests run the recipes in this process on the fixture
folders of test_recipes.py with its tiny BERT (a teacher is first trained by the same recipe, as a user would)."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_recipes import (  # the recipe tests' fixture data and runner
    _tiny_bert,
    assert_clean_error,
    run_recipe,
    small,
    write_banking,
    write_conll,
    write_movielens,
    write_sst2,
)
from torch.distributions import Bernoulli, Categorical, kl_divergence

D = importlib.import_module("common.distill")  # importing test_recipes put recipes/ on sys.path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert", dropout=0.1)


def _args(alpha: float = 0.5, temperature: float = 2.0, teacher: str = "teacher"):
    import argparse

    return argparse.Namespace(distill_alpha=alpha, distill_temperature=temperature, teacher_model_name_or_path=teacher)


# -------------------------------------------------------------------------------------------------------- the loss
def test_kl_is_zero_when_teacher_equals_student_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    assert D.distill_kl(logits, logits.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)
    other = logits + torch.randn(6, 5)
    assert D.distill_kl(logits, other, temperature=2.0).item() > 1e-3
    # Adding a constant to every logit of a row changes no probability: still no disagreement.
    assert D.distill_kl(logits, logits + 3.0, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_is_t_squared_times_the_mean_kl_of_the_softened_distributions(temperature):
    torch.manual_seed(1)
    student, teacher = torch.randn(8, 4), torch.randn(8, 4)
    # Direction matters: KL(teacher ‖ student), the teacher's distribution being the target.
    expected = kl_divergence(Categorical(logits=teacher / temperature), Categorical(logits=student / temperature))
    got = D.distill_kl(student, teacher, temperature)
    assert got.item() == pytest.approx(temperature**2 * expected.mean().item(), rel=1e-5)
    reverse = kl_divergence(Categorical(logits=student / temperature), Categorical(logits=teacher / temperature))
    assert got.item() != pytest.approx(temperature**2 * reverse.mean().item(), rel=1e-3)


def test_single_logit_is_the_bernoulli_kl_of_the_sigmoids():
    student, teacher = torch.tensor([[0.3], [-2.0], [1.5]]), torch.tensor([[1.0], [0.5], [1.5]])
    expected = kl_divergence(Bernoulli(logits=teacher / 2.0), Bernoulli(logits=student / 2.0)).mean() * 4.0
    assert D.distill_kl(student, teacher, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_ner_mask_ignores_the_positions_the_task_loss_ignores():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    labels = torch.tensor([[-100, 0, -100, 2, 1], [-100, 1, -100, -100, -100]])
    mask = D.token_mask({"labels": labels})
    got = D.distill_kl(student, teacher, 2.0, mask)
    counted = labels != -100
    assert got.item() == pytest.approx(D.distill_kl(student[counted], teacher[counted], 2.0).item(), rel=1e-6)
    # Whatever the models say at -100 positions (special tokens, later sub-words, padding) does not count...
    scrambled = student.clone()
    scrambled[~counted] = torch.randn(int((~counted).sum()), 3) * 10
    assert D.distill_kl(scrambled, teacher, 2.0, mask).item() == pytest.approx(got.item(), rel=1e-6)
    # ... while a counted position does.
    scrambled[0, 1, 0] += 5.0
    assert D.distill_kl(scrambled, teacher, 2.0, mask).item() != pytest.approx(got.item(), rel=1e-3)
    # A batch with nothing counted adds nothing (and still backpropagates).
    none = D.distill_kl(student.requires_grad_(), teacher, 2.0, torch.zeros(2, 5, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0


def test_loss_mixes_task_loss_and_kl_with_alpha_and_the_teacher_gets_no_gradient():
    from conftest import make_bert_seq_cls

    student, teacher_model = make_bert_seq_cls(num_labels=3, seed=0).train(), make_bert_seq_cls(num_labels=3, seed=1)
    teacher_model.requires_grad_(False)
    batch = {"input_ids": torch.randint(5, 100, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 1])}
    student.eval()  # no dropout: the same forward twice
    task = student(**batch).loss
    soft = D.distill_kl(student(**batch).logits, teacher_model(**batch).logits, 3.0)
    assert soft.item() > 0
    loss = D.make_loss(D.Teacher(teacher_model, "t"), _args(alpha=0.25, temperature=3.0))(student, batch)
    assert loss.item() == pytest.approx(0.75 * task.item() + 0.25 * soft.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher_model.parameters())
    # A teacher identical to the student adds nothing: only the (1 − α)-weighted task loss is left.
    same = D.make_loss(D.Teacher(make_bert_seq_cls(num_labels=3, seed=0).eval(), "t"), _args(alpha=0.25))
    assert same(student, batch).item() == pytest.approx(0.75 * task.item(), rel=1e-5)


def test_a_teacher_with_the_labels_in_another_order_is_reordered_to_the_students():
    from conftest import make_bert_seq_cls

    model = make_bert_seq_cls(num_labels=3, seed=0)
    batch = {"input_ids": torch.randint(5, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    plain = D.Teacher(model, "t").logits(batch, D.hf_outputs)
    swapped = D.Teacher(model, "t", permutation=[2, 0, 1]).logits(batch, D.hf_outputs)
    assert torch.equal(swapped, plain[:, [2, 0, 1]])


@pytest.mark.parametrize("flags, message", [
    (["--distill_alpha", "1.5", "--teacher_model_name_or_path", "x"], "--distill_alpha=1.5 must be in [0, 1]"),
    (["--distill_alpha", "nan", "--teacher_model_name_or_path", "x"], "--distill_alpha=nan must be in [0, 1]"),
    (["--distill_temperature", "0"], "--distill_temperature=0.0 must be a positive number"),
    (["--distill_alpha", "0.5"], "needs a teacher: pass --teacher_model_name_or_path"),
])
def test_bad_distillation_flags_are_refused_before_any_work(flags, message):
    import sentiment
    from common.errors import RecipeError

    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sentiment.parse_args(flags)
    defaults = sentiment.parse_args([])
    assert (defaults.distill_alpha, defaults.distill_temperature, defaults.teacher_model_name_or_path) == (0.0, 2.0, None)


# ------------------------------------------------------------------------------------------------- recipe runs
def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _scores(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("eval_", "test_")) or k in ("train_loss", "history")}


def test_ner_with_a_full_fine_tuning_teacher(tiny_model, tmp_path):
    """The documented flow: train a teacher with --method full, distil it into LRA; settings land in metrics.json and
    the model card; the teacher folder is read, never written; α = 0 with the teacher is the plain run, bit for bit."""
    data = write_conll(tmp_path / "conll")
    teacher = tmp_path / "ner-full"
    run_recipe("ner.py", *small(tiny_model, data, teacher, "--method", "full", "--max_train_steps", "3",
                                "--learning_rate", "1e-3"))
    before = _digest(teacher)

    student = ["--max_train_steps", "4", "--learning_rate", "5e-3"]
    distilled = tmp_path / "distilled"
    proc = run_recipe("ner.py", *small(tiny_model, data, distilled, *student, "--teacher_model_name_or_path",
                                       str(teacher), "--distill_alpha", "0.5", "--distill_temperature", "3"))
    assert f"distilling from {teacher}" in proc.stdout + proc.stderr
    metrics = json.loads((distilled / "metrics.json").read_text())
    assert metrics["distillation"] == {"teacher": str(teacher), "alpha": 0.5, "temperature": 3.0}
    assert metrics["args"]["teacher_model_name_or_path"] == str(teacher)
    card = (distilled / "README.md").read_text()
    assert f"Distilled from `…/{teacher.name}`" in card and "α = 0.5, T = 3" in card  # no local path in a card
    assert _digest(teacher) == before, "the teacher's folder changed"
    assert not any(name.startswith("model") for name in _digest(distilled)), "the teacher was saved with the student"

    plain, ignored = tmp_path / "plain", tmp_path / "alpha0"
    run_recipe("ner.py", *small(tiny_model, data, plain, *student))
    proc = run_recipe("ner.py", *small(tiny_model, data, ignored, *student, "--teacher_model_name_or_path",
                                       str(teacher), "--distill_alpha", "0"))
    assert "is not used: --distill_alpha is 0" in proc.stdout + proc.stderr
    a, b, c = (json.loads((o / "metrics.json").read_text()) for o in (plain, ignored, distilled))
    assert (plain / "adapter_model.safetensors").read_bytes() == (ignored / "adapter_model.safetensors").read_bytes()
    assert _scores(a) == _scores(b)
    assert a["distillation"] is None and b["distillation"] is None
    # With α > 0 the teacher does change training.
    assert (plain / "adapter_model.safetensors").read_bytes() != (distilled / "adapter_model.safetensors").read_bytes()
    assert a["train_loss"] != c["train_loss"]


def test_intent_with_an_adapter_teacher_and_a_teacher_with_other_labels(tiny_model, tmp_path):
    """An adapter run is reloaded onto its base as a teacher; a teacher from another task (other labels) is one clear
    error line and exit status 2, before anything is written."""
    banking = write_banking(tmp_path / "banking")
    teacher = tmp_path / "intent-lra"
    run_recipe("intent.py", *small(tiny_model, banking, teacher, "--max_train_steps", "3"))
    out = tmp_path / "distilled"
    run_recipe("intent.py", *small(tiny_model, banking, out, "--max_train_steps", "3", "--teacher_model_name_or_path",
                                   str(teacher), "--distill_alpha", "1"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distillation"]["teacher"] == str(teacher) and metrics["distillation"]["alpha"] == 1.0
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0

    wrong = tmp_path / "sentiment"
    proc = run_recipe("sentiment.py", *small(tiny_model, write_sst2(tmp_path / "sst2"), wrong, "--max_train_steps",
                                             "2", "--teacher_model_name_or_path", str(teacher), "--distill_alpha",
                                             "0.5"), check=False)
    assert proc.returncode == 2
    assert_clean_error(proc, "--teacher_model_name_or_path", "teacher's labels (3) differ from the student's (2)",
                       "card_arrival")
    assert not wrong.exists() or not any(wrong.iterdir())


def test_a_folder_that_is_no_model_is_a_clear_error(tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for teacher, fragment in ((empty, "neither a model folder"), (tmp_path / "missing", "is not a folder")):
        proc = run_recipe("sentiment.py", *small(tiny_model, write_sst2(tmp_path / "sst2"), tmp_path / "out",
                                                 "--max_train_steps", "2", "--teacher_model_name_or_path",
                                                 str(teacher), "--distill_alpha", "0.5"), check=False)
        assert proc.returncode == 2
        assert_clean_error(proc, fragment)


def test_a_teacher_with_another_vocabulary_is_a_clear_error(tiny_model, tmp_path):
    data = write_sst2(tmp_path / "sst2")
    teacher = tmp_path / "teacher"
    run_recipe("sentiment.py", *small(tiny_model, data, teacher, "--method", "full", "--max_train_steps", "2"))
    # One token renamed: its id would mean something else to this teacher.
    tokenizer = json.loads((teacher / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["[MASKED]"] = tokenizer["model"]["vocab"].pop("[MASK]")
    (teacher / "tokenizer.json").write_text(json.dumps(tokenizer))
    proc = run_recipe("sentiment.py", *small(tiny_model, data, tmp_path / "out", "--max_train_steps", "2",
                                             "--teacher_model_name_or_path", str(teacher), "--distill_alpha", "0.5"),
                      check=False)
    assert proc.returncode == 2
    assert_clean_error(proc, "tokenizer's vocabulary differs from the student's")


def test_recommend_distils_the_candidate_scores_of_a_full_teacher(tiny_model, tmp_path):
    data = write_movielens(tmp_path / "ml")
    teacher = tmp_path / "rec-full"
    common = ("--num_eval_negatives", "9", "--max_train_steps", "3")
    run_recipe("recommend.py", *small(tiny_model, data, teacher, *common, "--method", "full"))
    plain, distilled = tmp_path / "plain", tmp_path / "distilled"
    run_recipe("recommend.py", *small(tiny_model, data, plain, *common))
    run_recipe("recommend.py", *small(tiny_model, data, distilled, *common, "--teacher_model_name_or_path",
                                      str(teacher), "--distill_alpha", "0.5"))
    metrics = json.loads((distilled / "metrics.json").read_text())
    assert metrics["distillation"] == {"teacher": str(teacher), "alpha": 0.5, "temperature": 2.0}
    assert (plain / "adapter_model.safetensors").read_bytes() != (distilled / "adapter_model.safetensors").read_bytes()


def test_resuming_with_other_distillation_settings_is_refused(tiny_model, tmp_path):
    data = write_sst2(tmp_path / "sst2")
    teacher = tmp_path / "teacher"
    run_recipe("sentiment.py", *small(tiny_model, data, teacher, "--method", "full", "--max_train_steps", "2"))
    out = tmp_path / "out"
    run_recipe("sentiment.py", *small(tiny_model, data, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    shutil.rmtree(out / "step_2")
    proc = run_recipe("sentiment.py", *small(tiny_model, data, out, "--max_train_steps", "2", "--resume_from_checkpoint",
                                             "--teacher_model_name_or_path", str(teacher), "--distill_alpha", "0.5"),
                      check=False)
    assert_clean_error(proc, "distill_alpha=0.0 (now 0.5)")


def test_checkpoints_hold_the_student_only_and_a_resumed_distilled_run_ends_where_an_uninterrupted_one_does(
        tiny_model, tmp_path):
    data = write_sst2(tmp_path / "sst2")
    teacher = tmp_path / "teacher"
    run_recipe("sentiment.py", *small(tiny_model, data, teacher, "--method", "full", "--max_train_steps", "2"))
    distil = ("--teacher_model_name_or_path", str(teacher), "--distill_alpha", "0.5", "--max_train_steps", "4",
              "--checkpointing_steps", "2")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_recipe("sentiment.py", *small(tiny_model, data, full, *distil))
    # Checkpoints hold the student's trainable state only (trainable_state.safetensors), never a teacher's weights.
    weights = sorted(p.name for p in (full / "step_2").iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    assert weights == ["optimizer.bin", "scheduler.bin", "trainable_state.safetensors"], \
        f"the teacher went into the checkpoint: {weights}"
    resumed.mkdir()
    shutil.copytree(full / "step_2", resumed / "step_2")
    run_recipe("sentiment.py", *small(tiny_model, data, resumed, *distil, "--resume_from_checkpoint"))
    assert (full / "adapter_model.safetensors").read_bytes() == (resumed / "adapter_model.safetensors").read_bytes()
