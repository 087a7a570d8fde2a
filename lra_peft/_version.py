"""The lra-peft version (a leaf module: the model card and the CLI print it)."""

__version__ = "0.1.0"
