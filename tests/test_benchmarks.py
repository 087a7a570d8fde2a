"""Smoke tests of the benchmark scripts: each one's quick mode on tiny sizes, so that the scripts don't rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import require

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return [row for row in rows if row[0] == first_cell]


def test_speed_quick(tmp_path: Path) -> None:
    speed = load_script("speed")
    out = tmp_path / "speed.md"
    # Peak memory needs one fresh process per method (seconds of imports each): tested in-process below.
    text = speed.main(["--quick", "--rounds", "2", "--layer-rounds", "2", "--memory-methods", "none", "--out", str(out)])
    assert out.read_text().strip() == text.strip()
    for method in ("lra", "lora", "adalora", "vera", "pissa"):
        (row,) = table_rows(text, method)
        assert float(row[1]) > 0 and float(row[4]) > 0 and float(row[7]) > 0  # train, unmerged, merged ms
    assert table_rows(text, "lora")[0][2] == "1.000"
    assert table_rows(text, "vera")[0][-1] == "not measured"
    assert "Load average" in text and "Date:" in text


def test_speed_memory_worker() -> None:
    speed = load_script("speed")
    for method in ("base", "lra-adaptive" if speed.adaptive_lra_available() else "lra", "adalora"):
        assert speed.memory_worker(method, "tiny", r=4, steps=2)["peak_rss_mib"] > 0


def test_init_quick(tmp_path: Path) -> None:
    init = load_script("init")
    text = init.main(["--quick", "--niters", "exact,4", "--rounds", "1", "--out", str(tmp_path / "init.md")])
    rows = table_rows(text, "256×512")
    assert [row[2] for row in rows] == ["exact", "niter=4"]
    exact = rows[0]
    assert all(float(v) < 1e-4 for v in exact[8].split(" / "))  # both exact SVDs find the rank-r truncation
    for row in rows:
        lra_identity, peft_identity = (float(v) for v in row[10].split(" / "))
        assert lra_identity < 1e-5 and peft_identity < 1e-5  # W_res + ΔW₀ = W at step 0


def test_hotpath_quick(tmp_path: Path) -> None:
    hotpath = load_script("hotpath")
    text = hotpath.main(["--quick", "--rounds", "1", "--out", str(tmp_path / "hotpath.md")])
    for variant in ("matmul", "copy", "transposed", "lora"):
        assert table_rows(text, variant)


STUB_RECIPE = '''
import argparse, json, pathlib
p = argparse.ArgumentParser()
for flag in ("--method", "--output_dir"):
    p.add_argument(flag)
for flag in ("--seed", "--max_train_steps", "--max_train_samples", "--max_eval_samples", "--r", "--target_r"):
    p.add_argument(flag, type=int)
a, _ = p.parse_known_args()
out = pathlib.Path(a.output_dir)
out.mkdir(parents=True, exist_ok=True)
score = 0.5 + 0.1 * a.seed + (0.2 if a.method == "full" else 0.0)
(out / "metrics.json").write_text(json.dumps({"test_accuracy": score, "eval_accuracy": score - 0.05,
                                              "trainable_params": 10, "train_runtime_s": 1.0, "seen": vars(a)}))
'''


def summary_rows(text: str, method: str) -> list[list[str]]:
    return [row for row in table_rows(text, "sentiment") if len(row) == 6 and row[1] == method]


def test_quality_aggregates_recipe_runs(tmp_path: Path) -> None:
    """quality.py's plumbing (flags, subprocess, metrics.json, mean ± std, reuse) with a stand-in recipe."""
    quality = load_script("quality")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "sentiment.py").write_text(STUB_RECIPE)
    argv = ["--quick", "--recipe-dir", str(recipes), "--runs-dir", str(tmp_path / "runs"), "--methods", "lra,full,lra-adaptive",
            "--seeds", "0,1,2", "--out", str(tmp_path / "quality.md")]
    text = quality.main(argv)
    (lra,) = summary_rows(text, "lra")
    assert lra[2] == "3"
    assert "test_accuracy 0.6000 ± 0.1000" in lra[3] and "eval_accuracy 0.5500 ± 0.1000" in lra[3]
    (full,) = summary_rows(text, "full")
    per_run = [row for row in table_rows(text, "sentiment") if len(row) == 8 and row[1] == "full"]
    assert [row[2] for row in per_run] == ["0", "1", "2"] and "accuracy 70.00" in per_run[0][3]
    assert "test_accuracy 0.8000 ± 0.1000" in full[3]
    seen = json.loads((tmp_path / "runs" / "sentiment-lra-seed2" / "metrics.json").read_text())["seen"]
    assert seen["max_train_steps"] == quality.QUICK.max_train_steps and seen["max_train_samples"] == quality.QUICK.max_train_samples
    assert quality.recipe_args("lra", 42, quality.FULL, tmp_path, []).count("--max_train_steps") == 0  # recipe epochs
    adaptive = json.loads((tmp_path / "runs" / "sentiment-lra-adaptive-seed0" / "metrics.json").read_text())["seen"]
    assert (adaptive["method"], adaptive["r"], adaptive["target_r"]) == ("lra", 12, 8)  # LoRA's final budget, r = 8
    # --existing-only tabulates what exists and runs nothing (the stand-in would otherwise create seed 3).
    only = quality.main([*argv[:-4], "--seeds", "0,3", "--existing-only", "--out", str(tmp_path / "q2.md")])
    assert [row[2] for row in summary_rows(only, "lra")] == ["1"]
    assert not (tmp_path / "runs" / "sentiment-lra-seed3").exists()
    # A second sweep reuses the runs: the stand-in now fails, so any rerun would raise.
    (recipes / "sentiment.py").write_text("raise SystemExit(1)\n")
    again = quality.main(argv)
    assert summary_rows(again, "lra") == [lra]


