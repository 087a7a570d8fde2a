"""`lra_peft.peft_hooks`: `import lra_peft` leaves PEFT's behaviour for other methods (here LoRA) byte for byte as it was.

The same script runs in two fresh interpreters, one that imports lra_peft first and one that never does, and every
patched entry point's output is compared: the saved files (safetensors and pickle), PeftModel.from_pretrained and
load_adapter, the Hub upload of push_to_hub, PeftConfig.from_pretrained, get/set_base_model_state_dict and
the LoRA converter's per-module function.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lra_peft.peft_hooks

PROBE = r'''
import hashlib, json, os, sys
from unittest import mock

if sys.argv[1] == "with":
    import lra_peft  # noqa: F401
import peft
import torch
from huggingface_hub import HfApi
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import conversion
from transformers import BertConfig, BertForSequenceClassification

os.chdir(sys.argv[2])  # relative paths only: nothing in the outputs may depend on where the run happened
out = {}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode() + str(state[key].dtype).encode() + state[key].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def files(folder: str) -> dict:
    return {os.path.relpath(os.path.join(d, f), folder): digest(open(os.path.join(d, f), "rb").read())
            for d, _, names in os.walk(folder) for f in names}


def record(name, fn):
    try:
        out[name] = fn()
    except Exception as exc:  # the same error on both sides is the same behaviour
        out[name] = f"error {type(exc).__name__}: {exc}"


def base():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=37,
                                                    max_position_embeddings=32, num_labels=3))


inputs = {"input_ids": torch.tensor([[1, 5, 9, 3, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
torch.manual_seed(1)
model = get_peft_model(base(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                          init_lora_weights=False))
model.eval()
record("save", lambda: (model.save_pretrained("a"), files("a"))[1])
record("save_bin", lambda: (model.save_pretrained("b", safe_serialization=False), files("b"))[1])


def load(folder):
    loaded = PeftModel.from_pretrained(base(), folder).eval()
    with torch.no_grad():
        return tensors({"logits": loaded(**inputs).logits, **get_peft_model_state_dict(loaded)})


record("from_pretrained", lambda: load("a"))
record("from_pretrained_bin", lambda: load("b"))


def load_adapter():
    loaded = PeftModel.from_pretrained(base(), "a")
    loaded.load_adapter("b", adapter_name="second")
    loaded.set_adapter("second")
    with torch.no_grad():
        return tensors({"logits": loaded.eval()(**inputs).logits,
                        **get_peft_model_state_dict(loaded, adapter_name="second")})


record("load_adapter", load_adapter)
record("config", lambda: PeftConfig.from_pretrained("a").to_dict())
record("config_lora", lambda: LoraConfig.from_pretrained("a").to_dict())
record("base_state_dict", lambda: tensors(peft.get_base_model_state_dict(model)))
record("set_base_state_dict", lambda: str(peft.set_base_model_state_dict(model, peft.get_base_model_state_dict(model))))
query = model.base_model.model.bert.encoder.layer[0].attention.self.query
record("convert_module", lambda: [tensors({"t": t}) if isinstance(t, torch.Tensor) else t
                                  for t in conversion._convert_module_to_lora(query, 2, "default")])

pushed = []


def create_commit(api, repo_id, operations, **kwargs):
    pushed.append({op.path_in_repo: digest(open(op.path_or_fileobj, "rb").read()) if isinstance(
        op.path_or_fileobj, str) else digest(bytes(op.path_or_fileobj)) for op in operations})
    pushed.append({k: v for k, v in kwargs.items() if k != "token"})
    return mock.Mock(commit_url="https://huggingface.co/me/x/commit/1", pr_url=None)


with mock.patch.object(HfApi, "create_repo", lambda api, repo_id, **k: mock.Mock(repo_id=repo_id)), \
        mock.patch.object(HfApi, "create_branch", lambda api, *a, **k: None), \
        mock.patch.object(HfApi, "create_commit", create_commit):
    record("push", lambda: (model.push_to_hub("me/x", commit_message="m"), pushed)[1])
print("PROBE " + json.dumps(out, sort_keys=True, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
'''


def _run(mode: str, folder: Path) -> subprocess.Popen:
    folder.mkdir()
    # One hash seed for both: PEFT writes sets (target_modules) in iteration order, which the seed decides.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": str(Path(lra_peft.peft_hooks.__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-c", PROBE, mode, str(folder)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=1800)
    assert process.returncode == 0, stderr[-3000:]
    line = next(line for line in stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


def test_lora_behaves_byte_for_byte_as_without_lra_peft(tmp_path: Path) -> None:
    runs = {mode: _run(mode, tmp_path / mode) for mode in ("with", "without")}  # in parallel: imports are slow
    with_lra, without = _result(runs["with"]), _result(runs["without"])
    assert set(with_lra) == set(without)
    for step in without:
        assert not str(without[step]).startswith("error"), (step, without[step])  # the probe itself works
        assert with_lra[step] == without[step], f"import lra_peft changed LoRA's {step}: {with_lra[step]} != {without[step]}"
    # the comparison covers real outputs: saved files including the card and config, and the upload payload
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(without["save"])
    assert "adapter_model.bin" in without["save_bin"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(without["push"][0])
