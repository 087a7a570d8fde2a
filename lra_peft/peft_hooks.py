"""Every change lra-peft makes to PEFT's own code, in one place. `import lra_peft` calls `install()` (idempotent).

LRA plugs into PEFT through PEFT's registries and `BaseTuner` hooks (`LRAModel`); what follows has no such hook, so
PEFT's function is wrapped. Each wrapper hands anything that is not LRA to PEFT's original untouched (only the first
also changes an error of other methods), and passes state explicitly (arguments, contextvars, `hub`'s record of
saved folders), never through attributes of PEFT's objects.

| patched attribute | for LRA adapters / models | why PEFT needs patching |
|---|---|---|
| `peft.config.PeftConfigMixin.from_json_file` | every method: a malformed adapter_config.json raises `AdapterFileError` naming the file (a `ValueError`, as json's error); valid files load as before | PEFT reads the file before any method-specific code runs |
| `peft.utils.save_and_load.torch_load` | while an LRA adapter loads, a pickle `adapter_model.bin` is refused unless `LRA_PEFT_ALLOW_BIN=1`, then read with `weights_only=True` | PEFT reads the weights before the tuner sees them |
| `PeftModel.from_pretrained`, `PeftModel.load_adapter` | file checks before the model is touched, the checkpoint's shapes for `LRAModel`, and the model put back as it was if loading fails (`safety.guard_lra_load`) | the tuner is built inside these, after PEFT has changed the model |
| `PeftModel.save_pretrained` | written into a hidden folder beside the target and published by renames (`_io.atomic_output_dir`) | PEFT writes in place |
| `PeftModel.create_or_update_model_card` | an LRA model card (`hub.update_model_card`) | no tuner hook for the card |
| `PeftModel.push_to_hub` | upload with the LRA card and a base model named by Hub id (`hub.push_model`) | as above |
| `peft.tuners.lora.conversion._convert_module_to_lora` | `peft.convert_to_lora` / `save_as_lora` convert LRA layers exactly (`conversion.lra_to_lora`) | PEFT's converter truncates `get_delta_weight`, relative to the residual base |
| `get_base_model_state_dict`, `set_base_model_state_dict` (in `peft`, `peft.utils`, `peft.utils.save_and_load`) | the original weight W, not the residual W − ΔW₀ of a principal/minor adapter (`model.init_deltas`) | these read the base model's state dict directly |
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import shutil
import warnings
from pathlib import Path
from typing import Any

import peft
import peft.utils
import peft.utils.save_and_load as save_and_load
import torch
from peft import PeftConfig, PeftModel
from peft.tuners.lora import conversion as lora_conversion
from torch import nn

from . import hub, safety
from ._io import atomic_output_dir
from .conversion import lra_to_lora
from .format import WEIGHTS_NAME
from .layer import LRALayer
from .model import init_deltas

_MARK = "_lra_peft_hook"  # set on each wrapper, so that a second install() finds them in place
# True while PeftModel.push_to_hub saves into its upload folder: that folder is not where the model "was saved".
_PUSHING: contextvars.ContextVar[bool] = contextvars.ContextVar("lra_peft_pushing", default=False)

HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token")


def _marked(wrapper: Any, original: Any) -> Any:
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, _MARK, True)
    return wrapper


# --------------------------------------------------------------------------------------------------- configs
def _patch_config_reading() -> None:
    # Patched where PEFT defines it (PeftConfigMixin), so every config class and PeftConfig itself see it.
    owner = next(c for c in PeftConfig.__mro__ if "from_json_file" in c.__dict__)
    original = owner.__dict__["from_json_file"].__func__

    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict:
        safety.read_config_file(path_json_file)  # a clear error for a malformed file; PEFT's own checks follow
        return original(cls, path_json_file, **kwargs)

    owner.from_json_file = classmethod(_marked(from_json_file, original))


# --------------------------------------------------------------------------------------------------- loading
def _patch_loading() -> None:
    original_torch_load = save_and_load.torch_load

    def torch_load(*args: Any, **kwargs: Any) -> Any:
        if safety.loading_lra_adapter():
            if not safety.bin_allowed():
                raise safety.bin_refused(args[0] if args else kwargs.get("f", WEIGHTS_NAME))
            kwargs["weights_only"] = True
        return original_torch_load(*args, **kwargs)

    original_from_pretrained = PeftModel.from_pretrained.__func__
    from_pretrained_sig = inspect.signature(original_from_pretrained)

    def from_pretrained(cls, model: nn.Module, model_id: Any, *args: Any, **kwargs: Any) -> Any:
        def load() -> Any:
            return original_from_pretrained(cls, model, model_id, *args, **kwargs)

        if safety.inside_guarded_load():  # PeftModel.from_pretrained's own load_adapter call is guarded already
            return load()
        bound = from_pretrained_sig.bind(cls, model, model_id, *args, **kwargs).arguments
        hub_kwargs = {k: v for k, v in bound.get("kwargs", {}).items() if k in HUB_KWARGS}
        config = bound.get("config")
        return safety.guard_lra_load(load, model, model_id, hub_kwargs,
                                     peft_type=config.peft_type if config is not None else None)

    original_load_adapter = PeftModel.load_adapter

    def load_adapter(self, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        def load() -> Any:
            return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)

        if safety.inside_guarded_load():
            return load()
        hub_kwargs = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
        existing = self.peft_config.get(adapter_name)
        # Re-loading an existing adapter writes into its tensors in place: those are restored on failure too.
        return safety.guard_lra_load(load, self, model_id, hub_kwargs,
                                     peft_type=existing.peft_type if existing is not None else None,
                                     restore_values_of=adapter_name if existing is not None else None)

    save_and_load.torch_load = _marked(torch_load, original_torch_load)
    PeftModel.from_pretrained = classmethod(_marked(from_pretrained, original_from_pretrained))
    PeftModel.load_adapter = _marked(load_adapter, original_load_adapter)


# ---------------------------------------------------------------------------------------------------- saving
def _patch_saving() -> None:
    original_save = PeftModel.save_pretrained
    save_sig = inspect.signature(original_save)

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
        arguments = save_sig.bind(self, save_directory, *args, **kwargs).arguments
        if hub.lra_adapter(self) is None or not arguments.get("is_main_process", True):
            return original_save(self, save_directory, *args, **kwargs)
        if arguments.get("safe_serialization", True) is False:
            warnings.warn(
                f"safe_serialization=False writes the LRA adapter as a pickle file ({WEIGHTS_NAME}), which lra-peft "
                f"only loads with {safety.ALLOW_BIN_ENV}=1; keep the default (safetensors) unless a tool needs the "
                ".bin file.",
                stacklevel=2,
            )
        final = Path(save_directory).expanduser()
        if final.is_file():
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")  # PEFT's error
        with atomic_output_dir(final) as tmp:
            readme = final / "README.md"
            if readme.is_file():
                shutil.copy2(readme, tmp / "README.md")  # PEFT and lra_peft.hub update a user's card, not replace it
            original_save(self, str(tmp), *args, **kwargs)
        # The card remembered where the model was saved (to find metrics.json later): the final folder, not ours.
        if hub.saved_dir(self) == str(tmp):
            hub.remember_saved_dir(self, str(final))

    original_card = PeftModel.create_or_update_model_card

    def create_or_update_model_card(self, output_dir: str) -> None:
        adapter = hub.lra_adapter(self)
        if adapter is None:
            return original_card(self, output_dir)
        if not _PUSHING.get():
            hub.remember_saved_dir(self, str(output_dir))
        hub.update_model_card(self, adapter, output_dir, peft_card=lambda: original_card(self, output_dir))

    original_push = PeftModel.push_to_hub

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        adapter = hub.lra_adapter(self)
        if adapter is None or args:
            return original_push(self, repo_id, *args, **kwargs)
        return hub.push_model(self, adapter, repo_id, save=_save_for_upload, **kwargs)

    PeftModel.save_pretrained = _marked(save_pretrained, original_save)
    PeftModel.create_or_update_model_card = _marked(create_or_update_model_card, original_card)
    PeftModel.push_to_hub = _marked(push_to_hub, original_push)


def _save_for_upload(model: PeftModel, folder: str) -> None:
    token = _PUSHING.set(True)
    try:
        model.save_pretrained(folder)
    finally:
        _PUSHING.reset(token)


# ------------------------------------------------------------------------------ LoRA conversion, base weights
def _patch_conversion() -> None:
    original = lora_conversion._convert_module_to_lora

    def convert_module_to_lora(module: nn.Module, rank: Any, adapter_name: str = "default") -> Any:
        if isinstance(module, LRALayer):
            return lra_to_lora(module, rank, adapter_name)
        return original(module, rank, adapter_name)

    lora_conversion._convert_module_to_lora = _marked(convert_module_to_lora, original)


def _patch_base_state_dict() -> None:
    original_get = save_and_load.get_base_model_state_dict
    original_set = save_and_load.set_base_model_state_dict

    def get_base_model_state_dict(model: Any) -> dict[str, torch.Tensor]:
        state = original_get(model)
        for key, delta in init_deltas(model).items():
            if key in state:
                value = state[key]
                state[key] = (value.float() + delta.to(value.device).float()).to(value.dtype)
        return state

    def set_base_model_state_dict(model: Any, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
        deltas = init_deltas(model)
        if deltas:
            state_dict = dict(state_dict)
            for key, delta in deltas.items():
                if key in state_dict:
                    value = state_dict[key]
                    state_dict[key] = (value.float() - delta.to(value.device).float()).to(value.dtype)
        return original_set(model, state_dict, strict=strict)

    for patched, original in ((get_base_model_state_dict, original_get), (set_base_model_state_dict, original_set)):
        _marked(patched, original)
        for namespace in (save_and_load, peft.utils, peft):
            if getattr(namespace, patched.__name__, None) is original:
                setattr(namespace, patched.__name__, patched)


def install() -> None:
    """Install every patch listed in the module docstring, once."""
    if getattr(PeftModel.save_pretrained, _MARK, False):
        return
    _patch_config_reading()
    _patch_loading()
    _patch_saving()
    _patch_conversion()
    _patch_base_state_dict()