PARSING_RECIPE = '''
import argparse, json, pathlib

def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--method")
    p.add_argument("--output_dir")
    p.add_argument("--init_weights", default=INIT)
    for flag in ("--seed", "--max_train_steps", "--max_train_samples", "--max_eval_samples", "--r", "--target_r"):
        p.add_argument(flag, type=int)
    a, _ = p.parse_known_args(argv)
    return a

if __name__ == "__main__":
    a = parse_args()
    out = pathlib.Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    score = {"principal": 0.5, "minor": 0.7}[a.init_weights]
    (out / "metrics.json").write_text(json.dumps({"test_accuracy": score, "train_runtime_s": 1.0, "args": vars(a)}))
'''


def test_quality_reruns_a_run_when_the_recipe_default_changed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The same command line means a different run once a recipe default changes: such runs are redone, not reused."""
    quality = load_script("quality")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = recipes / "sentiment.py"
    recipe.write_text(PARSING_RECIPE.replace("INIT", '"principal"'))
    argv = ["--quick", "--recipe-dir", str(recipes), "--runs-dir", str(tmp_path / "runs"), "--methods", "lra,lora",
            "--seeds", "0", "--out", str(tmp_path / "quality.md")]
    text = quality.main(argv)
    assert "test_accuracy 0.5000" in summary_rows(text, "lra")[0][3]
    assert "test_accuracy 0.5000" in summary_rows(text, "lora")[0][3]
    quality._MODULES.clear()  # a new sweep is a new process
    assert "test_accuracy 0.5000" in summary_rows(quality.main(argv), "lra")[0][3]  # unchanged: reused
    assert "defaults changed" not in capsys.readouterr().out
    recipe.write_text(PARSING_RECIPE.replace("INIT", '"minor"'))
    quality._MODULES.clear()
    text = quality.main(argv)
    assert "test_accuracy 0.7000" in summary_rows(text, "lra")[0][3]
    out = capsys.readouterr().out
    assert "sentiment-lra-seed0: rerun" in out and "--init_weights 'principal' -> 'minor'" in out
    # --init_weights is LRA's flag: LoRA's run stays valid (the stand-in would now score it 0.7).
    assert "test_accuracy 0.5000" in summary_rows(text, "lora")[0][3] and "sentiment-lora-seed0: rerun" not in out


def test_a_finished_run_whose_epochs_the_recipe_planned_is_reused(tmp_path: Path) -> None:
    """Left out, --num_train_epochs is planned from the data at run time and recorded as the epochs run: the sweep must
    still see such a run as the same run (and reuse it), while a changed default is still caught."""
    quality = load_script("quality")
    recipe = BENCHMARKS.parent / "recipes" / "ner.py"
    args = ["--method", "lra", "--seed", "0", "--output_dir", str(tmp_path / "o")]
    recorded = json.loads(json.dumps(vars(quality._recipe_module(recipe).parse_args(args))))
    assert recorded["num_train_epochs"] is None
    recorded["num_train_epochs"] = 2  # what the run writes into metrics.json's args after planning CoNLL's 2 × 439 steps
    assert quality.changed_defaults(recipe, args, {"args": recorded, "epochs": 2}) == []
    default_lr, recorded["learning_rate"] = recorded["learning_rate"], 5e-4
    assert quality.changed_defaults(recipe, args, {"args": recorded, "epochs": 2}) == \
        [f"--learning_rate 0.0005 -> {default_lr!r}"]


def test_a_new_minimum_number_of_steps_reruns_only_runs_whose_length_it_changes(tmp_path: Path) -> None:
    """--min_train_steps acts through the epochs it plans: a shipped intent run (3 epochs of 282 steps) is the same
    run under any minimum up to its 846 steps, a small-data run planned under a lower minimum is not."""
    quality = load_script("quality")
    recipe = BENCHMARKS.parent / "recipes" / "intent.py"
    args = ["--method", "lra", "--seed", "0", "--output_dir", str(tmp_path / "o")]
    recorded = json.loads(json.dumps(vars(quality._recipe_module(recipe).parse_args(args))))
    minimum = recorded["min_train_steps"]
    recorded.update(num_train_epochs=3, min_train_steps=400)  # an older run, planned under a minimum of 400
    assert quality.changed_defaults(recipe, args, {"args": recorded, "epochs": 3, "train_steps": 846}) == []
    # 1,500 examples (47 steps an epoch): 400 planned 9 epochs, today's minimum plans more.
    recorded["num_train_epochs"] = 9
    assert quality.changed_defaults(recipe, args, {"args": recorded, "epochs": 9, "train_steps": 423}) == \
        [f"--min_train_steps 400 -> {minimum}"]


def test_a_new_default_number_of_epochs_reruns_only_runs_that_used_it(tmp_path: Path) -> None:
    """A task's default epochs act through the epochs planned: a run with an explicit --num_train_epochs made under an
    older default is the same run; a run left to the older default, or a quick --max_train_samples run at it, is not."""
    quality = load_script("quality")
    recipe = BENCHMARKS.parent / "recipes" / "ner.py"
    default = quality._recipe_module(recipe).DEFAULTS.num_train_epochs
    explicit = ["--method", "lra", "--seed", "0", "--output_dir", str(tmp_path / "o"), "--num_train_epochs", "2"]
    recorded = json.loads(json.dumps(vars(quality._recipe_module(recipe).parse_args(explicit))))
    recorded.update(task_num_train_epochs=default + 1, min_train_steps=439)
    assert quality.changed_defaults(recipe, explicit, {"args": recorded, "epochs": 2, "train_steps": 878}) == []

    left_out = explicit[:-2]
    recorded = json.loads(json.dumps(vars(quality._recipe_module(recipe).parse_args(left_out))))
    recorded.update(task_num_train_epochs=default + 1, num_train_epochs=default + 1)
    steps = (default + 1) * 439
    assert quality.changed_defaults(recipe, left_out, {"args": recorded, "epochs": default + 1, "train_steps": steps}) \
        == [f"--task_num_train_epochs {default + 1} -> {default}"]

    quick = [*left_out, "--max_train_samples", "64"]
    recorded = json.loads(json.dumps(vars(quality._recipe_module(recipe).parse_args(quick))))
    recorded["min_train_steps"] = 439  # not acting on a quick run: the same run
    assert quality.changed_defaults(recipe, quick, {"args": recorded, "epochs": default}) == []
    recorded["task_num_train_epochs"] = default + 1
    assert f"--task_num_train_epochs {default + 1} -> {default}" in \
        quality.changed_defaults(recipe, quick, {"args": recorded, "epochs": default + 1})


def test_device_check_passes_on_the_cpu_with_a_tiny_bert(tmp_path: Path) -> None:
    """The GPU script's checks, run here on the CPU: bf16, int8 and nf4 bases of a tiny BERT."""
    require("bitsandbytes")
    import torch
    from conftest import tiny_bert_config
    from transformers import BertModel

    torch.manual_seed(0)
    # 64 wide: 4-bit blocks hold 64 values, so every block is full.
    BertModel(tiny_bert_config(hidden_size=64, intermediate_size=128)).save_pretrained(tmp_path / "tiny")
    device_check = load_script("device_check")
    text, ok = device_check.main(["--device", "cpu", "--model_name_or_path", str(tmp_path / "tiny"), "--steps", "5",
                                  "--batch_size", "4", "--seq_len", "16", "--rounds", "2",
                                  "--out", str(tmp_path / "device.md")])
    assert ok, text
    for check in ("init: distance to the fp32 model", "grads reach only adapter + head", "merge ≈ unmerged",
                  "save → load → same logits", "merge_and_unload"):
        assert [row[1] for row in table_rows(text, check)] == ["bf16", "int8", "nf4"], check
    assert table_rows(text, "lra") and table_rows(text, "lora")
    assert "FAIL" not in text

    # A merge that loses the adapter must fail the run.
    import lra_peft

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lra_peft.LRALayer, "get_delta_weight", lambda self, adapter: torch.zeros_like(self.weight))
        text, ok = device_check.main(["--device", "cpu", "--model_name_or_path", str(tmp_path / "tiny"), "--bases",
                                      "int8", "--steps", "5", "--batch_size", "4", "--seq_len", "16", "--rounds", "0",
                                      "--out", str(tmp_path / "broken.md")])
    assert not ok
    assert table_rows(text, "merge ≈ unmerged")[0][-1] == "FAIL"


