"""lra-peft: low-rank adaptation ΔW = U · diag(λ) · Vᵀ as a Hugging Face PEFT method.

`import lra_peft` registers the method "LRA" with PEFT; from then on `get_peft_model`, `PeftModel.from_pretrained`,
`AutoPeftModelFor*` and `PeftConfig.from_pretrained` work with LRA adapters.
"""

from ._registration import register as _register
from .allocation import RankAllocator, budget_schedule
from .calibration import preprocess
from .callbacks import LRARankCallback
from .config import LRAConfig
from .conversion import install_lora_conversion_hook as _install_lora_conversion_hook
from .export import CompressionReport, compress, export_lora, export_merged
from .hub import install_peft_model_hooks as _install_peft_model_hooks
from .hub import push_to_hub
from .layer import Conv2d, Embedding, Linear, LRALayer
from .model import LRAModel
from .model import install_base_state_dict_hooks as _install_base_state_dict_hooks
from .optimizer import create_lra_optimizer, lra_param_groups
from .quantization import quantized_load, restore_quantized_residual
from .regularization import orthogonal_loss
from .report import LayerRank, RankReport, rank_report
from .safety import AdapterFileError
from .safety import install_safety_hooks as _install_safety_hooks

_register()
_install_peft_model_hooks()
_install_safety_hooks()
_install_lora_conversion_hook()
_install_base_state_dict_hooks()

__version__ = "0.1.0"

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
