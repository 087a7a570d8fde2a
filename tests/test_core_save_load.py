"""Save with safetensors, load in a fresh Python process, get identical outputs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_bert_seq_cls, make_gpt2
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from lra_peft import LRAConfig, LRALayer

TARGETS = ["query", "value"]

LOADER = textwrap.dedent(
    """
    import sys, torch
    import lra_peft, lra_peft.decomposition as dec, lra_peft.layer as layer
    from transformers import AutoModelForSequenceClassification, AutoModelForCausalLM
    from peft import PeftModel, AutoPeftModelForSequenceClassification, AutoPeftModelForCausalLM

    def no_svd(*args, **kwargs):
        raise AssertionError("loading a saved adapter must not run an SVD")
    dec.top_or_bottom_svd = layer.top_or_bottom_svd = no_svd
    torch.manual_seed(12345)  # a different RNG state than at save time must not matter

    mode, base_dir, ref_path = sys.argv[1], sys.argv[2], sys.argv[3]
    adapters = sys.argv[4:]
    ref = torch.load(ref_path)
    if mode == "auto-seq":
        model = AutoPeftModelForSequenceClassification.from_pretrained(adapters[0])
    elif mode == "auto-causal":
        model = AutoPeftModelForCausalLM.from_pretrained(adapters[0])
    else:
        cls = AutoModelForCausalLM if mode == "causal" else AutoModelForSequenceClassification
        model = PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapters[0])
        for i, path in enumerate(adapters[1:], start=1):
            model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    names = ["default"] + [f"a{i}" for i in range(1, len(adapters))]
    for i, name in enumerate(names):
        model.set_adapter(name)
        with torch.no_grad():
            out = model(input_ids=ref["input_ids"]).logits
        err = ((out - ref["outputs"][i]).norm() / ref["outputs"][i].norm()).item()
        assert err <= 1e-5, (name, err)
    with model.disable_adapter(), torch.no_grad():
        out = model(input_ids=ref["input_ids"]).logits
    err = ((out - ref["base"]).norm() / ref["base"].norm()).item()
    assert err <= 1e-5, ("base", err)
    print("OK")
    """
)


def _train_like(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))


def _run_loader(tmp_path: Path, mode: str, base_dir: Path, ref: dict, adapters: list[Path]) -> None:
    ref_path = tmp_path / "ref.pt"
    torch.save(ref, ref_path)
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    proc = subprocess.run([sys.executable, str(script), mode, str(base_dir), str(ref_path), *map(str, adapters)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def _make_saved(tmp_path: Path, make, task_type: str, targets, configs: list[dict], input_ids: torch.Tensor):
    base = make()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    with torch.no_grad():
        ref = {"input_ids": input_ids, "base": base(input_ids=input_ids).logits, "outputs": []}
    paths = []
    for i, kwargs in enumerate(configs):
        model = get_peft_model(copy.deepcopy(base), LRAConfig(r=4, target_modules=targets, task_type=task_type,
                                                              **kwargs))
        model.base_model.model.name_or_path = str(base_dir)
        _train_like(model, seed=i)
        model.eval()
        with torch.no_grad():
            ref["outputs"].append(model(input_ids=input_ids).logits)
        path = tmp_path / f"adapter{i}"
        model.save_pretrained(path)
        paths.append(path)
    return base_dir, ref, paths


@pytest.mark.parametrize("init,niter", [(True, None), ("principal", None), ("principal", 2), ("minor", None)])
def test_fresh_process_peft_model_from_pretrained(tmp_path: Path, input_ids: torch.Tensor, init, niter) -> None:
    base_dir, ref, paths = _make_saved(tmp_path, make_bert_seq_cls, "SEQ_CLS", TARGETS,
                                       [dict(init_weights=init, svd_niter=niter)], input_ids)
    files = {p.name for p in paths[0].iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    _run_loader(tmp_path, "seq", base_dir, ref, paths)


def test_fresh_process_auto_peft_model(tmp_path: Path, input_ids: torch.Tensor) -> None:
    base_dir, ref, paths = _make_saved(tmp_path, make_bert_seq_cls, "SEQ_CLS", TARGETS,
                                       [dict(init_weights="principal")], input_ids)
    assert json.loads((paths[0] / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    _run_loader(tmp_path, "auto-seq", base_dir, ref, paths)


def test_fresh_process_gpt2_conv1d(tmp_path: Path, input_ids: torch.Tensor) -> None:
    base_dir, ref, paths = _make_saved(tmp_path, make_gpt2, "CAUSAL_LM", ["c_attn", "c_fc"],
                                       [dict(init_weights="principal")], input_ids)
    _run_loader(tmp_path, "auto-causal", base_dir, ref, paths)


def test_two_principal_adapters_load_into_one_model(tmp_path: Path, input_ids: torch.Tensor) -> None:
    """Each adapter was trained on its own residual; loaded together onto the original model, neither is corrupted."""
    base_dir, ref, paths = _make_saved(
        tmp_path, make_bert_seq_cls, "SEQ_CLS", TARGETS,
        [dict(init_weights="principal"), dict(init_weights="principal", svd_niter=2), dict(init_weights=True)],
        input_ids,
    )
    _run_loader(tmp_path, "seq", base_dir, ref, paths)


def test_saved_files_and_config(tmp_path: Path, input_ids: torch.Tensor) -> None:
    base_dir, ref, paths = _make_saved(tmp_path, make_bert_seq_cls, "SEQ_CLS", TARGETS,
                                       [dict(init_weights="principal")], input_ids)
    config = PeftConfig.from_pretrained(paths[0])
    assert isinstance(config, LRAConfig)
    assert config.init_weights == "principal" and config.r == 4 and config.peft_type == "LRA"
    tensors = load_file(paths[0] / "adapter_model.safetensors")
    suffixes = {key.rsplit(".", 1)[-1] for key in tensors if ".lra_" in key}
    assert suffixes == {"lra_U", "lra_lambda", "lra_V", "lra_U0", "lra_lambda0", "lra_V0"}
    assert not any("base_layer" in key for key in tensors)
    assert any("classifier" in key for key in tensors)  # modules_to_save of SEQ_CLS


def test_load_for_further_training(tmp_path: Path, input_ids: torch.Tensor) -> None:
    base_dir, ref, paths = _make_saved(tmp_path, make_bert_seq_cls, "SEQ_CLS", TARGETS,
                                       [dict(init_weights="principal")], input_ids)
    base = make_bert_seq_cls()
    model = PeftModel.from_pretrained(base, paths[0], is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lra_U." in n for n in trainable) and not any("lra_U0" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    labels = torch.tensor([0, 1, 2, 0])
    first = model(input_ids=input_ids, labels=labels).loss
    first.backward()
    optimizer.step()
    assert model(input_ids=input_ids, labels=labels).loss.item() < first.item()
    for layer in (m for m in model.modules() if isinstance(m, LRALayer)):
        assert layer.residual_owner is None  # loaded adapters never rewrite the base weights


def test_loading_with_a_user_built_config_still_exact(tmp_path: Path, input_ids: torch.Tensor) -> None:
    """PeftModel.from_pretrained(config=LRAConfig(...)) runs an SVD first; loading must still give the saved model."""
    base_dir, ref, paths = _make_saved(tmp_path, make_bert_seq_cls, "SEQ_CLS", TARGETS,
                                       [dict(init_weights="principal", svd_niter=2)], input_ids)
    config = LRAConfig(r=4, target_modules=TARGETS, task_type="SEQ_CLS", init_weights="principal", svd_niter=2)
    model = PeftModel.from_pretrained(make_bert_seq_cls(), paths[0], config=config).eval()
    with torch.no_grad():
        out = model(input_ids=input_ids).logits
    torch.testing.assert_close(out, ref["outputs"][0], rtol=1e-5, atol=1e-5)


def test_load_adapter_into_the_same_principal_run_keeps_the_residual(tmp_path: Path, input_ids: torch.Tensor) -> None:
    """Trainer's resume loads a checkpoint into the adapter being trained: the residual base must stay bit-identical."""
    model = get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=TARGETS, init_weights="principal",
                                                          task_type="SEQ_CLS"))
    _train_like(model, seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    residual = {n: m.get_base_layer().weight.clone() for n, m in model.named_modules() if isinstance(m, LRALayer)}
    model.eval()
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    model.load_adapter(tmp_path / "ckpt", adapter_name="default", is_trainable=True)
    for name, module in model.named_modules():
        if isinstance(module, LRALayer):
            assert module.residual_owner == "default"
            assert torch.equal(module.get_base_layer().weight, residual[name])
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, before)