def test_paired_statistics() -> None:
    paired = load_script("paired")
    assert paired.sign_test_p(0, 0) == 1.0 and paired.sign_test_p(5, 5) == 1.0
    assert paired.sign_test_p(10, 0) == pytest.approx(2 / 2**10)
    assert paired.entity_f1(np.array([8.0, 2.0, 2.0])) == pytest.approx(0.8)  # 2·8 / (2·8 + 2 + 2)
    assert paired.entity_f1(np.zeros(3)) == 0.0
    ones = np.ones(50)
    right, wrong = np.stack([ones, ones], axis=1), np.stack([0 * ones, ones], axis=1)
    assert paired.bootstrap_interval([(right, wrong)], paired.ratio, 200, seed=0) == (1.0, 1.0)
    rng = np.random.default_rng(1)
    a, b = (rng.random(2000) < p for p in (0.8, 0.75))
    pair = tuple(np.stack([x.astype(float), np.ones(2000)], axis=1) for x in (a, b))
    low, high = paired.bootstrap_interval([pair], paired.ratio, 2000, seed=0)
    diff = a.astype(float) - b
    half = 1.96 * diff.std() / np.sqrt(diff.size)  # the normal approximation's half-width
    assert low < diff.mean() < high and (high - low) / 2 == pytest.approx(half, rel=0.15)


