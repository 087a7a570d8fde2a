"""lra-peft: low-rank adaptation ΔW = U · diag(λ) · Vᵀ as a Hugging Face PEFT method.

`import lra_peft` registers the method "LRA" with PEFT; from then on `get_peft_model`, `PeftModel.from_pretrained`,
`AutoPeftModelFor*` and `PeftConfig.from_pretrained` work with LRA adapters.
"""

from ._registration import register as _register
from .config import LRAConfig
from .layer import Conv2d, Embedding, Linear, LRALayer
from .model import LRAModel
from .regularization import orthogonal_loss

_register()

__version__ = "0.1.0"

__all__ = [
    "Conv2d",
    "Embedding",
    "LRAConfig",
    "LRALayer",
    "LRAModel",
    "Linear",
    "orthogonal_loss",
]
