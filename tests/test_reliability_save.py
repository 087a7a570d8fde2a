"""`PeftModel.save_pretrained` of LRA models is atomic: a crash in the middle of a write leaves the previous adapter
loadable (or, for a new folder, no adapter at all), never a partial file that later loads."""

from __future__ import annotations

import json
from pathlib import Path

import peft.peft_model
import pytest
import torch
from conftest import make_bert_seq_cls, rel_err
from peft import LoraConfig, PeftModel, get_peft_model

from lra_peft import LRAConfig

TARGETS = ["query", "value"]


class SimulatedCrash(Exception):
    pass


def _model(seed: int) -> PeftModel:
    model = get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=TARGETS, task_type="SEQ_CLS"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lra_" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return model.eval()


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _crash_in_the_middle_of_writing_weights(monkeypatch: pytest.MonkeyPatch, check=None) -> list[str]:
    """Make PEFT's safetensors write stop half-way (half the bytes on disk), as a kill or a full disk would."""
    real_save = peft.peft_model.safe_save_file
    written = []

    def half_then_crash(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        written.append(filename)
        if check is not None:
            check()  # the state a SIGKILL right now would leave
        raise SimulatedCrash("killed while writing")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_then_crash)
    return written


def test_crash_while_overwriting_leaves_the_previous_adapter_loadable(tmp_path: Path, input_ids: torch.Tensor,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "adapter"
    old = _model(seed=1)
    old.save_pretrained(out)
    expected = _logits(old, input_ids)
    before = _files(out)

    def previous_adapter_intact() -> None:
        assert _files(out) == before
        loaded = PeftModel.from_pretrained(make_bert_seq_cls(), out)
        assert rel_err(_logits(loaded, input_ids), expected) <= 1e-6

    written = _crash_in_the_middle_of_writing_weights(monkeypatch, previous_adapter_intact)
    with pytest.raises(SimulatedCrash):
        _model(seed=2).save_pretrained(out)
    assert written and not Path(written[0]).is_relative_to(out), "PEFT wrote into the target folder in place"
    previous_adapter_intact()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "temporary folder left behind"


def test_crash_during_a_first_save_leaves_no_adapter_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "new" / "adapter"

    def nothing_visible() -> None:
        assert not out.exists()

    _crash_in_the_middle_of_writing_weights(monkeypatch, nothing_visible)
    with pytest.raises(SimulatedCrash):
        _model(seed=1).save_pretrained(out)
    assert not out.exists()
    with pytest.raises((FileNotFoundError, ValueError)):
        PeftModel.from_pretrained(make_bert_seq_cls(), out)


def test_resave_replaces_the_adapter_and_keeps_other_files(tmp_path: Path, input_ids: torch.Tensor) -> None:
    out = tmp_path / "adapter"
    _model(seed=1).save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps({"eval_accuracy": 0.5}))
    readme = (out / "README.md").read_text()
    (out / "README.md").write_text(readme + "\n## Notes by the user\n\nkeep me\n")
    new = _model(seed=2)
    new.save_pretrained(out)
    assert json.loads((out / "metrics.json").read_text()) == {"eval_accuracy": 0.5}
    assert "keep me" in (out / "README.md").read_text()
    loaded = PeftModel.from_pretrained(make_bert_seq_cls(), out)
    assert rel_err(_logits(loaded, input_ids), _logits(new, input_ids)) <= 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_several_adapters_and_relative_paths_save_atomically(tmp_path: Path, input_ids: torch.Tensor,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(seed=1)
    model.add_adapter("second", LRAConfig(r=2, target_modules=TARGETS, init_weights=False))
    monkeypatch.chdir(tmp_path)
    model.save_pretrained(".")  # the current folder: the temporary one must still sit next to it, not inside
    model.save_pretrained("adapters")
    for folder in (tmp_path, tmp_path / "adapters"):
        assert (folder / "adapter_config.json").is_file() and (folder / "second" / "adapter_config.json").is_file()
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.tmp")]
    loaded = PeftModel.from_pretrained(make_bert_seq_cls(), tmp_path / "adapters")
    loaded.load_adapter(tmp_path / "adapters" / "second", adapter_name="second")
    for name in ("default", "second"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        assert rel_err(_logits(loaded, input_ids), _logits(model, input_ids)) <= 1e-6


def test_non_main_process_writes_nothing(tmp_path: Path) -> None:
    _model(seed=1).save_pretrained(tmp_path / "adapter", is_main_process=False)
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_other_peft_methods_keep_peft_behaviour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = _crash_in_the_middle_of_writing_weights(monkeypatch)
    lora = get_peft_model(make_bert_seq_cls(), LoraConfig(r=2, target_modules=TARGETS))
    with pytest.raises(SimulatedCrash):
        lora.save_pretrained(tmp_path / "lora")
    assert Path(written[0]).parent == tmp_path / "lora"  # PEFT's own in-place write: lra-peft leaves LoRA alone


def test_pickle_save_warns_and_is_then_refused_without_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lra_peft import AdapterFileError

    monkeypatch.delenv("LRA_PEFT_ALLOW_BIN", raising=False)
    with pytest.warns(UserWarning, match="LRA_PEFT_ALLOW_BIN"):
        _model(seed=1).save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    with pytest.raises(AdapterFileError, match="pickle"):
        PeftModel.from_pretrained(make_bert_seq_cls(), tmp_path / "bin")


def test_saved_adapter_files_get_ordinary_permissions(tmp_path) -> None:
    """Atomic writes go through temporary names; the published folder and files must not stay private (0700/0600)."""
    import os
    import stat

    from conftest import make_mlp
    from peft import get_peft_model

    from lra_peft import LRAConfig
    from lra_peft._io import atomic_write_bytes

    old = os.umask(0o022)
    try:
        model = get_peft_model(make_mlp(), LRAConfig(r=2, target_modules=["lin0"]))
        model.save_pretrained(tmp_path / "adapter")
        atomic_write_bytes(tmp_path / "card.md", b"hello")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "card.md").stat().st_mode) == 0o644