@pytest.mark.parametrize("init", ["principal", "minor"])
def test_base_model_state_dict_is_the_pretrained_one_and_round_trips(init: str, input_ids: torch.Tensor) -> None:
    import peft

    pretrained = make_bert_seq_cls()
    original = {k: v.clone() for k, v in pretrained.state_dict().items()}
    model = get_peft_model(copy.deepcopy(pretrained), LRAConfig(r=4, target_modules=["query", "value"],
                                                                init_weights=init))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lra_" in name:
                param.add_(0.1 * torch.randn_like(param))
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert (query.get_base_layer().weight - original["bert.encoder.layer.0.attention.self.query.weight"]).norm() > 1e-2

    state = peft.get_base_model_state_dict(model)  # what `from peft import ...` gives after `import lra_peft`
    assert state.keys() == original.keys()
    for key, value in original.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5, msg=key)

    # Round trip into the same model: weights and outputs unchanged.
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    residual = query.get_base_layer().weight.clone()
    peft.set_base_model_state_dict(model, state)
    torch.testing.assert_close(query.get_base_layer().weight, residual, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, before, rtol=0, atol=1e-5)

    # Into a model built from other weights: it then holds the given pretrained weights (its own ΔW₀ still removed).
    other = get_peft_model(make_bert_seq_cls(seed=1), LRAConfig(r=4, target_modules=["query", "value"],
                                                                init_weights=init))
    peft.utils.set_base_model_state_dict(other, state)
    for key, value in peft.utils.save_and_load.get_base_model_state_dict(other).items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=1e-5, msg=key)
    with torch.no_grad(), other.disable_adapter():
        torch.testing.assert_close(other(input_ids=input_ids).logits, pretrained(input_ids=input_ids).logits,
                                   rtol=0, atol=1e-5)
