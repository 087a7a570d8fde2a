"""Safe loading of adapters: clear errors, no pickle by default, nothing left half-changed.

`lra_peft.peft_hooks` routes PEFT's entry points here:

* `PeftConfig.from_json_file` (every PEFT method): a malformed `adapter_config.json` raises an `AdapterFileError`
  naming the file instead of a bare `json.JSONDecodeError` (both are `ValueError`s; `read_config_file`).
* `PeftModel.from_pretrained` / `PeftModel.load_adapter` (`guard_lra_load`): a local folder without
  `adapter_config.json` is named as such, and so is a symbolic link to a folder or to nothing where a file or folder
  is expected. For LRA adapters also:

  - weights are read from `adapter_model.safetensors`; an `adapter_model.bin` (pickle) is refused unless the
    environment sets `LRA_PEFT_ALLOW_BIN=1`, and is then read with `torch.load(weights_only=True)`;
  - a truncated or corrupted safetensors file raises an `AdapterFileError` naming it, before the model is touched;
  - the tensor shapes in the safetensors header are compared with the layers the config describes before any is
    built (`checkpoint_shapes`), so an edited `r` is refused without allocating r-sized factors;
  - any failure (a file error, shapes that do not fit, see `LRAModel._remap_adapter_state_dict_for_load`, even a
    `KeyboardInterrupt`) puts the model back as it was: no LRA layer, `ModulesToSaveWrapper`, `peft_config`
    attribute or `requires_grad` change is left behind, and an adapter being re-loaded keeps its old values.

Saving is atomic (`lra_peft._io.atomic_output_dir`, used by `peft_hooks`' `save_pretrained`). Models and adapters of
other PEFT methods keep PEFT's behaviour, except for the clearer config-file errors.
"""

from __future__ import annotations

import contextvars
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import PeftConfig
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ._io import not_a_file
from ._peft_type import LRA_PEFT_TYPE_NAME
from .config import LOADING_LRA_ADAPTER
from .format import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

ALLOW_BIN_ENV = "LRA_PEFT_ALLOW_BIN"

# True while PeftModel.from_pretrained / load_adapter handles an LRA adapter (read by the torch.load guard and config).
_LRA_LOAD = LOADING_LRA_ADAPTER
# True inside a guarded load, so that PeftModel.from_pretrained's own call of load_adapter is not guarded twice.
_GUARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("lra_peft_guarded", default=False)
# Tensor name -> shape, from the header of the local adapter file a guarded load reads (None: not known).
_CHECKPOINT_SHAPES: contextvars.ContextVar[Optional[dict[str, tuple[int, ...]]]] = contextvars.ContextVar(
    "lra_peft_checkpoint_shapes", default=None)


def loading_lra_adapter() -> bool:
    """True while `PeftModel.from_pretrained` / `load_adapter` loads an LRA adapter."""
    return _LRA_LOAD.get()


def checkpoint_shapes() -> Optional[dict[str, tuple[int, ...]]]:
    """The tensor shapes in the header of the local adapter file being loaded, or None (a Hub adapter, a `.bin`).

    Read before PEFT builds the layers, so that `LRAModel` can refuse a config whose ranks do not fit the file
    (say r edited to 10⁶) without first allocating layers of that size.
    """
    return _CHECKPOINT_SHAPES.get()


class AdapterFileError(ValueError):
    """An adapter file that cannot be used: malformed, truncated, corrupted, or a pickle file not opted into."""


class AdapterContentError(AdapterFileError):
    """An adapter file whose tensors are not those its config describes (missing, extra or of the wrong type).

    Raised while loading, where the file is not known; the loading entry points add the file's path.
    """


class AdapterFileNotFoundError(AdapterFileError, FileNotFoundError):
    """A file an adapter folder needs is missing. Also a `ValueError`, which is what PEFT raises for this."""


def bin_allowed() -> bool:
    """True when the user opted into reading pickle (`adapter_model.bin`) adapters with `LRA_PEFT_ALLOW_BIN=1`."""
    return os.environ.get(ALLOW_BIN_ENV, "").strip().lower() in ("1", "true", "yes")


def bin_refused(path: Union[str, os.PathLike]) -> AdapterFileError:
    return AdapterFileError(
        f"{path} is a pickle file, which can run arbitrary code when read, so lra-peft does not load it. Re-save the "
        f"adapter with safetensors (PeftModel.save_pretrained does by default), or, if you trust the file, set the "
        f"environment variable {ALLOW_BIN_ENV}=1 to read it with torch.load(weights_only=True)."
    )


