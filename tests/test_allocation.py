"""Adaptive rank allocation over λ: schedule, global budget, permanent pruning, Trainer callback, cut save/load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_bert_seq_cls, make_gpt2, make_mlp, rel_err, require, tiny_bert_config
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import lra_peft
from lra_peft import LRAConfig, LRALayer, LRARankCallback, budget_schedule

TARGETS = ["query", "value", "dense"]  # 11 layers in the tiny BERT (dense includes the pooler)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run fastest single-threaded, and the CI machine's cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**kwargs) -> LRAConfig:
    defaults = dict(r=6, target_r=3, total_step=30, init_warmup=4, final_warmup=6, mask_interval=2,
                    target_modules=TARGETS)
    defaults.update(kwargs)
    return LRAConfig(**defaults)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 100, (8, 10), generator=gen), torch.randint(0, 3, (8,), generator=gen)


def _optimizer(model: torch.nn.Module, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=weight_decay)


def _train(model, optimizer, steps, *, start: int = 1, after_step=None, allocate=None) -> None:
    """A custom training loop: optimizer.step(), then update_and_allocate(step), then zero_grad()."""
    allocate = allocate or model.update_and_allocate
    x, y = _batch()
    model.train()
    for step in range(start, start + steps):
        model(input_ids=x, labels=y).loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step, "before")
        allocate(step)
        if after_step is not None:
            after_step(step, "after")
        optimizer.zero_grad()
    model.eval()


def _lambdas(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {n: m.lra_lambda[adapter] for n, m in model.base_model.model.named_modules()
            if isinstance(m, LRALayer) and adapter in m.lra_lambda}


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


# ------------------------------------------------------------------------------------------------------- schedule
def test_budget_schedule_values() -> None:
    kwargs = dict(init_budget=100, target_budget=40, init_warmup=10, final_warmup=20, total_step=110)
    # final_step = 90; in between: 40 + 60 · (1 − (step − 10) / 80)³, rounded down.
    expected = {0: 100, 10: 100, 11: 97, 30: 65, 50: 47, 89: 40, 90: 40, 110: 40, 500: 40}
    assert {step: budget_schedule(step, **kwargs) for step in expected} == expected
    budgets = [budget_schedule(step, **kwargs) for step in range(0, 120)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:])), "the budget never grows"


def test_allocation_follows_schedule_and_ends_at_global_budget() -> None:
    model = get_peft_model(make_bert_seq_cls(), _config())
    allocator_budgets, totals = {}, {}

    def record(step, when):
        if when == "after":
            allocator = model.base_model._rank_allocators()["default"]
            allocator_budgets[step] = allocator.budget_at(step)
            totals[step] = sum(model.allocated_ranks().values())

    _train(model, _optimizer(model), 30, after_step=record)
    n_layers, init_budget, target_budget = 11, 66, 33
    assert len(_lambdas(model)) == n_layers
    assert totals[4] == init_budget, "nothing is pruned during init_warmup"
    for step in range(6, 24, 2):  # mask steps in the cubic phase
        assert totals[step] == allocator_budgets[step], step
    assert totals[5] == totals[4] and totals[7] == totals[6], "only mask steps prune"
    assert totals[16] == 35 > target_budget, "33 + 33 · (1 − 12/20)³ = 35.1"
    assert all(totals[step] == target_budget for step in range(24, 31)), "target from total_step − final_warmup on"
    ranks = model.allocated_ranks()
    assert sum(ranks.values()) == target_budget
    assert len(set(ranks.values())) > 1, f"a global budget gives layers different ranks: {ranks}"
    assert min(ranks.values()) >= 1
    # What the allocator reports is what the model holds: exactly the non-pruned λ are non-zero.
    assert {n: int((lam != 0).sum()) for n, lam in _lambdas(model).items()} == ranks


def test_pruned_lambda_stay_zero_under_adamw_momentum_and_weight_decay() -> None:
    model = get_peft_model(make_bert_seq_cls(), _config())
    optimizer = _optimizer(model, weight_decay=0.1)
    _train(model, optimizer, 30)
    pruned = {n: lam.detach() == 0 for n, lam in _lambdas(model).items()}
    assert sum(int(m.sum()) for m in pruned.values()) == 66 - 33
    # Adam's first moment of the pruned λ is not zero: left alone, the optimizer would move them.
    momentum = [optimizer.state[lam]["exp_avg"][pruned[n]] for n, lam in _lambdas(model).items()]
    assert any(bool((m != 0).any()) for m in momentum)

    def check(step, when):
        for n, lam in _lambdas(model).items():
            assert (lam[pruned[n]] == 0).all(), f"a pruned λ of {n} is non-zero {when} update_and_allocate({step})"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # past total_step: warned once, tested elsewhere
        _train(model, optimizer, 8, start=31, after_step=check)
    # Also when a loop calls update_and_allocate less often (or evaluates in between): zero after every step.
    _train(model, optimizer, 3, start=39, allocate=lambda step: None, after_step=check)


def test_update_and_allocate_reaches_lra_model_through_peft_model() -> None:
    model = get_peft_model(make_bert_seq_cls(), _config())
    _train(model, _optimizer(model), 10, allocate=model.base_model.update_and_allocate)  # AdaLoRA's spelling
    allocator = model.base_model._rank_allocators()["default"]
    _train(model, _optimizer(model), 2, start=11)  # PeftModel forwards the attribute: same allocator
    assert model.base_model._rank_allocators()["default"] is allocator
    assert allocator.last_step == 12 and allocator.num_updates == 12


# -------------------------------------------------------------------------------------------------- bad usage
def test_errors_and_warnings_for_bad_usage() -> None:
    model = get_peft_model(make_bert_seq_cls(), _config(total_step=None))
    x, y = _batch()
    model(input_ids=x, labels=y).loss.backward()
    with pytest.raises(ValueError, match="total_step is None"):
        model.update_and_allocate(1)
    with pytest.raises(ValueError, match="global_step"):
        model.update_and_allocate(-1)
    model.peft_config["default"].total_step = 30
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="after optimizer.step\\(\\) and before optimizer.zero_grad\\(\\)"):
        model.update_and_allocate(1)

    off = get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="allocation is off.*target_r"):
        off.update_and_allocate(1)

    late = get_peft_model(make_bert_seq_cls(), _config())
    with pytest.warns(UserWarning, match="final budget at step 24 without a single importance update"):
        _train(late, _optimizer(late), 1, start=24)
    assert sum(late.allocated_ranks().values()) == 33

    model = get_peft_model(make_bert_seq_cls(), _config())
    _train(model, _optimizer(model), 30)
    ranks = model.allocated_ranks()
    with pytest.warns(UserWarning, match="past LRAConfig.total_step=30") as record:
        _train(model, _optimizer(model), 3, start=31)
    assert len([w for w in record if "past LRAConfig.total_step" in str(w.message)]) == 1, "warned once"
    assert model.allocated_ranks() == ranks


def test_target_budget_larger_than_rank_pattern_allows_is_an_error() -> None:
    config = _config(r=6, target_r=5, rank_pattern={"query": 2, "value": 2, "dense": 2})
    model = get_peft_model(make_bert_seq_cls(), config)
    x, y = _batch()
    model(input_ids=x, labels=y).loss.backward()
    with pytest.raises(ValueError, match="target_r=5 .* lower target_r"):
        model.update_and_allocate(1)


# ------------------------------------------------------------------------------------------------ save / load
def _assert_saved_matches_ranks(directory: Path, ranks: dict[str, int], r0: int | None = None) -> None:
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["rank_pattern"] == ranks
    tensors = load_file(directory / "adapter_model.safetensors")
    for name, rank in ranks.items():
        prefix = f"base_model.model.{name}"
        assert tensors[f"{prefix}.lra_lambda"].shape == (rank,), name
        assert tensors[f"{prefix}.lra_U"].shape[1] == rank and tensors[f"{prefix}.lra_V"].shape[1] == rank
        if r0 is not None:  # ΔW₀ is never cut
            assert tensors[f"{prefix}.lra_lambda0"].shape == (r0,)
            assert tensors[f"{prefix}.lra_U0"].shape[1] == r0 and tensors[f"{prefix}.lra_V0"].shape[1] == r0


@pytest.mark.parametrize(
    "init_weights, orth_reg_weight", [(True, 0.0), (True, 0.1), ("principal", 0.0), ("minor", 0.1)]
)
def test_save_cuts_to_allocated_ranks_and_load_is_exact(tmp_path: Path, init_weights, orth_reg_weight) -> None:
    model = get_peft_model(make_bert_seq_cls(), _config(init_weights=init_weights, orth_reg_weight=orth_reg_weight))
    with pytest.warns(UserWarning, match="never ran"):
        model.save_pretrained(tmp_path / "full")  # before any allocation: full rank, for the size comparison
    _train(model, _optimizer(model, weight_decay=0.01), 30)
    ranks = model.allocated_ranks()
    assert sum(ranks.values()) == 33
    model.save_pretrained(tmp_path / "cut")
    _assert_saved_matches_ranks(tmp_path / "cut", ranks, r0=6 if init_weights in ("principal", "minor") else None)

    # The file shrinks by the pruned columns of U and V and the pruned λ (float32).
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LRALayer)}
    saved_bytes = sum((6 - k) * (layers[n].out_features + layers[n].in_features + 1) * 4 for n, k in ranks.items())
    full = (tmp_path / "full" / "adapter_model.safetensors").stat().st_size
    cut = (tmp_path / "cut" / "adapter_model.safetensors").stat().st_size
    assert abs((full - cut) - saved_bytes) < 2048, (full, cut, saved_bytes)  # up to the safetensors header

    x, _ = _batch(1)
    expected = _logits(model, x)
    loaded = PeftModel.from_pretrained(make_bert_seq_cls(), tmp_path / "cut")
    assert {n: m.r["default"] for n, m in loaded.base_model.model.named_modules() if isinstance(m, LRALayer)} == ranks
    assert {n: m.scaling["default"] for n, m in loaded.base_model.model.named_modules()
            if isinstance(m, LRALayer)} == {n: m.scaling["default"] for n, m in layers.items()}, "s = lra_alpha / r kept"
    assert rel_err(_logits(loaded, x), expected) < 1e-6
    # Merging works as before, on the trained model and on the loaded one.
    assert rel_err(_logits(loaded.merge_and_unload(), x), expected) < 1e-5
    model.merge_adapter()
    assert rel_err(_logits(model, x), expected) < 1e-5


def test_save_without_allocation_warns_and_keeps_full_rank(tmp_path: Path) -> None:
    model = get_peft_model(make_bert_seq_cls(), _config())
    with pytest.warns(UserWarning, match="target_r=3 configures adaptive rank allocation .* never ran"):
        model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == {}
    # A loaded adapter that was already allocated is at its target: saving it again does not warn.
    model = get_peft_model(make_bert_seq_cls(), _config())
    _train(model, _optimizer(model), 30)
    model.save_pretrained(tmp_path / "allocated")
    loaded = PeftModel.from_pretrained(make_bert_seq_cls(), tmp_path / "allocated", is_trainable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == (
        json.loads((tmp_path / "allocated" / "adapter_config.json").read_text())["rank_pattern"]
    )


def test_mid_training_save_is_exact(tmp_path: Path) -> None:
    model = get_peft_model(make_bert_seq_cls(), _config())
    _train(model, _optimizer(model), 14)  # in the cubic phase
    ranks = model.allocated_ranks()
    assert 33 < sum(ranks.values()) < 66
    model.save_pretrained(tmp_path)
    _assert_saved_matches_ranks(tmp_path, ranks)
    x, _ = _batch(1)
    loaded = PeftModel.from_pretrained(make_bert_seq_cls(), tmp_path)
    assert rel_err(_logits(loaded, x), _logits(model, x)) < 1e-6


def test_loading_a_cut_checkpoint_into_the_full_rank_adapter_is_a_clear_error(tmp_path: Path) -> None:
    # What Trainer(resume_from_checkpoint=...) does: load_adapter into the run's own, still full-rank, adapter.
    model = get_peft_model(make_bert_seq_cls(), _config())
    _train(model, _optimizer(model), 30)
    model.save_pretrained(tmp_path)
    fresh_run = get_peft_model(make_bert_seq_cls(), _config())
    before = {n: lam.detach().clone() for n, lam in _lambdas(fresh_run).items()}
    with pytest.raises(ValueError, match="cut to the ranks chosen by adaptive rank allocation.*is_trainable=True"):
        fresh_run.load_adapter(tmp_path, "default", is_trainable=True)
    assert all(torch.equal(lam, before[n]) for n, lam in _lambdas(fresh_run).items()), "nothing was loaded"
    # The supported way: a fresh base model takes the cut shapes from rank_pattern, and can train on.
    resumed = PeftModel.from_pretrained(make_bert_seq_cls(), tmp_path, is_trainable=True)
    assert resumed.allocated_ranks() == model.allocated_ranks()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # already at its target: nothing to warn about
        _train(resumed, _optimizer(resumed), 2, start=29)
    assert resumed.allocated_ranks() == model.allocated_ranks()


def test_embedding_conv2d_linear_layers(tmp_path: Path, mlp_inputs: dict) -> None:
    config = LRAConfig(r=4, target_r=2, total_step=12, init_warmup=2, final_warmup=2, mask_interval=1,
                       target_modules=["emb", "conv", "lin0", "lin1"])
    model = get_peft_model(make_mlp(), config)
    optimizer = _optimizer(model)
    labels = torch.tensor([0, 1, 2, 3])
    model.train()
    for step in range(1, 13):
        F.cross_entropy(model(**mlp_inputs), labels).backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()
    ranks = model.allocated_ranks()
    assert sum(ranks.values()) == 8
    model.save_pretrained(tmp_path)
    _assert_saved_matches_ranks(tmp_path, ranks)
    loaded = PeftModel.from_pretrained(make_mlp(), tmp_path)
    with torch.no_grad():
        assert rel_err(loaded(**mlp_inputs), model(**mlp_inputs)) < 1e-6


def test_gpt2_conv1d(tmp_path: Path) -> None:
    model = get_peft_model(make_gpt2(), _config(target_modules=["c_attn", "c_proj"], total_step=12, init_warmup=2,
                                               final_warmup=2, fan_in_fan_out=True))
    optimizer = _optimizer(model)
    x, _ = _batch()
    model.train()
    for step in range(1, 13):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()
    ranks = model.allocated_ranks()
    assert sum(ranks.values()) == 3 * len(ranks)
    model.save_pretrained(tmp_path)
    _assert_saved_matches_ranks(tmp_path, ranks)
    loaded = PeftModel.from_pretrained(make_gpt2(), tmp_path)
    assert rel_err(_logits(loaded, x), _logits(model, x)) < 1e-6


def test_only_the_trained_adapter_allocates(tmp_path: Path) -> None:
    model = get_peft_model(make_bert_seq_cls(), _config(), adapter_name="task1")
    model.add_adapter("task2", _config(init_weights=False))
    b_before = {n: lam.detach().clone() for n, lam in _lambdas(model, "task2").items()}
    model.set_adapter("task1")
    _train(model, _optimizer(model), 30)
    assert set(model.base_model._rank_allocators()) == {"task1"}
    assert sum(model.allocated_ranks("task1").values()) == 33
    assert sum(model.allocated_ranks("task2").values()) == 66
    assert all(torch.equal(lam, b_before[n]) for n, lam in _lambdas(model, "task2").items())
    model.save_pretrained(tmp_path, selected_adapters=["task1"])
    _assert_saved_matches_ranks(tmp_path / "task1", model.allocated_ranks("task1"))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base(tmp_path: Path, bits: int) -> None:
    require("bitsandbytes")
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, BitsAndBytesConfig

    # bitsandbytes' 4-bit CPU kernels need in_features of at least one quantization block (64).
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(hidden_size=64, intermediate_size=128, num_labels=3)).save_pretrained(
        tmp_path / "base")
    # The 3-way classifier stays in full precision (4-bit CPU kernels want out_features divisible by 32).
    quantization = BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4,
                                      llm_int8_skip_modules=["classifier"])
    base = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", quantization_config=quantization, device_map="cpu"
    )
    model = get_peft_model(base, _config(target_modules=["query", "value"], total_step=12, init_warmup=2,
                                         final_warmup=2))
    assert type(model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer).__name__ == \
        ("Linear8bitLt" if bits == 8 else "Linear4bit")
    _train(model, _optimizer(model), 12)
    ranks = model.allocated_ranks()
    assert sum(ranks.values()) == 3 * 4
    model.save_pretrained(tmp_path / "adapter")
    _assert_saved_matches_ranks(tmp_path / "adapter", ranks)
    assert torch.isfinite(_logits(model, _batch(1)[0])).all()


def test_accelerate_loop_with_gradient_accumulation(tmp_path: Path) -> None:
    from accelerate import Accelerator

    model = get_peft_model(make_bert_seq_cls(), _config(total_step=12, init_warmup=2, final_warmup=2))
    optimizer = _optimizer(model)
    loader = torch.utils.data.DataLoader(_Dataset(), batch_size=2)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    step = 0
    model.train()
    while step < 12:
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                optimizer.step()
                if accelerator.sync_gradients:
                    step += 1
                    if not accelerator.optimizer_step_was_skipped:
                        accelerator.unwrap_model(model).update_and_allocate(step)
                optimizer.zero_grad()
    unwrapped = accelerator.unwrap_model(model)
    ranks = unwrapped.allocated_ranks()
    assert sum(ranks.values()) == 33
    unwrapped.save_pretrained(tmp_path)
    _assert_saved_matches_ranks(tmp_path, ranks)
    # What the saved adapter says is what lra_peft.rank_report (and the CLI) reads back.
    assert lra_peft.rank_report(tmp_path).ranks == ranks
    assert lra_peft.rank_report(unwrapped).ranks == ranks


LOADER = textwrap.dedent(
    """
    import sys, torch, lra_peft
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    base_dir, adapter_dir, ref_path = sys.argv[1:4]
    ref = torch.load(ref_path)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        out = model(input_ids=ref["x"]).logits
    err = ((out - ref["logits"]).norm() / ref["logits"].norm()).item()
    assert err < 1e-6, err
    print("OK", err)
    """
)


def test_fresh_process_load(tmp_path: Path) -> None:
    model = get_peft_model(make_bert_seq_cls(), _config(init_weights="principal"))
    _train(model, _optimizer(model), 30)
    make_bert_seq_cls().save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    x, _ = _batch(1)
    torch.save({"x": x, "logits": _logits(model, x)}, tmp_path / "ref.pt")
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "base"), str(tmp_path / "adapter"),
                           str(tmp_path / "ref.pt")], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# -------------------------------------------------------------------------------------------------- Trainer
class _Dataset(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = _batch()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def _trainer(model, tmp_path: Path, callbacks, max_steps: int = 20):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=2e-2,
        save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=_Dataset(), callbacks=callbacks)


def test_trainer_with_callback_allocates(tmp_path: Path) -> None:
    model = get_peft_model(make_bert_seq_cls(), _config(total_step=None, init_warmup=2, final_warmup=4))
    trainer = _trainer(model, tmp_path, [LRARankCallback()])
    trainer.train()
    assert model.peft_config["default"].total_step == 20, "filled from max_steps"
    ranks = model.allocated_ranks()
    assert sum(ranks.values()) == 33 and len(set(ranks.values())) > 1
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == ranks
    _assert_saved_matches_ranks(tmp_path / "final", ranks)


def test_trainer_callback_warns_once_when_max_steps_disagrees(tmp_path: Path) -> None:
    model = get_peft_model(make_bert_seq_cls(), _config(total_step=40, init_warmup=2, final_warmup=4))
    with pytest.warns(UserWarning) as record:
        _trainer(model, tmp_path, [LRARankCallback()], max_steps=10).train()
    messages = [str(w.message) for w in record]
    assert sum("differs from the Trainer's max_steps=10" in m for m in messages) == 1
    assert any("before adaptive rank allocation" in m for m in messages), "train end: budget not reached"


def test_trainer_without_callback_warns_that_allocation_never_ran(tmp_path: Path) -> None:
    model = get_peft_model(make_bert_seq_cls(), _config(total_step=20))
    trainer = _trainer(model, tmp_path, callbacks=None, max_steps=3)
    trainer.train()
    with pytest.warns(UserWarning, match="never ran.*LRARankCallback"):
        trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["rank_pattern"] == {}


def test_public_names() -> None:
    assert lra_peft.LRARankCallback is LRARankCallback and lra_peft.budget_schedule is budget_schedule
