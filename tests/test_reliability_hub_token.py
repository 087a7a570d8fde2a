"""The Hub token never appears in a file written, an uploaded file, printed output, a log record or an exception, on
any push path: `lra_peft.push_to_hub`, `PeftModel.push_to_hub`, `lra-peft push` and the recipes' `--push_to_hub`.
Uploads are captured at `HfApi`; the Hub is never contacted."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from unittest import mock

import httpx2
import huggingface_hub
import pytest
from conftest import make_bert_seq_cls, require
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from peft import PeftModel, get_peft_model

import lra_peft
from lra_peft import LRAConfig
from lra_peft.cli import main as cli_main

TOKEN = "hf_FakeTokenForLeakTests0123456789abcdef"


class CapturingHub:
    """Records what HfApi would create and upload, reading every uploaded file at the time of the call."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.tokens: list = []
        self.fail: Exception | None = None

    def _seen(self, api: HfApi, kwargs: dict) -> None:
        self.tokens.append(kwargs.get("token") or api.token)

    def create_repo(self, api, repo_id, **kwargs):
        self._seen(api, kwargs)
        if self.fail is not None:
            raise self.fail
        return mock.Mock(repo_id=repo_id)

    def create_branch(self, api, repo_id, **kwargs):
        return None

    def create_commit(self, api, repo_id, operations, **kwargs):
        self._seen(api, kwargs)
        for op in operations:
            self.files[f"{repo_id}/{op.path_in_repo}"] = Path(op.path_or_fileobj).read_bytes()
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/1", pr_url=None)

    def upload_folder(self, api, repo_id, folder_path, **kwargs):
        self._seen(api, kwargs)
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                self.files[f"{repo_id}/{path.relative_to(folder_path)}"] = path.read_bytes()
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/1")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> CapturingHub:
    fake = CapturingHub()
    for name in ("create_repo", "create_branch", "create_commit", "upload_folder"):
        monkeypatch.setattr(HfApi, name, lambda api, *a, _n=name, **k: getattr(fake, _n)(api, *a, **k))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    return fake


def _assert_no_token(*, folders=(), texts=(), files: dict[str, bytes] | None = None, caplog=None) -> None:
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"
    for text in texts:
        assert TOKEN not in text
    for name, data in (files or {}).items():
        assert TOKEN.encode() not in data, f"token uploaded in {name}"
    if caplog is not None:
        assert TOKEN not in caplog.text
        assert all(TOKEN not in str(record.args) for record in caplog.records)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    model = get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps({"eval_accuracy": 0.5}))
    return folder


def test_library_and_cli_push_never_reveal_the_token(adapter_dir: Path, hub: CapturingHub, tmp_path: Path,
                                                     capfd: pytest.CaptureFixture, caplog) -> None:
    assert huggingface_hub.get_token() == TOKEN  # the token in play is the one from the environment
    lra_peft.push_to_hub(adapter_dir, "me/lib")
    model = PeftModel.from_pretrained(make_bert_seq_cls(), adapter_dir)
    model.push_to_hub("me/model")
    assert cli_main(["push", str(adapter_dir), "me/cli"]) == 0
    out, err = capfd.readouterr()
    assert {"me/lib/adapter_model.safetensors", "me/model/README.md", "me/cli/metrics.json"} <= set(hub.files)
    _assert_no_token(folders=[tmp_path], texts=[out, err], files=hub.files, caplog=caplog)


def test_failed_push_errors_do_not_reveal_the_token(adapter_dir: Path, hub: CapturingHub, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture, caplog) -> None:
    # A real 401 as huggingface_hub raises it: its request carries the token in a header, its message must not.
    url = "https://huggingface.co/api/repos/create"
    request = httpx2.Request("POST", url, headers={"authorization": f"Bearer {TOKEN}"})
    hub.fail = HfHubHTTPError(f"401 Client Error: Unauthorized for url: {url}\nInvalid credentials in Authorization "
                              "header", response=httpx2.Response(401, request=request))
    with pytest.raises(HfHubHTTPError) as info:
        lra_peft.push_to_hub(adapter_dir, "me/lib")
    assert cli_main(["push", str(adapter_dir), "me/cli"]) == 1
    out, err = capfd.readouterr()
    assert "401" in err
    _assert_no_token(folders=[tmp_path], texts=[out, err, str(info.value), repr(info.value)], caplog=caplog)


def test_recipe_push_never_writes_or_uploads_the_token(hub: CapturingHub, tmp_path: Path, caplog) -> None:
    # The token comes from the environment; it must reach neither metrics.json, the model card, the TensorBoard logs
    # nor the output.
    require("sklearn")
    from test_recipes import ENV, _tiny_bert, run_recipe, small, write_sst2

    model = _tiny_bert(tmp_path / "tiny-bert", dropout=0.0)
    out = tmp_path / "out"
    args = small(model, write_sst2(tmp_path / "sst2"), out, "--max_train_steps", "2", "--with_tracking",
                 "--push_to_hub", "--hub_model_id", "me/recipe")
    proc = run_recipe("sentiment.py", *args, env={**ENV, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN})
    # The upload happened, with no token handed around explicitly: huggingface_hub reads HF_TOKEN (or the login)
    # itself at request time...
    assert hub.tokens and all(token is None for token in hub.tokens)
    assert "me/recipe/adapter_model.safetensors" in hub.files and "me/recipe/metrics.json" in hub.files
    assert list(out.rglob("*tfevents*")), "TensorBoard logs were written"
    # ...and nowhere else.
    _assert_no_token(folders=[tmp_path], texts=[proc.stdout, proc.stderr], files=hub.files, caplog=caplog)


def test_recipe_refuses_a_token_on_the_command_line_without_echoing_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "sentiment.py"
    proc = subprocess.run([sys.executable, str(recipe), "--push_to_hub", "--hub_token", TOKEN,
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--hub_token is not accepted" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()
