"""Deploying LRA adapters: LoRA export loaded by stock PEFT, merged export loaded by plain Transformers, compress."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_bert_seq_cls, make_gpt2, rel_err, tiny_bert_config
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, ViTConfig, ViTModel

import lra_peft
from lra_peft import LRAConfig

R = 4

# Runs in a fresh interpreter that never imports lra_peft: stock PEFT must load the LoRA exports by itself, and
# plain Transformers the merged exports.
STOCK_LOADER = textwrap.dedent(
    """
    import json, sys, torch
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    classes = {"seq": AutoModelForSequenceClassification, "causal": AutoModelForCausalLM, "plain": AutoModel}
    cases = json.load(open(sys.argv[1]))
    results = {}
    for name, case in cases.items():
        cls = classes[case["cls"]]
        ref = torch.load(case["ref"])
        def run(model):
            with torch.no_grad():
                out = model.eval()(**ref["inputs"])
            out = out.logits if hasattr(out, "logits") else out.last_hidden_state
            return ((out - ref["expected"]).norm() / ref["expected"].norm()).item()
        model = PeftModel.from_pretrained(cls.from_pretrained(case["base"]), case["lora"])
        results[name] = {"lora": run(model), "config": type(model.peft_config["default"]).__name__}
        if case.get("merged"):
            results[name]["merged"] = run(cls.from_pretrained(case["merged"]))
    results["lra_peft_imported"] = "lra_peft" in sys.modules
    print(json.dumps(results))
    """
)


def train_like(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Move every trainable parameter, as training would, so that each adapter (and head) matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=gen))


def make_vit() -> ViTModel:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=4, num_channels=3, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return ViTModel(config).eval()


CASES = {
    # name: (base factory, loader class, LRAConfig kwargs, export from the live model?, merged export?)
    "bert_true": (make_bert_seq_cls, "seq", dict(target_modules=["query", "value"], task_type="SEQ_CLS"), False, False),
    "bert_principal": (make_bert_seq_cls, "seq", dict(target_modules=["query", "value", "word_embeddings"],
                                                      task_type="SEQ_CLS", init_weights="principal"), False, True),
    "gpt2_true": (make_gpt2, "causal", dict(target_modules=["c_attn", "c_fc", "wte"], task_type="CAUSAL_LM"), True,
                  True),
    "gpt2_principal": (make_gpt2, "causal", dict(target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM",
                                                 init_weights="principal"), False, False),
    "vit_conv2d": (make_vit, "plain", dict(target_modules=["projection", "query"], init_weights="principal"), False,
                   True),
}
LOAD_CLASSES = {"seq": AutoModelForSequenceClassification, "causal": AutoModelForCausalLM, "plain": AutoModel}


def _inputs(kind: str) -> dict:
    gen = torch.Generator().manual_seed(3)
    if kind == "plain":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    return {"input_ids": torch.randint(1, VOCAB, (3, 9), generator=gen)}


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """Saved base models, trained-like LRA adapters, their LoRA and merged exports, and reference outputs."""
    root = tmp_path_factory.mktemp("zoo")
    built = {}
    for seed, (name, (factory, kind, kwargs, from_model, merged)) in enumerate(CASES.items()):
        folder = root / name
        factory().save_pretrained(folder / "base")
        base = LOAD_CLASSES[kind].from_pretrained(folder / "base")
        model = get_peft_model(base, LRAConfig(r=R, **kwargs))
        train_like(model, seed)
        inputs = _inputs(kind)
        expected = _output(model, inputs)
        model.save_pretrained(folder / "adapter")
        torch.save({"inputs": inputs, "expected": expected}, folder / "ref.pt")
        lra_peft.export_lora(model if from_model else folder / "adapter", folder / "lora")
        case = {"cls": kind, "base": str(folder / "base"), "lora": str(folder / "lora"), "ref": str(folder / "ref.pt")}
        if merged:
            lra_peft.export_merged(model if from_model else folder / "adapter", folder / "merged")
            case["merged"] = str(folder / "merged")
        built[name] = {"case": case, "model": model, "inputs": inputs, "expected": expected, "dir": folder}
    return built


@pytest.fixture(scope="module")
def stock_results(zoo, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("stock")
    (folder / "cases.json").write_text(json.dumps({name: item["case"] for name, item in zoo.items()}))
    (folder / "load.py").write_text(STOCK_LOADER)
    proc = subprocess.run([sys.executable, str(folder / "load.py"), str(folder / "cases.json")],
                          capture_output=True, text=True, timeout=300, env={**_env(), "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_stock_process_never_imported_lra_peft(stock_results: dict) -> None:
    assert stock_results["lra_peft_imported"] is False


@pytest.mark.parametrize("name", list(CASES))
def test_lora_export_reproduces_lra_model_in_stock_peft(stock_results: dict, name: str) -> None:
    assert stock_results[name]["config"] == "LoraConfig"
    assert stock_results[name]["lora"] <= 1e-5


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case[4]])
def test_merged_export_reproduces_lra_model_in_plain_transformers(stock_results: dict, name: str) -> None:
    assert stock_results[name]["merged"] <= 1e-5


def test_lora_export_files_and_config(zoo: dict) -> None:
    folder = zoo["gpt2_principal"]["dir"] / "lora"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    # Residual-free form of a principal adapter: [U | U0] and [V | V0], rank 2r, LoRA scale 1.
    assert config["r"] == 2 * R and config["lora_alpha"] == 2 * R
    assert config["base_model_name_or_path"] == str(zoo["gpt2_principal"]["dir"] / "base")
    assert set(config["target_modules"]) == {f"transformer.h.{i}.{m}" for i in (0, 1)
                                             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}
    tensors = load_file(folder / "adapter_model.safetensors")
    assert not any("lra_" in key for key in tensors)
    # GPT-2 Conv1D c_attn: 32 -> 96 features, LoRA A is r × in and B is out × r.
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2 * R, 32)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 2 * R)
    # The SEQ_CLS head trained alongside travels unchanged.
    bert = load_file(zoo["bert_true"]["dir"] / "lora" / "adapter_model.safetensors")
    saved = load_file(zoo["bert_true"]["dir"] / "adapter" / "adapter_model.safetensors")
    assert torch.equal(bert["base_model.model.classifier.weight"], saved["base_model.model.classifier.weight"])


def test_export_from_model_equals_export_from_folder(zoo: dict, tmp_path: Path) -> None:
    item = zoo["gpt2_true"]
    lra_peft.export_lora(item["dir"] / "adapter", tmp_path / "from_dir")
    from_model = load_file(item["dir"] / "lora" / "adapter_model.safetensors")
    from_dir = load_file(tmp_path / "from_dir" / "adapter_model.safetensors")
    assert from_model.keys() == from_dir.keys()
    for key in from_model:
        torch.testing.assert_close(from_model[key], from_dir[key], rtol=0, atol=1e-7)
    # GPT-2's tied wte is an Embedding: LoRA keeps raw embedding parameters for it.
    assert "base_model.model.transformer.wte.lora_embedding_A" in from_dir


def test_pruned_lambda_entries_are_dropped_exactly(tmp_path: Path) -> None:
    base = make_bert_seq_cls()
    model = get_peft_model(base, LRAConfig(r=R, target_modules=["query", "value"], task_type="SEQ_CLS"))
    train_like(model, seed=5)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.lra_lambda["default"][1:3] = 0.0  # as adaptive rank pruning leaves it
    inputs = _inputs("seq")
    expected = _output(model, inputs)
    lra_peft.export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == R and config["rank_pattern"] == {"bert.encoder.layer.0.attention.self.query": R - 2}
    # Stock PEFT LoRA: the class does not depend on lra_peft being imported.
    loaded = PeftModel.from_pretrained(make_bert_seq_cls(), tmp_path / "lora")
    assert type(loaded.peft_config["default"]).__name__ == "LoraConfig"
    assert rel_err(_output(loaded, inputs), expected) <= 1e-5


def test_export_merged_leaves_the_model_untouched(zoo: dict, tmp_path: Path) -> None:
    item = zoo["bert_principal"]
    model = item["model"]
    lra_peft.export_merged(model, tmp_path / "merged")
    assert rel_err(_output(model, item["inputs"]), item["expected"]) <= 1e-6
    assert any(isinstance(m, lra_peft.LRALayer) for m in model.modules())
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert rel_err(_output(merged, item["inputs"]), item["expected"]) <= 1e-5
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_export_merged_copies_the_tokenizer_saved_with_the_base(zoo: dict, tmp_path: Path) -> None:
    from transformers import BertTokenizerFast

    base_dir = tmp_path / "base"
    shutil.copytree(zoo["bert_true"]["dir"] / "base", base_dir)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(base_dir)
    lra_peft.export_merged(zoo["bert_true"]["dir"] / "adapter", tmp_path / "merged", base=base_dir)
    from transformers import AutoTokenizer

    ours, reference = AutoTokenizer.from_pretrained(tmp_path / "merged"), AutoTokenizer.from_pretrained(base_dir)
    assert ours.get_vocab() == reference.get_vocab()
    assert ours("hello world")["input_ids"] == reference("hello world")["input_ids"]


def test_exports_save_any_tokenizer_saved_with_the_adapter(zoo: dict, tmp_path: Path) -> None:
    """A tokenizer whose files no fixed list names (PhoBERT's bpe.codes) still travels with the exports."""
    from transformers import AutoTokenizer, PhobertTokenizer

    adapter = tmp_path / "adapter"
    shutil.copytree(zoo["bert_true"]["dir"] / "adapter", adapter)
    (tmp_path / "vocab.txt").write_text("x@@ 5\ni@@ 5\nn 5\nxi@@ 5\nxin 5\nb@@ 3\nạ@@ 3\nbạ@@ 3\nbạn 3\n")
    (tmp_path / "codes").write_text("x i 5\nxi n</w> 5\nb ạ 3\nbạ n</w> 3\n")
    PhobertTokenizer(vocab_file=str(tmp_path / "vocab.txt"), merges_file=str(tmp_path / "codes")).save_pretrained(
        adapter)
    assert (adapter / "bpe.codes").is_file()
    reference = AutoTokenizer.from_pretrained(adapter)("xin bạn")["input_ids"]
    lra_peft.export_lora(adapter, tmp_path / "lora")
    lra_peft.compress(adapter, tmp_path / "small", r=1)
    for out in ("lora", "small"):
        assert AutoTokenizer.from_pretrained(tmp_path / out)("xin bạn")["input_ids"] == reference


def test_dilated_conv2d_cannot_be_a_lora_layer(tmp_path: Path) -> None:
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 8, kernel_size=3, dilation=2))
    model.add_module("head", nn.Linear(8, 4))
    peft_model = get_peft_model(model, LRAConfig(r=2, target_modules=["conv", "head"], init_weights=False))
    with pytest.raises(ValueError, match=r"'conv' is a Conv2d with dilation=\(2, 2\)"):
        lra_peft.export_lora(peft_model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()  # nothing half-written


def test_clear_errors_for_bad_inputs(zoo: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lra_peft.export_lora(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="holds a LORA adapter, not an LRA adapter"):
        lra_peft.export_lora(zoo["bert_true"]["dir"] / "lora", tmp_path / "out")
    with pytest.raises(ValueError, match="is the adapter folder itself"):
        lra_peft.export_lora(zoo["bert_true"]["dir"] / "adapter", zoo["bert_true"]["dir"] / "adapter")
    wider = tmp_path / "wider_bert"
    AutoModelForSequenceClassification.from_config(tiny_bert_config(hidden_size=48)).save_pretrained(wider)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self\.query.*48 -> 48.*32 -> 32"):
        lra_peft.export_merged(zoo["bert_true"]["dir"] / "adapter", tmp_path / "out", base=wider)
    with pytest.raises(ValueError, match="is a 'bert' model, but the adapter was trained on a ViTModel"):
        lra_peft.export_merged(zoo["vit_conv2d"]["dir"] / "adapter", tmp_path / "out", base=wider)
    assert not (tmp_path / "out").exists()


def test_unknown_base_config_warns_and_writes_linear_layers(zoo: dict, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(zoo["gpt2_principal"]["dir"] / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="could not read the config of base model"):
        lra_peft.export_lora(adapter, tmp_path / "lora")
    # Linear/Conv1D layers need no base config: the export is the same.
    ours = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    reference = load_file(zoo["gpt2_principal"]["dir"] / "lora" / "adapter_model.safetensors")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


# ------------------------------------------------------------------------------------------------ compress
def _delta_matrices(base_dir: Path, merged_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """ΔW of each adapted module (out × in), measured as merged weight − original weight."""
    original = load_file(base_dir / "model.safetensors")
    merged = load_file(merged_dir / "model.safetensors")
    deltas = {}
    for name in names:
        delta = (merged[f"{name}.weight"] - original[f"{name}.weight"]).double()
        deltas[name] = delta.T if name.split(".")[-1] in ("c_attn", "c_proj", "c_fc") else delta  # Conv1D: in × out
    return deltas


def _merge(base_dir: Path, adapter_dir: Path, out: Path) -> Path:
    lra_peft.export_merged(adapter_dir, out, base=base_dir)
    return out


@pytest.mark.parametrize("name, full_rank", [("gpt2_principal", 2 * R), ("bert_true", R)])
def test_compress_to_full_rank_is_lossless(zoo: dict, tmp_path: Path, name: str, full_rank: int) -> None:
    item = zoo[name]
    report = lra_peft.compress(item["dir"] / "adapter", tmp_path / "compressed", r=full_rank)
    assert report.total_error <= 1e-6 and max(report.errors.values()) <= 1e-6
    config = json.loads((tmp_path / "compressed" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LRA" and config["init_weights"] is True and config["r"] == full_rank
    assert not any(k.endswith(("lra_U0", "lra_lambda0", "lra_V0"))
                   for k in load_file(tmp_path / "compressed" / "adapter_model.safetensors"))
    base = LOAD_CLASSES[item["case"]["cls"]].from_pretrained(item["dir"] / "base")
    loaded = PeftModel.from_pretrained(base, tmp_path / "compressed")
    assert rel_err(_output(loaded, item["inputs"]), item["expected"]) <= 1e-5


def test_compress_to_lower_rank_meets_the_eckart_young_bound(zoo: dict, tmp_path: Path) -> None:
    item, k = zoo["gpt2_principal"], 3
    adapter, base_dir = item["dir"] / "adapter", item["dir"] / "base"
    report = lra_peft.compress(adapter, tmp_path / "compressed", r=k)
    names = sorted(report.errors)
    learned = _delta_matrices(base_dir, _merge(base_dir, adapter, tmp_path / "m_full"), names)
    compressed = _delta_matrices(base_dir, _merge(base_dir, tmp_path / "compressed", tmp_path / "m_k"), names)
    tail_total = norm_total = 0.0
    for name in names:
        sigma = torch.linalg.svdvals(learned[name])
        optimal = (sigma[k:].norm() / sigma.norm()).item()  # the best any rank-k matrix can do
        achieved = ((learned[name] - compressed[name]).norm() / learned[name].norm()).item()
        assert optimal > 1e-3  # a real truncation, not a lossless case
        assert report.errors[name] == pytest.approx(optimal, rel=1e-3)
        assert achieved == pytest.approx(optimal, rel=1e-3)
        assert torch.linalg.matrix_rank(compressed[name], rtol=1e-6) <= k
        tail_total += (sigma[k:] ** 2).sum().item()
        norm_total += (sigma**2).sum().item()
    assert report.total_error == pytest.approx((tail_total / norm_total) ** 0.5, rel=1e-3)
    size = (tmp_path / "compressed" / "adapter_model.safetensors").stat().st_size
    assert size < (adapter / "adapter_model.safetensors").stat().st_size


def test_compress_rejects_a_bad_rank(zoo: dict, tmp_path: Path) -> None:
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="use a positive integer rank"):
            lra_peft.compress(zoo["bert_true"]["dir"] / "adapter", tmp_path / "out", r=bad)


def test_adaptive_rank_adapter_exports_and_compresses_exactly(tmp_path: Path) -> None:
    config = LRAConfig(r=4, target_r=2, total_step=12, init_warmup=2, final_warmup=3, mask_interval=1,
                       init_weights="principal", target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(make_bert_seq_cls(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    inputs, labels = _inputs("seq")["input_ids"], torch.tensor([0, 1, 2])
    model.train()
    for step in range(1, 13):
        model(input_ids=inputs, labels=labels).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    expected = _output(model, {"input_ids": inputs})
    model.save_pretrained(tmp_path / "cut")  # U, λ, V cut to the allocated ranks, rank_pattern written
    ranks = model.allocated_ranks()
    assert lra_peft.rank_report(tmp_path / "cut").ranks == ranks and sum(ranks.values()) == 2 * len(ranks)

    with pytest.warns(UserWarning, match="records no base model"):  # built from a config: no base to read
        lra_peft.export_lora(tmp_path / "cut", tmp_path / "lora")
    lora = PeftModel.from_pretrained(make_bert_seq_cls(), tmp_path / "lora")
    assert rel_err(_output(lora, {"input_ids": inputs}), expected) <= 1e-5
    full_rank = max(ranks.values()) + 4  # the largest allocated rank + ΔW₀'s rank
    report = lra_peft.compress(tmp_path / "cut", tmp_path / "compressed", r=full_rank)
    assert report.total_error <= 1e-6
    compressed = PeftModel.from_pretrained(make_bert_seq_cls(), tmp_path / "compressed")
    assert rel_err(_output(compressed, {"input_ids": inputs}), expected) <= 1e-5


def test_merged_classifier_takes_the_adapters_head_and_labels(tmp_path: Path) -> None:
    make_bert_seq_cls(num_labels=2).save_pretrained(tmp_path / "base")  # a base with another head, as MiniLM has none
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=5,
                                                              ignore_mismatched_sizes=True)
    model = get_peft_model(base, LRAConfig(r=R, target_modules=["query", "value"], task_type="SEQ_CLS"))
    train_like(model, seed=7)
    inputs = _inputs("seq")
    expected = _output(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    labels = ["card", "cash", "atm", "fee", "other"]
    (tmp_path / "adapter" / "labels.json").write_text(json.dumps(labels))  # as the recipes write it
    lra_peft.export_merged(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.num_labels == 5 and merged.config.id2label == dict(enumerate(labels))
    assert rel_err(_output(merged, inputs), expected) <= 1e-5