def test_paired_reproduces_runs_and_pairs_them_by_seed(tmp_path: Path) -> None:
    """paired.py on real (tiny) sentiment runs: it must reproduce each run's recorded accuracy from the saved adapter
    before comparing, and refuse runs it cannot reproduce or pair."""
    from test_recipes import _tiny_bert, run_recipe, small, write_sst2

    model, data = _tiny_bert(tmp_path / "tiny", dropout=0.0), write_sst2(tmp_path / "sst2")
    runs = {}
    for method in ("lra", "lora"):
        for seed in (0, 1):
            runs[method, seed] = tmp_path / f"{method}-{seed}"
            run_recipe("sentiment.py", *small(model, data, runs[method, seed], "--method", method, "--seed", str(seed),
                                              "--max_train_steps", "6", "--learning_rate", "1e-2"))
    paired = load_script("paired")
    argv = ["--task", "sentiment", "--a", str(runs["lra", 0]), str(runs["lra", 1]), "--b", str(runs["lora", 1]),
            str(runs["lora", 0]), "--resamples", "200", "--out", str(tmp_path / "paired.md")]
    text, summaries = paired.main(argv)
    assert (tmp_path / "paired.md").read_text().strip() == text.strip()
    for summary in summaries:
        prefix = {"validation": "eval", "test": "test"}[summary["split"]]
        recorded = {m: [json.loads((runs[m, s] / "metrics.json").read_text())[f"{prefix}_accuracy"] for s in (0, 1)]
                    for m in ("lra", "lora")}
        assert summary["a_mean"] == pytest.approx(100 * np.mean(recorded["lra"]))
        assert summary["b_mean"] == pytest.approx(100 * np.mean(recorded["lora"]))
        assert summary["diff"] == pytest.approx(summary["a_mean"] - summary["b_mean"])
        assert summary["low"] <= summary["diff"] <= summary["high"]
    assert [row[0] for row in table_rows(text, "0")] == ["0", "0"]  # seed 0 paired with seed 0, in both splits

    with pytest.raises(SystemExit, match="same seeds"):
        paired.main(["--task", "sentiment", "--a", str(runs["lra", 0]), "--b", str(runs["lora", 1]),
                     "--out", str(tmp_path / "bad.md")])
    metrics_file = runs["lora", 1] / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["test_accuracy"] = 1.5  # no set of predictions gives this: the run does not reproduce
    metrics_file.write_text(json.dumps(metrics))
    with pytest.raises(SystemExit, match="reproduces as"):
        paired.main(argv)