# ------------------------------------------------------------------------------- errors name the user's path
def _deny(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Make one step of an atomic save fail as an unwritable folder would (the tests run as root: chmod cannot)."""
    import os
    import tempfile

    if where == "create":  # the hidden temporary folder next to the output
        def mkdtemp(suffix=None, prefix=None, dir=None):
            raise PermissionError(13, "Permission denied", os.path.join(dir, f"{prefix}abc123"))

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    elif where == "write":  # a file inside it (PEFT's safetensors write)
        def save(tensors, filename, metadata=None):
            raise PermissionError(13, "Permission denied", filename)

        monkeypatch.setattr(peft.peft_model, "safe_save_file", save)
    else:  # the renames that publish it
        real_replace = os.replace

        def replace(src, dst):
            if ".tmp-" in os.fspath(src):
                raise PermissionError(13, "Permission denied", os.fspath(src), os.fspath(dst))
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("where", ["create", "write", "rename"])
def test_unwritable_output_errors_name_the_users_path_not_the_temporary_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    model = _model(0)
    out = tmp_path / "lraout"
    _deny(monkeypatch, where)
    with pytest.raises(PermissionError) as info:
        model.save_pretrained(out)
    message = str(info.value)
    assert str(out) in message and "Permission denied" in message
    assert ".tmp" not in message
    assert not (out / "adapter_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_cli_and_file_writes_name_the_users_path_not_the_temporary_one(tmp_path: Path, capsys,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import safetensors.torch
    from safetensors import SafetensorError

    from lra_peft._io import atomic_write_bytes
    from lra_peft.cli import main

    _model(0).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "lora"

    def save_file(tensors, filename, metadata=None):  # safetensors' own wording for an unwritable folder
        raise SafetensorError(f'Error while serializing: I/O error: Permission denied (os error 13) at path '
                              f'"{filename}"')

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert main(["export-lora", str(tmp_path / "adapter"), str(out)]) == 1
    err = capsys.readouterr().err
    assert f'"{out}/adapter_model.safetensors"' in err and ".tmp" not in err, err
    assert not out.exists()

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", os.fspath(src), os.fspath(dst))))
    with pytest.raises(PermissionError) as info:
        atomic_write_bytes(tmp_path / "card.md", b"hello")
    monkeypatch.setattr(os, "replace", real_replace)
    assert str(info.value) == f"[Errno 13] Permission denied: '{tmp_path / 'card.md'}'"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name or p.name == "card.md"]
