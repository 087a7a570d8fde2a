"""Bad configs, damaged or untrusted adapter files and adapters of other shapes: a clear error, and the model exactly
as it was (every tensor, requires_grad flag, module and attribute)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_bert_seq_cls, rel_err, tiny_bert_config
from peft import AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from peft.config import PeftConfig
from reliability_utils import assert_unchanged, record
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

import lra_peft
from lra_peft import AdapterFileError, LRAConfig

TARGETS = ["query", "value"]
REPO = Path(__file__).resolve().parent.parent
NAN = float("nan")

# At least one invalid value per LRAConfig field (own and inherited); (value, extra kwargs, message pattern).
INVALID: dict[str, list[tuple]] = {
    "r": [(0, {}, None), (-1, {}, None), (2.5, {}, None), (True, {}, None), ("8", {}, None)],
    "lra_alpha": [(0, {}, None), (-1.0, {}, None), ("8", {}, None), (NAN, {}, None), (math.inf, {}, None)],
    "lra_dropout": [(-0.1, {}, None), (1.0, {}, None), ("0.1", {}, None), (NAN, {}, None)],
    "target_modules": [(5, {}, None), ([1], {}, None)],
    "exclude_modules": [(5, {}, None), ([None], {}, None)],
    "init_weights": [("pissa", {}, None), (1, {}, None), (None, {}, None)],
    "svd_niter": [(-1, {}, None), (2.5, {}, None), (True, {}, None), (4, {"init_weights": "minor"}, None)],
    "corda_method": [("ipm2", {}, None), (None, {}, None)],
    "gradient_scale": [(0, {}, None), (-1.0, {}, None), ("1", {}, None), (NAN, {}, None)],
    "orth_reg_weight": [(-0.1, {}, None), ("x", {}, None), (NAN, {}, None)],
    "fan_in_fan_out": [("yes", {}, None), (1, {}, None)],
    "bias": [("some", {}, None), (None, {}, None)],
    "modules_to_save": [(5, {}, None), ([1], {}, None)],
    "layers_to_transform": [(-1, {}, None), ("0", {}, None), ([0, -1], {}, None)],
    "layers_pattern": [("layer", {}, None), (5, {"layers_to_transform": [0]}, None)],
    "rank_pattern": [({"query": 0}, {}, None), ({"query": 2.5}, {}, None), ([1], {}, None)],
    "alpha_pattern": [({"query": 0}, {}, None), ({"query": NAN}, {}, None), ("x", {}, None)],
    "quant_refine_iters": [(-1, {}, None), (2, {}, None)],
    "target_r": [(0, {}, None), (16, {}, None), (2.5, {}, None)],
    "init_warmup": [(-1, {}, None)],
    "final_warmup": [(-1, {}, None)],
    "mask_interval": [(0, {}, None)],
    "total_step": [(0, {}, None), (10, {"target_r": 4, "init_warmup": 5, "final_warmup": 5}, None)],
    "beta1": [(1.0, {}, None), (-0.1, {}, None)],
    "beta2": [(1.5, {}, None), (NAN, {}, None)],
    "inference_mode": [("no", {}, None)],
    "base_model_name_or_path": [(5, {}, None)],
    "revision": [(5, {}, None)],
    "task_type": [("FOO", {}, "Invalid task type")],
}
# Set by PEFT itself, not by users.
NOT_USER_FIELDS = {"peft_type", "peft_version", "auto_mapping"}


def _invalid_cases() -> list:
    return [pytest.param(name, value, extra, pattern, id=f"{name}={value!r}")
            for name, cases in INVALID.items() for value, extra, pattern in cases]


def test_every_config_field_has_an_invalid_value_case() -> None:
    """A new LRAConfig field must come with validation (and a case above): this fails until it does."""
    fields = {f.name for f in dataclasses.fields(LRAConfig)} - NOT_USER_FIELDS
    assert fields == set(INVALID)


@pytest.mark.parametrize("name,value,extra,pattern", _invalid_cases())
def test_invalid_config_value_raises_naming_the_field(name: str, value, extra: dict, pattern) -> None:
    with pytest.raises(ValueError, match=pattern or rf"LRAConfig\.{name}\b.* is invalid: "):
        LRAConfig(**{"target_modules": ["query"], **extra, name: value})


def test_invalid_value_in_saved_config_is_named_on_load(tmp_path: Path) -> None:
    model = get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=TARGETS))
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["lra_dropout"] = 2.0
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    base = make_bert_seq_cls()
    before = record(base)
    with pytest.raises(ValueError, match=r"LRAConfig\.lra_dropout=2\.0 is invalid"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


# ----------------------------------------------------------------------------------------------- config files
@pytest.fixture
def saved(tmp_path: Path, input_ids: torch.Tensor) -> dict:
    """A trained-looking LRA adapter (with a classifier head in modules_to_save) saved to tmp_path/adapter."""
    model = get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=TARGETS, task_type="SEQ_CLS",
                                                          init_weights="principal"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lra_" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    return {"path": path, "logits": logits, "model": model}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '{"peft_type": "LRA", "r": 4,'])
def test_malformed_adapter_config_names_the_file(saved: dict, tmp_path: Path, text: str) -> None:
    bad = _copy(saved["path"], tmp_path / "bad")
    (bad / "adapter_config.json").write_text(text)
    base = make_bert_seq_cls()
    before = record(base)
    pattern = re.escape(str(bad / "adapter_config.json"))
    for load in (lambda: PeftModel.from_pretrained(base, bad),
                 lambda: AutoPeftModelForSequenceClassification.from_pretrained(bad),
                 lambda: PeftConfig.from_pretrained(bad),
                 lambda: LRAConfig.from_pretrained(bad)):
        with pytest.raises(AdapterFileError, match=pattern):
            load()
    assert_unchanged(base, before)


def test_malformed_config_in_load_adapter_leaves_the_model_unchanged(saved: dict, tmp_path: Path) -> None:
    model = PeftModel.from_pretrained(make_bert_seq_cls(), saved["path"])
    bad = _copy(saved["path"], tmp_path / "bad")
    (bad / "adapter_config.json").write_text("{")
    before = record(model)
    with pytest.raises(AdapterFileError, match=re.escape(str(bad / "adapter_config.json"))):
        model.load_adapter(bad, adapter_name="other")
    assert_unchanged(model, before, plain_base=False)
    assert set(model.peft_config) == {"default"}


def test_missing_adapter_config_names_the_file(saved: dict, tmp_path: Path) -> None:
    bad = _copy(saved["path"], tmp_path / "bad")
    (bad / "adapter_config.json").unlink()
    base = make_bert_seq_cls()
    before = record(base)
    pattern = re.escape(str(bad / "adapter_config.json")) + ".*not a saved PEFT"
    with pytest.raises(FileNotFoundError, match=pattern):
        PeftModel.from_pretrained(base, bad)
    with pytest.raises(ValueError, match=pattern):  # also what PEFT raises here, for code that catches that
        PeftModel.from_pretrained(base, bad)
    assert_unchanged(base, before)
    (bad / "adapter_config.json").write_text((saved["path"] / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has adapter_config\.json but no adapter_model\.safetensors"):
        PeftModel.from_pretrained(base, bad)
    assert_unchanged(base, before)
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftConfig.from_pretrained(tmp_path / "does-not-exist")


def test_config_from_a_newer_version_loads_with_a_warning_naming_the_keys(saved: dict, tmp_path: Path,
                                                                          input_ids: torch.Tensor) -> None:
    newer = _copy(saved["path"], tmp_path / "newer")
    data = json.loads((newer / "adapter_config.json").read_text())
    data.update(future_option=3, another_new_knob={"a": 1})
    (newer / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"another_new_knob.*future_option"):
        model = PeftModel.from_pretrained(make_bert_seq_cls(), newer)
    with torch.no_grad():
        assert rel_err(model(input_ids=input_ids).logits, saved["logits"]) <= 1e-5


# ----------------------------------------------------------------------------------------------- other shapes
def _wider_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(hidden_size=48, num_labels=3)).eval()


def test_adapter_for_other_shapes_names_layer_and_both_shapes_and_changes_nothing(saved: dict) -> None:
    base = _wider_bert()
    before = record(base)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self\.query\.lra_U: \(32, 4\) in the "
                                         r"checkpoint, \(48, 4\) in the model") as info:
        PeftModel.from_pretrained(base, saved["path"])
    assert "Nothing was loaded" in str(info.value)
    assert_unchanged(base, before)
    # Nothing is left that would make a later adapter see a stale `peft_config` ("Already found a peft_config").
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        get_peft_model(base, LRAConfig(r=2, target_modules=TARGETS))


def test_adapter_with_edited_rank_names_the_layer(saved: dict, tmp_path: Path) -> None:
    edited = _copy(saved["path"], tmp_path / "edited")
    data = json.loads((edited / "adapter_config.json").read_text())
    data["rank_pattern"] = {"bert.encoder.layer.1.attention.self.value": 2}
    (edited / "adapter_config.json").write_text(json.dumps(data))
    base = make_bert_seq_cls()
    before = record(base)
    with pytest.raises(ValueError, match=r"layer\.1\.attention\.self\.value\.lra_U: \(32, 4\) in the checkpoint, "
                                         r"\(32, 2\) in the model"):
        PeftModel.from_pretrained(base, edited)
    assert_unchanged(base, before)


_PEAK_RSS_OF_A_LOAD = """
import sys
sys.path.insert(0, sys.argv[2])
from conftest import make_bert_seq_cls
from peft import PeftModel