def test_paired_ner_recomputes_corpus_f1_from_sentence_counts(tmp_path: Path) -> None:
    """NER: per-sentence entity counts whose sums give back each run's seqeval F1 (nonzero here, so it is a check)."""
    from test_recipes import _tiny_bert, run_recipe, small, write_conll

    model, data = _tiny_bert(tmp_path / "tiny", dropout=0.0), write_conll(tmp_path / "conll")
    runs = {}
    for method in ("lra", "lora"):
        runs[method] = tmp_path / method
        run_recipe("ner.py", *small(model, data, runs[method], "--method", method, "--max_train_steps", "30",
                                    "--learning_rate", "2e-2"))
    recorded = {m: json.loads((runs[m] / "metrics.json").read_text()) for m in runs}
    assert recorded["lra"]["test_f1"] > 0 and recorded["lora"]["test_f1"] > 0
    paired = load_script("paired")
    text, summaries = paired.main(["--task", "ner", "--a", str(runs["lra"]), "--b", str(runs["lora"]),
                                   "--resamples", "200", "--out", str(tmp_path / "paired.md")])
    for summary in summaries:
        prefix = {"validation": "eval", "test": "test"}[summary["split"]]
        assert summary["metric"] == "f1" and summary["examples"] == 8
        assert summary["a_mean"] == pytest.approx(100 * recorded["lra"][f"{prefix}_f1"], abs=1e-6)
        assert summary["b_mean"] == pytest.approx(100 * recorded["lora"][f"{prefix}_f1"], abs=1e-6)
        assert summary["low"] <= summary["diff"] <= summary["high"]
    assert "entity F1" in text and "sign test p" in text


