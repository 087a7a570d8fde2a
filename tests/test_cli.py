"""The `lra-peft` command line and `lra_peft.rank_report`, on small saved adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_bert_seq_cls, make_gpt2, rel_err
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config

import lra_peft
from lra_peft import LRAConfig
from lra_peft.cli import main

R = 4
PRUNED = "transformer.h.1.mlp.c_fc"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A GPT-2 base, a trained-like principal LRA adapter with two λ pruned in one layer, and reference outputs."""
    root = tmp_path_factory.mktemp("cli")
    make_gpt2().save_pretrained(root / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"),
                           LRAConfig(r=R, target_modules=["c_attn", "c_proj", "c_fc"], init_weights="principal",
                                     task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
        model.base_model.model.get_submodule(PRUNED).lra_lambda["default"][:2] = 0.0
    model.eval()
    input_ids = torch.randint(1, VOCAB, (2, 7), generator=gen)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(root / "adapter")
    make_bert_seq_cls().save_pretrained(root / "bert")
    wide = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)  # same modules, other sizes
    AutoModelForCausalLM.from_config(wide).save_pretrained(root / "wide_gpt2")
    lra_peft.export_lora(root / "adapter", root / "lora")
    (root / "damaged").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        data = (root / "adapter" / name).read_bytes()
        (root / "damaged" / name).write_bytes(data[: len(data) // 2] if name.endswith("safetensors") else data)
    return {"root": root, "model": model, "input_ids": input_ids, "expected": expected}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def causal_output(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


# -------------------------------------------------------------------------------------------------- rank_report
def test_rank_report_counts_nonzero_lambda(saved: dict) -> None:
    from_dir = lra_peft.rank_report(saved["root"] / "adapter")
    from_model = lra_peft.rank_report(saved["model"])
    assert from_dir.ranks == from_model.ranks
    assert len(from_dir.layers) == 8 and from_dir.ranks[PRUNED] == R - 2
    assert all(rank == R for name, rank in from_dir.ranks.items() if name != PRUNED)
    assert from_dir.total_rank == 8 * R - 2 and from_dir.total_r == 8 * R
    layer = saved["model"].base_model.model.get_submodule("transformer.h.0.attn.c_attn")
    magnitudes = sorted(layer.lra_lambda["default"].detach().abs().tolist(), reverse=True)
    assert from_dir.layers["transformer.h.0.attn.c_attn"].lambda_abs == pytest.approx(magnitudes)
    assert from_dir.layers[PRUNED].lambda_abs[-2:] == [0.0, 0.0]
    assert from_dir.layers[PRUNED].layer_index == 1 and from_dir.layers[PRUNED].module == "mlp.c_fc"
    # A threshold counts small |λ| as pruned too.
    assert lra_peft.rank_report(saved["model"], tol=1e9).total_rank == 0


def test_rank_report_errors(saved: dict) -> None:
    with pytest.raises(ValueError, match="has no LRA layers"):
        lra_peft.rank_report(make_gpt2())
    with pytest.raises(ValueError, match="no LRA adapter 'other'.*'default'"):
        lra_peft.rank_report(saved["model"], adapter_name="other")
    with pytest.raises(ValueError, match="tol=-1"):
        lra_peft.rank_report(saved["model"], tol=-1)


# ------------------------------------------------------------------------------------------------------ inspect
def test_inspect_summarises_the_adapter(saved: dict, capsys) -> None:
    adapter = saved["root"] / "adapter"
    code, out, err = run_cli(capsys, "inspect", adapter)
    assert code == 0, err
    tensors = load_file(adapter / "adapter_model.safetensors")
    trainable = sum(t.numel() for k, t in tensors.items() if k.endswith(("lra_U", "lra_lambda", "lra_V")))
    assert "LRA  r=4  lra_alpha=4  init_weights='principal'" in out
    assert f"base model  {saved['root'] / 'base'}" in out
    assert "c_attn, c_fc, c_proj  (8 layers)" in out
    assert f"{trainable:,} parameters" in out
    size_kib = (adapter / "adapter_model.safetensors").stat().st_size / 1024
    assert f"{size_kib:.1f} KiB (adapter_model.safetensors)" in out
    assert f"total {8 * R - 2} of {8 * R} allocated" in out
    assert "|λ|" in out and "2 zero" in out
    assert any(line.startswith(PRUNED) and line.split()[2:4] == [str(R), str(R - 2)] for line in out.splitlines())


def test_inspect_plot_without_matplotlib_names_the_install_command(saved: dict, capsys, tmp_path: Path,
                                                                    monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    plot = tmp_path / "ranks.png"
    code, out, err = run_cli(capsys, "inspect", saved["root"] / "adapter", "--plot", plot)
    assert code == 1 and "needs matplotlib" in err and "pip install matplotlib" in err and len(err.splitlines()) == 1
    assert not plot.exists() and out == ""


def test_inspect_json_and_plot(saved: dict, capsys, tmp_path: Path) -> None:
    plot = tmp_path / "ranks.png"
    code, out, err = run_cli(capsys, "inspect", saved["root"] / "adapter", "--json", "--plot", plot)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["method"] == "LRA" and summary["task_type"] == "CAUSAL_LM" and summary["num_layers"] == 8
    assert summary["ranks"]["layers"][PRUNED]["rank"] == R - 2
    assert summary["lambda_abs"]["zeros"] == 2
    from matplotlib.image import imread

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(plot)
    assert image.shape[0] > 200 and image.shape[1] > 400


# ------------------------------------------------------------------------------------------ export, merge, compress
def test_export_lora_command(saved: dict, capsys, tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "export-lora", saved["root"] / "adapter", tmp_path / "lora")
    assert code == 0, err
    assert "wrote LoRA adapter" in out and "8 layers" in out
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved["root"] / "base"), tmp_path / "lora")
    assert rel_err(causal_output(model, saved["input_ids"]), saved["expected"]) <= 1e-5


@pytest.mark.parametrize("with_base", [True, False])
def test_merge_command(saved: dict, capsys, tmp_path: Path, with_base: bool) -> None:
    base = [saved["root"] / "base"] if with_base else []  # default: the config's base_model_name_or_path
    code, out, err = run_cli(capsys, "merge", *base, saved["root"] / "adapter", tmp_path / "merged")
    assert code == 0, err
    assert "wrote merged model" in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert rel_err(causal_output(merged, saved["input_ids"]), saved["expected"]) <= 1e-5


def test_compress_command(saved: dict, capsys, tmp_path: Path) -> None:
    out_dir = tmp_path / "small"
    code, out, err = run_cli(capsys, "compress", saved["root"] / "adapter", out_dir, "--r", "2")
    assert code == 0, err
    report = lra_peft.compress(saved["root"] / "adapter", tmp_path / "again", r=2)
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for name, error in report.errors.items():
        assert float(lines[name][-1]) == pytest.approx(error, rel=1e-3)
    assert float(lines["total"][-1]) == pytest.approx(report.total_error, rel=1e-3) and report.total_error > 0
    assert lines["transformer.h.0.attn.c_attn"][1:4] == [str(2 * R), "->", "2"]  # residual-free rank 2r -> 2
    assert lines[PRUNED][1:4] == [str(2 * R - 2), "->", "2"]
    assert "wrote rank-2 LRA adapter" in out
    assert lra_peft.rank_report(out_dir).total_r == 8 * 2
    # Independently of compress(): each layer's ΔW (residual-free, from the trained model) and the compressed one read
    # from the file. The latter has rank 2 and is the best rank-2 approximation (Eckart–Young), so its error is the
    # tail of ΔW's singular values, which is also what the CLI printed.
    compressed = load_file(out_dir / "adapter_model.safetensors")
    tail_total = norm_total = 0.0
    for name in report.errors:
        layer = saved["model"].base_model.model.get_submodule(name)
        s = layer.scaling["default"]
        delta = s * (layer.lra_U["default"] * layer.lra_lambda["default"]) @ layer.lra_V["default"].T \
            - s * (layer.lra_U0["default"] * layer.lra_lambda0["default"]) @ layer.lra_V0["default"].T
        key = f"base_model.model.{name}"
        small = s * (compressed[f"{key}.lra_U"] * compressed[f"{key}.lra_lambda"]) @ compressed[f"{key}.lra_V"].T
        sigma = torch.linalg.svdvals(delta.double().detach())
        optimal = (sigma[2:].norm() / sigma.norm()).item()
        assert optimal > 1e-2  # a real truncation
        assert rel_err(small.double(), delta.double().detach()) == pytest.approx(optimal, rel=1e-3)
        assert float(lines[name][-1]) == pytest.approx(optimal, rel=1e-3)
        assert torch.linalg.matrix_rank(small.double(), rtol=1e-6) <= 2
        tail_total, norm_total = tail_total + (sigma[2:] ** 2).sum().item(), norm_total + (sigma**2).sum().item()
    assert float(lines["total"][-1]) == pytest.approx((tail_total / norm_total) ** 0.5, rel=1e-3)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved["root"] / "base"), out_dir)
    assert rel_err(causal_output(model, saved["input_ids"]), saved["expected"]) < 0.5


def test_compress_to_a_rank_that_does_not_shrink_is_refused_or_said(saved: dict, capsys, tmp_path: Path) -> None:
    adapter = saved["root"] / "adapter"
    code, out, err = run_cli(capsys, "compress", adapter, tmp_path / "bigger", "--r", str(2 * R + 1))
    assert code == 1 and "does not compress this adapter" in err and f"below {2 * R}" in err, err
    assert not (tmp_path / "bigger").exists()
    code, out, err = run_cli(capsys, "compress", adapter, tmp_path / "same", "--r", str(2 * R))
    assert code == 0, err
    assert f"note: {2 * R} is this adapter's full rank, so nothing was dropped" in out
    assert float(out.split("relative error of ΔW over all layers: ")[1].split()[0]) < 1e-6


# ------------------------------------------------------------------------------------------- non-finite adapters
@pytest.fixture(scope="module")
def nan_adapter(saved: dict) -> Path:
    import shutil

    from safetensors.torch import save_file

    folder = saved["root"] / "nan_adapter"
    shutil.copytree(saved["root"] / "adapter", folder)
    state = load_file(folder / "adapter_model.safetensors")
    state[f"base_model.model.{PRUNED}.lra_lambda"][-1] = float("nan")
    save_file(state, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize("command", ["export-lora", "merge", "compress"])
def test_commands_refuse_a_non_finite_adapter_as_loading_does(saved: dict, nan_adapter: Path, capsys, tmp_path: Path,
                                                              command: str) -> None:
    with pytest.raises(ValueError, match=rf"holds NaN or Inf values in {PRUNED}\.lra_lambda") as loading:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved["root"] / "base"), nan_adapter)
    extra = ["--r", "2"] if command == "compress" else []
    code, out, err = run_cli(capsys, command, nan_adapter, tmp_path / "out", *extra)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lra-peft {command}: error: "), err
    assert str(nan_adapter / "adapter_model.safetensors") in lines[0]
    same = str(loading.value).split(" Nothing was")[0]  # the load's message, up to what was (not) done
    assert same in lines[0]
    assert not (tmp_path / "out").exists()