def peak_kib():
    # VmHWM is this process's own peak; ru_maxrss would carry the parent's over the fork.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

base = make_bert_seq_cls()
before = peak_kib()
try:
    PeftModel.from_pretrained(base, sys.argv[1])
except ValueError as exc:
    print("refused:", exc)
print("grew_kib", peak_kib() - before)
"""


def test_adapter_with_a_huge_edited_rank_is_refused_before_any_layer_is_built(saved: dict, tmp_path: Path) -> None:
    # r = 10**6 on 32-wide layers would build 4 layers × 6 factors of 32 × 10**6 floats (~2 GB) before the load-time
    # shape check; the header check refuses it first.
    edited = _copy(saved["path"], tmp_path / "edited")
    data = json.loads((edited / "adapter_config.json").read_text())
    data["r"] = 10**6
    (edited / "adapter_config.json").write_text(json.dumps(data))
    base = make_bert_seq_cls()
    before = record(base)
    with pytest.raises(ValueError, match=r"does not fit this model: bert\.encoder\.layer\.0\.attention\.self\.query"
                                         r"\.lra_U: \(32, 4\) in the checkpoint, \(32, 1000000\) in the model.*Nothing "
                                         r"was loaded"):
        PeftModel.from_pretrained(base, edited)
    assert_unchanged(base, before)
    script = tmp_path / "load.py"
    script.write_text(_PEAK_RSS_OF_A_LOAD)
    proc = subprocess.run([sys.executable, str(script), str(edited), str(REPO / "tests")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: The LRA adapter 'default' does not fit this model" in proc.stdout
    grew_mib = int(proc.stdout.split("grew_kib")[-1]) / 1024
    assert grew_mib < 100, f"the refused load raised the peak memory by {grew_mib:.0f} MiB"


def test_classifier_head_of_other_size_is_reported_and_changes_nothing(saved: dict) -> None:
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config(num_labels=5)).eval()
    before = record(base)
    # PyTorch's own message names the tensor and both shapes; the model is put back all the same.
    with pytest.raises(RuntimeError, match=r"classifier.*torch\.Size\(\[3, 32\]\).*torch\.Size\(\[5, 32\]\)"):
        PeftModel.from_pretrained(base, saved["path"])
    assert_unchanged(base, before)


def test_failed_load_adapter_keeps_the_loaded_adapters(saved: dict, tmp_path: Path, input_ids: torch.Tensor) -> None:
    model = PeftModel.from_pretrained(make_bert_seq_cls(), saved["path"])
    other = get_peft_model(_wider_bert(), LRAConfig(r=4, target_modules=TARGETS + ["key"], task_type="SEQ_CLS"))
    other.save_pretrained(tmp_path / "wide")
    before = record(model)
    with pytest.raises(ValueError, match=r"\(48, 4\) in the checkpoint, \(32, 4\) in the model"):
        model.load_adapter(tmp_path / "wide", adapter_name="wide")
    assert_unchanged(model, before, plain_base=False)
    assert set(model.peft_config) == {"default"}
    assert not any("wide" in name for name, _ in model.named_modules())
    with torch.no_grad():
        assert rel_err(model(input_ids=input_ids).logits, saved["logits"]) <= 1e-5


def test_failed_reload_into_an_existing_adapter_keeps_its_values(saved: dict, tmp_path: Path) -> None:
    model = PeftModel.from_pretrained(make_bert_seq_cls(), saved["path"])
    broken = _copy(saved["path"], tmp_path / "broken")
    state = load_file(broken / "adapter_model.safetensors")
    # New values for every LRA factor (that fit), and a head that does not: PyTorch would copy the former first.
    state = {k: v * 2 if ".lra_" in k else v for k, v in state.items()}
    state["base_model.model.classifier.weight"] = torch.zeros(7, 32)
    save_file(state, broken / "adapter_model.safetensors")
    before = record(model)
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_adapter(broken, adapter_name="default")
    assert_unchanged(model, before, plain_base=False)


def test_adapter_with_nan_factors_is_refused_at_load(saved: dict, tmp_path: Path) -> None:
    broken = _copy(saved["path"], tmp_path / "nan")
    state = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("layer.1.attention.self.value.lra_V"))
    state[key][0, 0] = float("nan")
    save_file(state, broken / "adapter_model.safetensors")
    base = make_bert_seq_cls()
    before = record(base)
    with pytest.raises(ValueError, match=r"NaN or Inf values in bert\.encoder\.layer\.1\.attention\.self\.value"):
        PeftModel.from_pretrained(base, broken)
    assert_unchanged(base, before)


@pytest.mark.parametrize("damage, named", [
    ("drop lra_U0", r"missing: bert\.encoder\.layer\.1\.attention\.self\.value\.lra_U0"),
    ("drop lra_lambda0", r"missing: bert\.encoder\.layer\.1\.attention\.self\.value\.lra_lambda0"),
    ("drop lra_V", r"missing: bert\.encoder\.layer\.1\.attention\.self\.value\.lra_V"),
    ("extra layer", r"not in this adapter's layers: bert\.encoder\.layer\.1\.attention\.self\.key\.lra_U"),
    ("lambda as int64", r"not floating point: bert\.encoder\.layer\.1\.attention\.self\.value\.lra_lambda \(int64\)"),
    ("lambda as bool", r"not floating point: .*value\.lra_lambda \(bool\)"),
])
def test_missing_extra_or_wrongly_typed_factors_are_named_with_the_file(saved: dict, tmp_path: Path, damage: str,
                                                                        named: str) -> None:
    broken = _copy(saved["path"], tmp_path / "broken")
    file = broken / "adapter_model.safetensors"
    state = load_file(file)
    value = "base_model.model.bert.encoder.layer.1.attention.self.value"
    if damage.startswith("drop"):
        del state[f"{value}.{damage.split()[1]}"]
    elif damage == "extra layer":
        state[value.replace("value", "key") + ".lra_U"] = state[f"{value}.lra_U"].clone()
    else:
        dtype = torch.int64 if "int64" in damage else torch.bool
        state[f"{value}.lra_lambda"] = state[f"{value}.lra_lambda"].to(dtype)
    save_file(state, file)
    for load in ("from_pretrained", "load_adapter"):
        base = make_bert_seq_cls()
        model = None
        if load == "load_adapter":
            model = PeftModel.from_pretrained(base, saved["path"])
        before = record(model if model is not None else base)
        with pytest.raises(AdapterFileError, match=re.escape(str(file)) + ".*" + named):
            if model is None:
                PeftModel.from_pretrained(base, broken)
            else:
                model.load_adapter(broken, "other")
        assert_unchanged(model if model is not None else base, before, plain_base=model is None)


def test_interrupt_during_load_leaves_the_model_unchanged(saved: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import peft.peft_model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", interrupted)
    base = make_bert_seq_cls()
    before = record(base)
    with pytest.raises(KeyboardInterrupt):
        PeftModel.from_pretrained(base, saved["path"])
    assert_unchanged(base, before)


# ------------------------------------------------------------------------------------------ damaged weight files
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "header-cut":
        path.write_bytes(data[:20])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"\x00\xff" * 64)
    elif how == "bad-header":
        path.write_bytes(data[:8] + data[8:40].replace(b'"', b"'", 1) + data[40:])


@pytest.mark.parametrize("how", ["truncated", "header-cut", "empty", "garbage", "bad-header"])
def test_damaged_safetensors_gives_a_clear_error_and_changes_nothing(saved: dict, tmp_path: Path, how: str) -> None:
    bad = _copy(saved["path"], tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    _damage(weights, how)
    base = make_bert_seq_cls()
    before = record(base)
    with pytest.raises(AdapterFileError, match=re.escape(str(weights)) + r".*truncated.*or corrupted"):
        PeftModel.from_pretrained(base, bad)
    assert_unchanged(base, before)
    model = PeftModel.from_pretrained(make_bert_seq_cls(), saved["path"])
    before = record(model)
    with pytest.raises(AdapterFileError, match=re.escape(str(weights))):
        model.load_adapter(bad, adapter_name="other")
    assert_unchanged(model, before, plain_base=False)


def test_damaged_safetensors_found_only_while_loading_is_explained(saved: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A file PEFT reads itself (e.g. one downloaded from the Hub) is reported the same way."""
    import lra_peft.safety

    bad = _copy(saved["path"], tmp_path / "bad")
    _damage(bad / "adapter_model.safetensors", "truncated")
    monkeypatch.setattr(lra_peft.safety, "_check_local_lra_weights", lambda folder: None)
    base = make_bert_seq_cls()
    before = record(base)
    with pytest.raises(AdapterFileError, match="truncated or corrupted"):
        PeftModel.from_pretrained(base, bad)
    assert_unchanged(base, before)