def test_paired_recommendation_runs_compare_users_ndcg(tmp_path: Path) -> None:
    """The recommender's runs: per-user NDCG@10 through the recipe's own evaluator, reproduced before comparing."""
    from test_recipes import _tiny_bert, run_recipe, small, write_movielens

    model, data = _tiny_bert(tmp_path / "tiny", dropout=0.0), write_movielens(tmp_path / "movielens")
    runs = {}
    for method in ("lra", "full"):
        runs[method] = tmp_path / method
        run_recipe("recommend.py", *small(model, data, runs[method], "--method", method, "--max_train_steps", "4",
                                          "--num_eval_negatives", "9"))
    paired = load_script("paired")
    text, summaries = paired.main(["--task", "recommend", "--a", str(runs["lra"]), "--b", str(runs["full"]),
                                   "--resamples", "200", "--out", str(tmp_path / "paired.md")])
    for summary in summaries:
        prefix = {"validation": "eval", "test": "test"}[summary["split"]]
        recorded = {m: json.loads((runs[m] / "metrics.json").read_text())[f"{prefix}_ndcg_at_10"] for m in runs}
        assert summary["metric"] == "ndcg_at_10" and summary["examples"] > 1
        assert summary["a_mean"] == pytest.approx(100 * recorded["lra"], abs=1e-4)
        assert summary["b_mean"] == pytest.approx(100 * recorded["full"], abs=1e-4)
    assert "sign test p" in text and "NDCG@10 × 100" in text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_the_default_quality_sweep_runs_the_recipes_that_have_shared_data_and_a_default_model() -> None:
    quality = load_script("quality")
    # instruct.py needs a causal LM and an instruction file that the shared data folder does not have.
    assert quality.find_recipes(BENCHMARKS.parent / "recipes") == ["intent", "ner", "recommend", "sentiment"]