def test_inspect_warns_about_nan_and_refuses_a_nan_tolerance(saved: dict, nan_adapter: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "inspect", nan_adapter)
    assert code == 0
    assert "warning:" in err and f"{PRUNED}.lra_lambda" in err and "broken" in err
    lam = next(line for line in out.splitlines() if line.startswith("|λ|"))
    assert "1 NaN/Inf (broken)" in lam and "nan" not in lam.lower().replace("nan/inf", "")
    code, out, err = run_cli(capsys, "inspect", nan_adapter, "--json")
    summary = json.loads(out)
    assert summary["non_finite_factors"] == [f"{PRUNED}.lra_lambda"] and summary["lambda_abs"]["non_finite"] == 1
    assert summary["lambda_abs"]["zeros"] == 2  # the two pruned λ; the NaN is not counted as pruned
    for tol in ("nan", "-1", "inf"):
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", str(saved["root"] / "adapter"), "--tol", tol])
        assert exit_info.value.code == 2
        assert "is not a threshold" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tol=nan is invalid"):
        lra_peft.rank_report(saved["model"], tol=float("nan"))


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "{root}/missing"], "adapter folder '{root}/missing' does not exist"),
        (["inspect", "{root}/base"], "has no adapter_config.json"),
        (["export-lora", "{root}/lora", "{root}/out"], "holds a LORA adapter, not an LRA adapter"),
        (["inspect", "{root}/damaged"], "adapter_model.safetensors cannot be read as safetensors"),
        (["compress", "{root}/adapter", "{root}/out", "--r", "0"], "r=0 is invalid"),
        (["export-lora", "{root}/adapter", "{root}/adapter"], "is the adapter folder itself"),
        (["merge", "{root}/bert", "{root}/adapter", "{root}/out"],
         "has no module 'transformer.h.0.attn.c_attn', which the adapter adapts"),
        (["merge", "{root}/nowhere", "{root}/adapter", "{root}/out"], "base model folder '{root}/nowhere' does not"),
        (["merge", "{root}/wide_gpt2", "{root}/adapter", "{root}/out"],
         "module 'transformer.h.0.attn.c_attn' of base model '{root}/wide_gpt2' maps 48 -> 144 features but the "
         "adapter's factors are for 32 -> 96"),
    ],
)
def test_errors_are_one_line_and_a_nonzero_exit(saved: dict, capsys, argv: list[str], message: str) -> None:
    root = str(saved["root"])
    code, out, err = run_cli(capsys, *[a.format(root=root) for a in argv])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lra-peft {argv[0]}: error: "), err
    assert message.format(root=root) in lines[0]
    assert not (saved["root"] / "out").exists()


@pytest.mark.parametrize("command", ["inspect", "export-lora", "merge", "compress", "push"])
def test_every_command_has_help(capsys, command: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lra-peft {command}") and "ADAPTER_DIR" in out.upper()


def test_console_script_in_a_fresh_process(saved: dict) -> None:
    script = Path(sys.executable).parent / "lra-peft"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([str(script), "inspect", str(saved["root"] / "adapter")], capture_output=True, text=True,
                        timeout=120, env=env)
    assert ok.returncode == 0 and "8 layers" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "lra_peft.cli", "merge", str(saved["root"] / "bert"),
                          str(saved["root"] / "adapter"), str(saved["root"] / "out")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("lra-peft merge: error: base model")