# ---------------------------------------------------------------------------------------------- pickle files
@pytest.fixture
def bin_adapter(saved: dict, tmp_path: Path) -> Path:
    path = _copy(saved["path"], tmp_path / "bin")
    state = load_file(path / "adapter_model.safetensors")
    torch.save(state, path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()
    return path


def test_bin_adapter_is_refused_without_opt_in(bin_adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LRA_PEFT_ALLOW_BIN", raising=False)
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load was called"))
    base = make_bert_seq_cls()
    before = record(base)
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin is a pickle file.*LRA_PEFT_ALLOW_BIN=1"):
        PeftModel.from_pretrained(base, bin_adapter)
    assert_unchanged(base, before)
    with pytest.raises(AdapterFileError, match="LRA_PEFT_ALLOW_BIN"):
        lra_peft.rank_report(bin_adapter)  # lra-peft's own readers (CLI, export) follow the same rule
    assert calls == []


def test_bin_adapter_with_opt_in_is_read_with_weights_only(saved: dict, bin_adapter: Path, input_ids: torch.Tensor,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRA_PEFT_ALLOW_BIN", "1")
    real_load = torch.load
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = PeftModel.from_pretrained(make_bert_seq_cls(), bin_adapter)
    with torch.no_grad():
        assert rel_err(model(input_ids=input_ids).logits, saved["logits"]) <= 1e-5
    assert lra_peft.rank_report(bin_adapter).total_rank > 0
    assert calls and all(flag is True for flag in calls)


def test_pickle_with_code_is_not_executed_even_with_opt_in(bin_adapter: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    monkeypatch.setenv("LRA_PEFT_ALLOW_BIN", "1")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(bin_adapter / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": Exploit()}, handle)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|not allowed"):
        PeftModel.from_pretrained(make_bert_seq_cls(), bin_adapter)
    assert not marker.exists()


def test_package_and_recipes_never_enable_trust_remote_code() -> None:
    offenders = []
    for folder in ("lra_peft", "recipes"):
        for path in (REPO / folder).rglob("*.py"):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"trust_remote_code\s*=\s*(True|1\b|args\.|os\.environ)", line):
                    offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert offenders == []


def test_save_and_load_round_trip_still_exact(saved: dict, input_ids: torch.Tensor) -> None:
    """The guards change nothing for a good adapter: from_pretrained and load_adapter load it exactly."""
    model = PeftModel.from_pretrained(make_bert_seq_cls(), saved["path"])
    model.load_adapter(saved["path"], adapter_name="again")
    assert isinstance(model.peft_config["again"], LRAConfig)
    with torch.no_grad():
        assert rel_err(model(input_ids=input_ids).logits, saved["logits"]) <= 1e-5
        model.set_adapter("again")
        assert rel_err(model(input_ids=input_ids).logits, saved["logits"]) <= 1e-5


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_cli_reports_a_damaged_adapter_in_one_line_naming_the_file(saved: dict, tmp_path: Path, damage: str,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from lra_peft.cli import main

    bad = _copy(saved["path"], tmp_path / "bad")
    broken = bad / ("adapter_config.json" if damage == "config" else "adapter_model.safetensors")
    if damage == "config":
        broken.write_text('{"peft_type": "LRA", ')
    else:
        _damage(broken, "truncated")
    for command in (["inspect", str(bad)], ["export-lora", str(bad), str(tmp_path / "lora")]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(broken) in err, err
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("name, target, says", [
    ("adapter_model.safetensors", "gone.safetensors", "which does not exist (a broken link)"),
    ("adapter_model.safetensors", "a_folder", "which is a folder"),
    ("adapter_config.json", "a_folder", "which is a folder"),
    ("adapter_config.json", "gone.json", "which does not exist (a broken link)"),
])
def test_a_symlink_to_a_non_file_is_reported_as_what_it_is(saved: dict, tmp_path: Path, name: str, target: str,
                                                           says: str, capsys: pytest.CaptureFixture) -> None:
    """A Hub-cache-like folder of links whose blob is gone (or a link to a folder) is not reported as a missing file."""
    from lra_peft.cli import main

    bad = _copy(saved["path"], tmp_path / "bad")
    (bad / "a_folder").mkdir()
    (bad / name).unlink()
    (bad / name).symlink_to(bad / target)
    expected = f"{bad / name} is a symbolic link to {bad / target}, {says}"
    base = make_bert_seq_cls()
    before = record(base)
    with pytest.raises(AdapterFileError, match=re.escape(expected)):
        PeftModel.from_pretrained(base, bad)
    assert_unchanged(base, before)
    for command in (["inspect", str(bad)], ["export-lora", str(bad), str(tmp_path / "lora")]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "lora").exists()
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # the adapter folder itself
    broken = f"is a symbolic link to {tmp_path / 'gone'}, which does not exist"
    assert main(["inspect", str(tmp_path / "link")]) == 1
    assert broken in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=re.escape(broken)):
        PeftModel.from_pretrained(base, tmp_path / "link")
    assert_unchanged(base, before)