def test_device_check_launches_the_fsdp_and_zero3_configs_with_the_single_process_global_batch(tmp_path: Path) -> None:
    """The sharded part of device_check.py needs GPUs; here: its command lines, and that every config in
    recipes/configs/ is one Accelerate reads, with the engine its name says."""
    from accelerate.commands.config.config_args import load_config_from_file

    sharded = load_script("_sharded")
    commands = sharded.launch_commands(tmp_path / "m", tmp_path / "d", tmp_path / "runs", num_processes=4, steps=7)
    assert list(commands) == ["single", "fsdp", "zero3"]

    def flag(command: list[str], name: str) -> str:
        return command[command.index(name) + 1]

    single = commands["single"]
    assert flag(single, "--num_processes") == "1" and flag(single, "--gradient_accumulation_steps") == "4"
    for name in ("fsdp", "zero3"):
        command = commands[name]
        assert Path(flag(command, "--config_file")).name == f"{name}.yaml"
        assert flag(command, "--num_processes") == "4" and "--gradient_accumulation_steps" not in command
        assert flag(command, "--per_device_train_batch_size") == flag(single, "--per_device_train_batch_size")
        assert flag(command, "--max_train_steps") == "7" and flag(command, "--mixed_precision") == "no"
        assert flag(command, "--output_dir") == str(tmp_path / "runs" / name)
    assert sharded.why_not_runnable("fsdp", "cpu") == "Accelerate shards only on GPUs"

    configs = BENCHMARKS.parent / "recipes" / "configs"
    engines = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "multinode": "MULTI_GPU"}
    assert sorted(p.stem for p in configs.glob("*.yaml")) == sorted(engines)
    for name, engine in engines.items():
        config = load_config_from_file(str(configs / f"{name}.yaml"))
        assert config.distributed_type == engine, name
    assert load_config_from_file(str(configs / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2
    assert load_config_from_file(str(configs / "zero3.yaml")).deepspeed_config["zero_stage"] == 3
    assert load_config_from_file(str(configs / "multinode.yaml")).num_machines == 2


def test_tune_reuses_an_archived_cell_only_with_the_same_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The grid's run folders do not survive a fresh checkout; the archived metrics.json does, and stands for the cell
    # only when it ran with the cell's flags (output folder aside).
    tune = load_script("tune")
    monkeypatch.setattr(tune, "ARCHIVE", tmp_path)
    recipe = tune.REPO_ROOT / "recipes" / "ner.py"
    flags = tune.cell_flags("2e-3", "constant+warmup", 26)
    ran = ["--method", "lra", "--seed", "42", "--output_dir", "/elsewhere/cell", *flags]
    (tmp_path / "cell.json").write_text(json.dumps({"command": f"accelerate launch recipes/ner.py {' '.join(ran)}",
                                                    "eval_f1": 0.8}))
    now = ["--method", "lra", "--seed", "42", "--output_dir", str(tmp_path / "runs" / "cell"), *flags]
    assert tune.archived("cell", recipe, now)["eval_f1"] == 0.8
    assert tune.archived("cell", recipe, [*now, "--distill_alpha", "0.5"]) is None
    assert tune.archived("cell", recipe, [a if a != "2e-3" else "1e-3" for a in now]) is None
    assert tune.archived("other", recipe, now) is None


STEPS_RECIPE = '''
import json, pathlib, sys

args = sys.argv[1:]
flag = lambda name: args[args.index(name) + 1]
out = pathlib.Path(flag("--output_dir"))
out.mkdir(parents=True, exist_ok=True)
steps, method = int(flag("--max_train_steps")), flag("--method")
score = {100: 0.50, 200: 0.70, 400: 0.795, 800: 0.80}[steps] - (0.1 if method == "lora" else 0.0)
(out / "metrics.json").write_text(json.dumps({"command": "python " + " ".join(sys.argv), "eval_f1": score,
                                              "test_f1": 0.99, "train_length": {"epochs_run": steps // 94 + 1}}))
'''


def test_min_steps_picks_the_fewest_steps_near_the_best_on_validation_and_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    min_steps = load_script("min_steps")
    monkeypatch.setattr(min_steps, "ARCHIVE", tmp_path / "archive")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "ner.py").write_text(STEPS_RECIPE)
    argv = ["--recipe", "ner", "--max_train_samples", "3000", "--steps", "100,200,400,800", "--variants", "lra,lora",
            "--recipe-dir", str(recipes), "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "t.md")]
    text = min_steps.main(argv)
    assert table_rows(text, "lra")[0] == ["lra", "50.00", "70.00", "79.50", "80.00"]
    # 400 steps are within 1 point of the best (800), 200 are not; the test split is neither shown nor used.
    assert table_rows(text, "lra")[1] == ["lra", "80.00", "400", "5", "79.50"]
    assert table_rows(text, "lora")[1][2] == "400" and "99.00" not in text  # test_f1 0.99 (the text holds tmp paths)
    assert min_steps.shortest_near_best({100: 50.0, 200: 79.2, 400: 80.0}, 1.0) == 200
    # Resumable: with the run folders gone and a recipe that fails, every run comes from the archive.
    (recipes / "ner.py").write_text("raise SystemExit(1)\n")
    for run in (tmp_path / "runs").iterdir():
        (run / "metrics.json").unlink(missing_ok=True)
    again = min_steps.main(argv)
    assert [table_rows(again, v) for v in ("lra", "lora")] == [table_rows(text, v) for v in ("lra", "lora")]
    # A different slice is a different run: it is not taken from the archive (and the failing recipe fails).
    with pytest.raises(RuntimeError):
        min_steps.main([*argv[:3], "1500", *argv[4:]])


def test_tune_compares_an_archived_cell_by_its_resolved_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run that recorded its resolved flags is the cell's run when today's recipe resolves the cell's flags the same
    # way, and not when a value differs (here the learning rate it ran with).
    tune = load_script("tune")
    monkeypatch.setattr(tune, "ARCHIVE", tmp_path)
    recipe = tune.REPO_ROOT / "recipes" / "ner.py"
    sys.path.insert(0, str(recipe.parent))
    try:
        ner = importlib.import_module("ner")
    finally:
        sys.path.remove(str(recipe.parent))
    now = ["--method", "lora", "--seed", "42", "--output_dir", str(tmp_path / "cell"), *tune.cell_flags("1e-3", "linear", 0)]
    recorded = json.loads(json.dumps(vars(ner.parse_args(now)), default=str))
    (tmp_path / "cell.json").write_text(json.dumps({"args": recorded, "command": "elsewhere", "eval_f1": 0.7}))
    assert tune.archived("cell", recipe, now)["eval_f1"] == 0.7
    (tmp_path / "cell.json").write_text(json.dumps({"args": {**recorded, "learning_rate": 2e-3}, "eval_f1": 0.7}))
    assert tune.archived("cell", recipe, now) is None
