"""Per-method defaults of the recipes (issue #18): each method's learning rate and schedule chosen on validation."""

from __future__ import annotations

import importlib

import pytest
import test_recipes  # noqa: F401  (puts recipes/ on sys.path)

ner = importlib.import_module("ner")


@pytest.mark.parametrize("method, expected", [
    ("lra", (2e-3, "linear", 0)),
    ("lora", (1e-3, "constant_with_warmup", 26)),
    ("full", (2e-4, "linear", 0)),
    ("adalora", (2e-3, "linear", 0)),
    ("vera", (1e-3, "linear", 0)),  # not tuned: the task's plain defaults
])
def test_ner_defaults_are_each_methods_validation_winner(method, expected):
    args = ner.parse_args(["--method", method])
    assert (args.learning_rate, args.lr_scheduler_type, args.num_warmup_steps) == expected


@pytest.mark.parametrize("task, method, expected", [
    ("intent", "lra", (2e-3, "linear", 0)),
    ("intent", "lora", (2e-3, "linear", 0)),
    ("intent", "full", (2e-4, "linear", 0)),
    ("recommend", "lra", (2e-3, "linear", 0)),
    ("recommend", "lora", (1e-3, "constant_with_warmup", 5)),
    ("sentiment", "lra", (1e-3, "linear", 0)),
    ("sentiment", "lora", (2e-3, "linear", 0)),
    ("sentiment", "full", (1e-4, "linear", 0)),
])
def test_other_tasks_defaults_are_each_methods_validation_winner(task, method, expected):
    args = importlib.import_module(task).parse_args(["--method", method])
    assert (args.learning_rate, args.lr_scheduler_type, args.num_warmup_steps) == expected


def test_ner_trains_three_epochs_for_every_method():
    """Every method's tuned cell gained from a second and a third epoch on validation; an explicit flag still wins."""
    for method in ("lra", "lora", "full", "adalora"):
        assert ner.parse_args(["--method", method]).task_num_train_epochs == 3
    assert ner.parse_args(["--num_train_epochs", "1"]).num_train_epochs == 1


def test_explicit_flags_override_the_per_method_defaults():
    args = ner.parse_args(["--method", "lora", "--lr_scheduler_type", "linear", "--num_warmup_steps", "0",
                           "--learning_rate", "5e-4"])
    assert (args.learning_rate, args.lr_scheduler_type, args.num_warmup_steps) == (5e-4, "linear", 0)


def test_help_names_the_per_method_defaults(capsys):
    with pytest.raises(SystemExit):
        ner.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "constant_with_warmup for --method lora" in text and "0.002 for --method lra" in text