# ------------------------------------------------------------------------------------------------- reading files
def read_config_file(path: Union[str, os.PathLike]) -> dict:
    """The JSON object in `path`, or an `AdapterFileError` naming the file and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(
            f"{path} is not valid JSON ({exc}); the adapter folder is damaged (e.g. an interrupted save or download) "
            "or was not written by PeftModel.save_pretrained. Save or download the adapter again."
        ) from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(data).__name__}, not an object of adapter settings; save "
                               "or download the adapter again")
    return data


def check_safetensors_file(path: Union[str, os.PathLike]) -> dict[str, tuple[int, ...]]:
    """Check that `path` is a complete safetensors file (header only, cheap); return its tensors' names and shapes."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError alike mean "cannot be read"
        raise AdapterFileError(
            f"{path} cannot be read as safetensors ({exc}): the file is truncated (an interrupted save or download) "
            "or corrupted. Save or download the adapter again."
        ) from None


def load_weights_file(path: Union[str, os.PathLike], device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of an adapter weights file: safetensors, or a `.bin` only with `LRA_PEFT_ALLOW_BIN=1`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        check_safetensors_file(path)
        try:
            return load_file(str(path), device=device)
        except Exception as exc:  # noqa: BLE001
            raise AdapterFileError(f"{path} cannot be read as safetensors ({exc}); save or download the adapter "
                                   "again") from None
    if not bin_allowed():
        raise bin_refused(path)
    return torch.load(path, map_location=device, weights_only=True)


def not_a_file_error(path: Union[str, os.PathLike]) -> Optional[AdapterFileError]:
    """The error for an adapter file that is there but is not a file (a folder, a link to one, a broken link), saying
    what it is rather than that it is missing; None when it is a file or not there at all."""
    problem = not_a_file(path)
    if problem is None:
        return None
    # A broken link is still a missing file for code that catches FileNotFoundError; its message says which.
    cls = AdapterFileNotFoundError if not Path(path).exists() else AdapterFileError
    return cls(f"{problem}; the adapter needs {Path(path).name} to be a file. Fix the link, or save or download the "
               "adapter again.")


def find_weights_file(folder: Union[str, os.PathLike]) -> Optional[Path]:
    """The adapter weights file of a local adapter folder (safetensors preferred), or None."""
    folder = Path(folder)
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def _local_folder(model_id: Any, subfolder: Optional[str]) -> Optional[Path]:
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    path = Path(model_id).expanduser() / (subfolder or "")
    if path.is_symlink() and not path.exists():
        # Not a Hub id either: say what it is rather than "Can't find adapter_config.json".
        raise AdapterFileNotFoundError(f"{not_a_file(path)}; pass the folder that PeftModel.save_pretrained wrote")
    return path if path.is_dir() else None


def _check_local_adapter(folder: Path) -> dict:
    """adapter_config.json of a local adapter folder, with clear errors for a missing or malformed file."""
    config_file = folder / CONFIG_NAME
    problem = not_a_file_error(config_file)
    if problem is not None:
        raise problem
    if not config_file.is_file():
        present = sorted(p.name for p in folder.iterdir())[:10]
        raise AdapterFileNotFoundError(
            f"{config_file} does not exist, so {folder} is not a saved PEFT adapter (it holds: "
            f"{', '.join(present) or 'nothing'}). Pass the folder that PeftModel.save_pretrained wrote."
        )
    return read_config_file(config_file)


def _check_local_lra_weights(folder: Path) -> Optional[dict[str, tuple[int, ...]]]:
    """Refuse a pickle-only or damaged LRA adapter folder before anything is changed; the safetensors file's tensor
    shapes (None for a `.bin`)."""
    weights = find_weights_file(folder)
    if weights is None:
        raise not_a_file_error(folder / SAFETENSORS_WEIGHTS_NAME) or AdapterFileNotFoundError(
            f"{folder} has {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME}; save the adapter again")
    if weights.name == WEIGHTS_NAME and not bin_allowed():
        raise bin_refused(weights)
    if weights.name == SAFETENSORS_WEIGHTS_NAME:
        return check_safetensors_file(weights)
    return None


def _is_lra_type(peft_type: Any) -> bool:
    return str(getattr(peft_type, "value", peft_type)) == LRA_PEFT_TYPE_NAME


def _peek_is_lra(model_id: Any, hub_kwargs: dict) -> bool:
    """Whether `model_id` holds an LRA adapter; local folders get their config checked on the way."""
    folder = _local_folder(model_id, hub_kwargs.get("subfolder"))
    if folder is not None:
        return _is_lra_type(_check_local_adapter(folder).get("peft_type"))
    try:
        return _is_lra_type(PeftConfig._get_peft_type(model_id, **hub_kwargs))
    except Exception:  # noqa: BLE001 - PEFT's own call right after reports why the config is unavailable
        return False


# --------------------------------------------------------------------------------------------- undoing a load
_MISSING = object()


def _is_container(value: Any) -> bool:
    return type(value) in (dict, OrderedDict, list, set)


class RestorePoint:
    """A shallow record of a model, enough to undo what PEFT does to it while injecting and loading an adapter.

    Recorded per module: its attributes (children, parameters, buffers, hooks, adapter dicts, flags) and the contents
    of those that are dicts, lists or sets; per parameter `requires_grad`; the model config's attributes. Tensor
    values are not copied (the model may be large), except those of `adapter_name`, if given, because re-loading an
    existing adapter writes into its tensors in place.
    """

    def __init__(self, model: nn.Module, adapter_name: Optional[str] = None) -> None:
        self._records = []
        for module in model.modules():
            attrs = dict(module.__dict__)
            contents = {k: (v.copy() if not isinstance(v, list) else list(v)) for k, v in attrs.items()
                        if _is_container(v)}
            self._records.append((module, attrs, contents))
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        config = getattr(model, "config", None)
        self._config = (config, dict(vars(config))) if hasattr(config, "__dict__") and not isinstance(
            config, nn.Module) else None
        self._values: list[tuple[torch.Tensor, torch.Tensor]] = []
        if adapter_name is not None:
            marker = f".{adapter_name}."
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if marker in f".{name}.":
                    self._values.append((tensor, tensor.detach().clone()))

    def restore(self) -> None:
        for module, attrs, contents in self._records:
            current = module.__dict__
            for key in [k for k in current if k not in attrs]:
                del current[key]
            for key, value in attrs.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
            for key, saved in contents.items():
                container = attrs[key]
                if isinstance(container, list):
                    container[:] = saved
                else:
                    container.clear()
                    container.update(saved)
        for param, flag in self._requires_grad:
            param.requires_grad_(flag)
        if self._config is not None:
            config, attrs = self._config
            for key in [k for k in vars(config) if k not in attrs]:
                del config.__dict__[key]
            for key, value in attrs.items():
                config.__dict__[key] = value
        with torch.no_grad():
            for tensor, saved in self._values:
                tensor.copy_(saved)


@contextmanager
def restore_on_error(model: nn.Module, adapter_name: Optional[str] = None) -> Iterator[None]:
    """Run the block; if it raises (anything, also KeyboardInterrupt), put `model` back as it was, then re-raise."""
    point = RestorePoint(model, adapter_name)
    try:
        yield
    except BaseException:
        point.restore()
        raise


def inside_guarded_load() -> bool:
    """True inside `guard_lra_load` (so that `PeftModel.from_pretrained`'s own call of `load_adapter` is guarded once)."""
    return _GUARDED.get()


def guard_lra_load(
    load: Callable[[], Any],
    model: nn.Module,
    model_id: Any,
    hub_kwargs: dict,
    *,
    peft_type: Any = None,
    restore_values_of: Optional[str] = None,
) -> Any:
    """Run `load()` (PEFT's `from_pretrained` / `load_adapter` of `model_id` into `model`) with the guards of the
    module docstring when the adapter is an LRA one (`peft_type`, else read from its config); other adapters are
    loaded by `load()` unguarded. `restore_values_of`: an existing adapter whose tensors the load overwrites."""
    is_lra = _is_lra_type(peft_type) if peft_type is not None else _peek_is_lra(model_id, hub_kwargs)
    if not is_lra:
        return load()
    folder = _local_folder(model_id, hub_kwargs.get("subfolder"))
    shapes = _check_local_lra_weights(folder) if folder is not None else None
    with _lra_load_context(True, shapes):
        try:
            with restore_on_error(model, restore_values_of):
                return load()
        except Exception as exc:
            clear = _explain_read_error(exc, model_id, folder)
            if clear is None:
                raise
            raise clear from exc


@contextmanager
def _lra_load_context(is_lra: bool, shapes: Optional[dict[str, tuple[int, ...]]] = None) -> Iterator[None]:
    guarded, lra, known = _GUARDED.set(True), _LRA_LOAD.set(is_lra), _CHECKPOINT_SHAPES.set(shapes)
    try:
        yield
    finally:
        _CHECKPOINT_SHAPES.reset(known)
        _LRA_LOAD.reset(lra)
        _GUARDED.reset(guarded)


def _explain_read_error(exc: BaseException, model_id: Any, folder: Optional[Path] = None) -> Optional[AdapterFileError]:
    """A safetensors read error deep inside PEFT (e.g. a corrupt file from the Hub), as an AdapterFileError; an
    `AdapterContentError` with the file it is about."""
    if isinstance(exc, AdapterContentError):
        weights = find_weights_file(folder) if folder is not None else None
        return AdapterContentError(f"{weights or f'the adapter weights of {model_id}'}: {exc}")
    if type(exc).__name__ == "SafetensorError":
        return AdapterFileError(
            f"the adapter weights of {model_id} cannot be read as safetensors ({exc}): the file is truncated or "
            "corrupted. Save or download the adapter again; the model was left unchanged."
        )
    return None
