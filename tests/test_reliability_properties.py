"""Property-based tests (hypothesis) over random shapes, ranks, dtypes (fp32, bf16), init modes and bias: merging,
unmerging, export to LoRA, save/load and the zero adapter all agree with the unmerged LRA forward or the base."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn

import lra_peft
from lra_peft import LRAConfig, LRALayer

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Relative tolerances: fp32 is exact up to rounding; a bf16 base rounds every merged weight to 8 significant bits.
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


class Net(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear, with random sizes."""

    def __init__(self, vocab: int, d0: int, d1: int, d2: int, bias: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d0)
        self.lin0 = nn.Linear(d0, d1, bias=bias)
        self.lin1 = nn.Linear(d1, d2, bias=bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(self.emb(input_ids))))


@st.composite
def cases(draw: st.DrawFn) -> dict:
    dims = [draw(st.integers(2, 12)) for _ in range(4)]  # vocab, d0, d1, d2
    targets = draw(st.lists(st.sampled_from(["emb", "lin0", "lin1"]), min_size=1, max_size=3, unique=True))
    init = draw(st.sampled_from([True, False, "principal", "minor"]))
    # An SVD init needs r singular triplets in every target: r <= the smaller side of each adapted matrix.
    sides = {"emb": (dims[0], dims[1]), "lin0": (dims[1], dims[2]), "lin1": (dims[2], dims[3])}
    max_r = min(min(sides[t]) for t in targets) if init in ("principal", "minor") else 6
    return dict(
        dims=dims, targets=targets, init=init, r=draw(st.integers(1, max_r)),
        alpha=draw(st.sampled_from([None, 1.0, 16.0])), bias=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])), seed=draw(st.integers(0, 2**16)),
    )


def _base(case: dict) -> Net:
    torch.manual_seed(case["seed"])
    return Net(*case["dims"], bias=case["bias"]).to(case["dtype"]).eval()


def _peft(case: dict, trained: bool = True) -> tuple[nn.Module, Net]:
    base = _base(case)
    pristine = _base(case)
    model = get_peft_model(base, LRAConfig(r=case["r"], lra_alpha=case["alpha"], target_modules=case["targets"],
                                           init_weights=case["init"]))
    if trained:  # stand-in for training: move every trainable factor
        gen = torch.Generator().manual_seed(case["seed"] + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lra_" in name:
                    param.add_((0.3 * torch.randn(param.shape, generator=gen)).to(param.dtype))
    return model.eval(), pristine


def _ids(case: dict) -> torch.Tensor:
    return torch.randint(0, case["dims"][0], (3, 5), generator=torch.Generator().manual_seed(case["seed"]))


def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).float()


def _close(actual: torch.Tensor, expected: torch.Tensor, case: dict, scale: torch.Tensor | None = None) -> None:
    scale = expected.abs().max() if scale is None else scale
    error = (actual - expected).abs().max()
    assert error <= TOL[case["dtype"]] * scale.clamp_min(1e-3), (error.item(), scale.item(), case)


@SETTINGS
@given(case=cases())
def test_merge_equals_unmerged_and_unmerge_restores_the_weights(case: dict) -> None:
    model, _ = _peft(case)
    ids = _ids(case)
    expected = _out(model, ids)
    weights = {n: m.get_base_layer().weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, LRALayer)}
    model.merge_adapter(safe_merge=True)
    _close(_out(model, ids), expected, case)
    model.unmerge_adapter()
    _close(_out(model, ids), expected, case)
    for name, module in model.named_modules():
        if isinstance(module, LRALayer):
            delta = module.get_delta_weight("default").float()
            _close(module.get_base_layer().weight.float(), weights[name].float(), case,
                   scale=weights[name].float().abs().max() + delta.abs().max())
    _close(_out(model.merge_and_unload(safe_merge=True), ids), expected, case)


@SETTINGS
@given(case=cases())
def test_save_load_and_export_to_lora_reproduce_the_adapter(case: dict) -> None:
    model, _ = _peft(case)
    ids = _ids(case)
    expected = _out(model, ids)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "lra")
        loaded = PeftModel.from_pretrained(_base(case), Path(tmp) / "lra").eval()
        _close(_out(loaded, ids), expected, case)
        lra_peft.export_lora(model, Path(tmp) / "lora")
        # Stock PEFT's LoRA on the original base: residual-free for principal/minor.
        lora = PeftModel.from_pretrained(_base(case), Path(tmp) / "lora").eval()
        assert lora.peft_config["default"].peft_type == "LORA"
        _close(_out(lora, ids), expected, case)


@SETTINGS
@given(case=cases())
def test_zero_adapter_and_disabled_adapter_give_the_base_output(case: dict) -> None:
    ids = _ids(case)
    model, pristine = _peft(case)
    base_out = _out(pristine, ids)
    with model.disable_adapter():
        _close(_out(model, ids), base_out, case)
    if case["init"] in ("principal", "minor"):
        # Untrained, an SVD-initialised adapter is ΔW₀ on top of the residual W − ΔW₀: the base itself.
        fresh, _ = _peft(case, trained=False)
        _close(_out(fresh, ids), base_out, case)
    else:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LRALayer):
                    module.lra_lambda["default"].zero_()
        _close(_out(model, ids), base_out, case)
    _close(_out(model.unload(), ids), base_out, case)
