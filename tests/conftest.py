"""Shared fixtures: tiny models built from configs, so that tests run in seconds on a CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import lra_peft  # noqa: E402,F401  (registers LRA with PEFT)

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(module: str):
    """Import an optional test dependency: skip without it locally, but fail in CI (CI=true), which installs every
    one, so that a missing package cannot make its tests disappear unnoticed."""
    if IN_CI:
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"needs {module} (installed in CI, where its absence fails)")


def require_condition(ok: bool, reason: str) -> None:
    """Skip locally when `ok` is false (e.g. ../shared/data is absent); fail in CI instead."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this must be available in CI)")
    pytest.skip(reason)


# Tiny models gain nothing from threads, and oversubscribed threads make small SVDs very slow on a busy machine.
torch.set_num_threads(1)

VOCAB = 100


def tiny_bert_config(**kwargs) -> BertConfig:
    defaults = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    defaults.update(kwargs)
    return BertConfig(**defaults)


def make_bert_seq_cls(num_labels: int = 3, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels=num_labels)).eval()


def make_bert_token_cls(num_labels: int = 5, seed: int = 0) -> BertForTokenClassification:
    torch.manual_seed(seed)
    return BertForTokenClassification(tiny_bert_config(num_labels=num_labels)).eval()


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


class MLP(nn.Module):
    """A plain PyTorch model with every layer type LRA adapts: Embedding, Conv2d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.conv = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.lin0 = nn.Linear(16 + 8, 32)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(32, 4)

    def forward(self, input_ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        tokens = self.emb(input_ids).mean(dim=1)
        pixels = self.conv(image).mean(dim=(2, 3))
        return self.lin1(self.relu(self.lin0(torch.cat([tokens, pixels], dim=-1))))


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def mlp_inputs() -> dict:
    gen = torch.Generator().manual_seed(2)
    return {"input_ids": torch.randint(0, VOCAB, (4, 6), generator=gen), "image": torch.randn(4, 1, 8, 8, generator=gen)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
