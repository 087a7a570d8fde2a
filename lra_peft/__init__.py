"""lra-peft: low-rank adaptation ΔW = U · diag(λ) · Vᵀ as a Hugging Face PEFT method.

`import lra_peft` registers the method "LRA" with PEFT; from then on `get_peft_model`, `PeftModel.from_pretrained`,
`AutoPeftModelFor*` and `PeftConfig.from_pretrained` work with LRA adapters.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as _PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method as _register_peft_method

from . import peft_hooks as _peft_hooks
from ._peft_type import LRA_PEFT_TYPE_NAME as _LRA_PEFT_TYPE_NAME
from ._peft_type import ensure_peft_type as _ensure_peft_type
from ._version import __version__ as __version__
from .allocation import RankAllocator, budget_schedule
from .calibration import preprocess
from .callbacks import LRARankCallback
from .config import LRAConfig
from .export import CompressionReport, compress, export_lora, export_merged
from .hub import push_to_hub
from .layer import Conv2d, Embedding, Linear, LRALayer
from .model import LRAModel, restore_quantized_residual
from .optimizer import create_lra_optimizer, lra_param_groups
from .quantization import quantized_load
from .regularization import orthogonal_loss
from .report import LayerRank, RankReport, rank_report
from .safety import AdapterFileError

_peft_hooks.install()  # every patch of PEFT's own code, listed in lra_peft/peft_hooks.py

# Last, once every module is in place: PEFT's registry maps "lra" to LRAConfig / LRAModel (idempotent on re-import).
if _ensure_peft_type() not in _PEFT_TYPE_TO_CONFIG_MAPPING:
    _register_peft_method(name=_LRA_PEFT_TYPE_NAME.lower(), config_cls=LRAConfig, model_cls=LRAModel, prefix="lra_")

__all__ = [
    "AdapterFileError",
    "CompressionReport",
    "Conv2d",
    "Embedding",
    "LRAConfig",
    "LRALayer",
    "LRAModel",
    "LRARankCallback",
    "LayerRank",
    "Linear",
    "RankReport",
    "RankAllocator",
    "budget_schedule",
    "compress",
    "create_lra_optimizer",
    "export_lora",
    "export_merged",
    "lra_param_groups",
    "orthogonal_loss",
    "preprocess",
    "push_to_hub",
    "quantized_load",
    "rank_report",
    "restore_quantized_residual",
]
