"""LRA on bitsandbytes 8-bit and 4-bit bases (issue 3): training, merging, SVD initialisation, quantized_load.

bitsandbytes 0.50 runs its int8 / nf4 / fp4 kernels on the CPU, so these tests run in CI with a tiny BERT whose
checkpoint is written to a temporary folder and loaded with `BitsAndBytesConfig`, as a user would load a real model.
Error bounds are measured, not guessed: the error of merging is compared with the error of quantizing the base
model itself.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from conftest import VOCAB, require, tiny_bert_config
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertModel,
    BitsAndBytesConfig,
)

from lra_peft import LRAConfig, LRALayer, quantized_load, restore_quantized_residual
from lra_peft.decomposition import refine_quantized_init
from lra_peft.quantization import quantization_backend_for

bnb = require("bitsandbytes")

QUANT = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
}
BNB_LINEAR = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
# Hidden 64 / intermediate 128: 4-bit blocks are 64 values, so every block is full.
HIDDEN, INTERMEDIATE = 64, 128

pytestmark = pytest.mark.filterwarnings(
    "ignore:MatMul8bitLt:UserWarning", "ignore:.*quantized_load.*:UserWarning"
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny matrices: one thread is fastest, and on a busy CI machine two threads can make an SVD 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bnb_config(name: str) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(**QUANT[name])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A base (headless) BERT checkpoint whose Linear weights have a decaying spectrum, as pretrained weights do."""
    torch.manual_seed(0)
    model = BertModel(tiny_bert_config(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                out_f, in_f = module.weight.shape
                k = min(out_f, in_f)
                U, _ = torch.linalg.qr(torch.randn(out_f, k))
                V, _ = torch.linalg.qr(torch.randn(in_f, k))
                module.weight.copy_((U * (0.5 * torch.arange(1, k + 1.0) ** -0.7)) @ V.T)
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def full_precision(checkpoint: str) -> dict[str, torch.Tensor]:
    """The checkpoint's float32 Linear weights, keyed by module name inside `BertModel`."""
    model = BertModel.from_pretrained(checkpoint)
    return {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (4, 9), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}


def hidden(model: nn.Module, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch(seed)["input_ids"]).last_hidden_state


def norm(t: torch.Tensor) -> float:
    return torch.linalg.norm(t).item()


def lra_layers(model: nn.Module) -> dict[str, LRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LRALayer)}


def bert_key(name: str) -> str:
    """`base_model.model.encoder.layer.0.attention.self.query` -> `encoder.layer.0.attention.self.query`."""
    return name.split("base_model.model.", 1)[-1].split("bert.", 1)[-1]


def reconstruction_error(model: nn.Module, full_precision: dict[str, torch.Tensor]) -> float:
    """Mean over LRA layers of ‖W − (dequant(base) + ΔW₀)‖ / ‖W‖, W the checkpoint's float32 weight."""
    errors = []
    for name, layer in lra_layers(model).items():
        W = full_precision[bert_key(name)]
        W_hat = layer.get_base_weight().float()
        if layer.residual_owner is not None:
            W_hat = W_hat + layer._init_delta_matrix(layer.residual_owner)
        errors.append(norm(W - W_hat) / norm(W))
    return sum(errors) / len(errors)


def scale_adapters(model: nn.Module, fraction: float, adapter: str = "default") -> None:
    """Make every ‖ΔW‖ a given fraction of ‖W‖, like an adapter after fine-tuning (init_weights=False is random)."""
    with torch.no_grad():
        for layer in lra_layers(model).values():
            ratio = norm(layer.get_base_weight().float()) / norm(layer.delta_weight_matrix(adapter))
            layer.lra_lambda[adapter].mul_(fraction * ratio)


# -------------------------------------------------------------------------------------------- quantized_load
@pytest.mark.parametrize("quant", ["int8", "nf4"])
@pytest.mark.parametrize("auto_class", [AutoModelForSequenceClassification, AutoModelForTokenClassification])
def test_quantized_load_keeps_fresh_head_in_full_precision(checkpoint, quant, auto_class):
    model, info = quantized_load(auto_class, checkpoint, bnb_config(quant), num_labels=3, output_loading_info=True)
    assert "classifier.weight" in info["missing_keys"]
    assert type(model.classifier) is nn.Linear and model.classifier.weight.dtype == torch.float32
    # Transformers' own initialisation of a new head: N(0, initializer_range), zero bias.
    assert 0.01 < model.classifier.weight.std().item() < 0.03
    assert torch.all(model.classifier.bias == 0)
    assert "classifier" in model.config.quantization_config.llm_int8_skip_modules
    quantized = [m for m in model.modules() if isinstance(m, BNB_LINEAR)]
    # q, k, v, attention output, intermediate, output in each of 2 layers; the pooler (sequence classification).
    assert len(quantized) == 2 * 6 + (model.bert.pooler is not None)
    logits = model(input_ids=batch()["input_ids"]).logits
    assert logits.shape[0] == 4 and torch.isfinite(logits).all()


def test_quantized_load_rejects_a_missing_or_wrong_quantization_config(checkpoint):
    with pytest.raises(ValueError, match="BitsAndBytesConfig with load_in_8bit=True or load_in_4bit=True"):
        quantized_load(AutoModel, checkpoint, None)
    with pytest.raises(ValueError, match="BitsAndBytesConfig with load_in_8bit=True or load_in_4bit=True"):
        quantized_load(AutoModel, checkpoint, BitsAndBytesConfig())
    with pytest.raises(ValueError, match="once"):
        quantized_load(AutoModel, checkpoint, bnb_config("int8"), load_in_8bit=True)


def test_quantized_load_finds_full_precision_weights_in_a_sharded_checkpoint(checkpoint, full_precision, tmp_path):
    BertModel.from_pretrained(checkpoint).save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = quantized_load(AutoModelForSequenceClassification, str(tmp_path), bnb_config("nf4"), num_labels=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        peft_model = get_peft_model(model, LRAConfig(r=8, target_modules=["query"], init_weights="principal"))
    assert not [w for w in record if "quantized_load" in str(w.message)]
    layer = lra_layers(peft_model)["base_model.model.bert.encoder.layer.1.attention.self.query"]
    W = full_precision["encoder.layer.1.attention.self.query"]
    expected = layer.quantization_backend.quantize_dequantize(
        layer.get_base_layer(), W - layer._init_delta_matrix("default")
    )
    torch.testing.assert_close(layer.get_base_weight().float(), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- training on bnb bases
@pytest.mark.parametrize("quant", list(QUANT))
def test_training_reaches_only_lra_parameters(checkpoint, quant):
    model = quantized_load(AutoModelForSequenceClassification, checkpoint, bnb_config(quant), num_labels=3)
    peft_model = get_peft_model(model, LRAConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    layers = lra_layers(peft_model)
    assert len(layers) == 13 and all(isinstance(layer.get_base_layer(), BNB_LINEAR) for layer in layers.values())
    # Inference first: on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first eval forward, a layout
    # that breaks a later backward pass; LRA's bases must keep training.
    peft_model.eval()
    with torch.no_grad():
        logits_before = peft_model(**batch()).logits
    peft_model.train()
    loss = peft_model(**batch()).loss
    loss.backward()
    for name, param in peft_model.named_parameters():
        if "lra_" in name:
            assert param.requires_grad and param.grad is not None and param.dtype == torch.float32, name
        elif "modules_to_save" in name:
            assert param.grad is not None, name  # the classifier head
        else:
            assert not param.requires_grad and param.grad is None, name
    # λ = 0 at init, so U and V get no gradient yet but λ does, in every layer (the chain reaches layer 0).
    assert all(layer.lra_lambda["default"].grad.abs().sum() > 0 for layer in layers.values())
    assert torch.isfinite(logits_before).all()


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_prepare_model_for_kbit_training_then_a_few_steps_lower_the_loss(checkpoint, quant):
    model = quantized_load(AutoModelForSequenceClassification, checkpoint, bnb_config(quant), num_labels=3)
    # Gradient checkpointing on, inputs require grads; non-reentrant checkpointing, as the docs show (PyTorch warns
    # when use_reentrant is left unset).
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LRAConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    data = batch()
    losses = []
    for _ in range(8):
        loss = peft_model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    # The adapters themselves moved, not just the head.
    assert all(layer.lra_lambda["default"].abs().sum() > 0 for layer in lra_layers(peft_model).values())


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_several_adapters_switching_and_disabling(checkpoint, quant):
    model = quantized_load(AutoModel, checkpoint, bnb_config(quant))
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LRAConfig(r=4, target_modules="all-linear", init_weights=False))
    peft_model.add_adapter("other", LRAConfig(r=2, target_modules="all-linear", init_weights=False))
    peft_model.eval()
    with peft_model.disable_adapter():
        base = hidden(peft_model)
    first = hidden(peft_model)
    peft_model.set_adapter("other")
    second = hidden(peft_model)
    assert norm(first - base) > 0.05 * norm(base) and norm(second - base) > 0.05 * norm(base)
    assert norm(first - second) > 0.05 * norm(base)
    with peft_model.disable_adapter():
        assert torch.equal(hidden(peft_model), base)
    peft_model.set_adapter("default")
    assert torch.equal(hidden(peft_model), first)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_mixed_adapter_batch_matches_one_adapter_at_a_time(checkpoint, quant):
    model = quantized_load(AutoModel, checkpoint, bnb_config(quant))
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LRAConfig(r=4, target_modules="all-linear", init_weights="principal"))
    peft_model.add_adapter("other", LRAConfig(r=2, target_modules="all-linear", init_weights=False))
    peft_model.eval()
    input_ids = batch()["input_ids"]
    expected = {}
    for name in ("default", "other"):
        peft_model.set_adapter(name)
        expected[name] = hidden(peft_model)
    with peft_model.disable_adapter():
        expected["__base__"] = hidden(peft_model)
    names = ["other", "__base__", "default", "other"]
    with torch.no_grad():
        mixed = peft_model(input_ids=input_ids, adapter_names=names).last_hidden_state
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- merging
def merge_fixture(checkpoint: str, quant: str) -> tuple[PeftModel, torch.Tensor, torch.Tensor, float]:
    """A quantized model with a trained-looking adapter (‖ΔW‖ = ‖W‖/2), its output, base output, base error."""
    full = AutoModel.from_pretrained(checkpoint).eval()
    model = quantized_load(AutoModel, checkpoint, bnb_config(quant))
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LRAConfig(r=4, target_modules="all-linear", init_weights=False)).eval()
    scale_adapters(peft_model, 0.5)
    with peft_model.disable_adapter():
        base = hidden(peft_model)
    # What quantizing the pretrained model costs at the output: the yardstick for what merging may cost.
    quantization_error = norm(base - hidden(full))
    return peft_model, hidden(peft_model), base, quantization_error


@pytest.mark.parametrize("quant", list(QUANT))
def test_merge_and_unmerge_stay_within_the_quantization_error(checkpoint, quant):
    peft_model, unmerged, base, quantization_error = merge_fixture(checkpoint, quant)
    # The adapter's effect dwarfs the tolerance, so a merge that dropped ΔW could not pass.
    assert norm(unmerged - base) > 3 * quantization_error

    peft_model.merge_adapter(safe_merge=True)
    layer = next(iter(lra_layers(peft_model).values()))
    assert layer.merged and isinstance(layer.get_base_layer(), BNB_LINEAR)
    assert layer.get_base_layer().weight.dtype in (torch.int8, torch.uint8)  # requantized, not left in float
    merged = hidden(peft_model)
    assert norm(merged - unmerged) < 2.0 * quantization_error, (norm(merged - unmerged), quantization_error)

    peft_model.unmerge_adapter()
    assert not layer.merged
    # Two requantizations (merge, then unmerge) since `unmerged` was computed.
    assert norm(hidden(peft_model) - unmerged) < 2.5 * quantization_error


@pytest.mark.parametrize("quant", list(QUANT))
def test_merge_and_unload_returns_a_quantized_model_with_the_adapter_in_it(checkpoint, quant):
    peft_model, unmerged, base, quantization_error = merge_fixture(checkpoint, quant)
    merged_model = peft_model.merge_and_unload()
    assert not lra_layers(merged_model)
    assert isinstance(merged_model.encoder.layer[0].attention.self.query, BNB_LINEAR)
    merged = hidden(merged_model)
    assert norm(merged - unmerged) < 2.0 * quantization_error
    assert norm(merged - base) > 3 * quantization_error


def _storage(layer: LRALayer) -> list[torch.Tensor]:
    """The bytes a bnb layer computes with: int8 codes and row scales, or 4-bit codes and block scales."""
    base = layer.get_base_layer()
    weight = base.weight
    if isinstance(base, bnb.nn.Linear8bitLt):
        return [weight.data.clone(), (weight.SCB if weight.SCB is not None else base.state.SCB).clone()]
    return [weight.data.clone(), weight.quant_state.absmax.clone()]


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_three_merge_unmerge_cycles_restore_the_quantized_weights_bit_exactly(checkpoint, quant):
    peft_model, unmerged, base, quantization_error = merge_fixture(checkpoint, quant)
    layers = lra_layers(peft_model)
    original = {name: _storage(layer) for name, layer in layers.items()}
    first_merged = None
    for cycle in range(3):
        peft_model.merge_adapter()
        merged = hidden(peft_model)
        # Each merge starts from the original storage: one requantization, the same every time.
        assert norm(merged - unmerged) < 2.0 * quantization_error, (cycle, norm(merged - unmerged))
        if first_merged is None:
            first_merged = merged
        assert torch.equal(merged, first_merged), cycle
        peft_model.unmerge_adapter()
        for name, layer in layers.items():
            assert not layer.merged
            assert all(torch.equal(a, b) for a, b in zip(_storage(layer), original[name])), (cycle, name)
        assert torch.equal(hidden(peft_model), unmerged), cycle
    # Training goes on from the restored storage: a merge after changing the adapter uses its new values.
    scale_adapters(peft_model, 0.0)
    peft_model.merge_adapter()
    assert norm(hidden(peft_model) - base) < 2.0 * quantization_error
    peft_model.unmerge_adapter()
    assert all(torch.equal(a, b) for name, layer in layers.items() for a, b in zip(_storage(layer), original[name]))


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_merged_weight_is_the_requantized_sum(checkpoint, quant):
    """dequant(merged base) = dequant(Q(dequant(base) + ΔW)): exactly one requantization, with the layer's settings."""
    peft_model, *_ = merge_fixture(checkpoint, quant)
    layer = lra_layers(peft_model)["base_model.model.encoder.layer.1.intermediate.dense"]
    expected_float = layer.get_base_weight().float() + layer.get_delta_weight("default").float()
    expected = layer.quantization_backend.quantize_dequantize(layer.get_base_layer(), expected_float)
    peft_model.merge_adapter()
    merged = layer.get_base_weight().float()
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
    # And that one requantization costs what quantization costs: a few % of the weight (int8 well under 1 %).
    assert norm(merged - expected_float) / norm(expected_float) < (0.01 if quant == "int8" else 0.15)


# ------------------------------------------------------------------------------ principal / minor initialisation
@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("init", ["principal", "minor"])
def test_svd_init_decomposes_full_precision_w_and_quantizes_the_residual(checkpoint, full_precision, quant, init):
    plain = get_peft_model(quantized_load(AutoModel, checkpoint, bnb_config(quant)),
                           LRAConfig(r=8, target_modules="all-linear"))
    plain_error = reconstruction_error(plain, full_precision)

    model = quantized_load(AutoModel, checkpoint, bnb_config(quant))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        peft_model = get_peft_model(model, LRAConfig(r=8, target_modules="all-linear", init_weights=init))
    assert not [w for w in record if "quantized_load" in str(w.message)]  # W itself was found in the checkpoint
    for name, layer in lra_layers(peft_model).items():
        assert layer.residual_owner == "default"
        base = layer.get_base_layer()
        assert isinstance(base, BNB_LINEAR) and base.weight.dtype in (torch.int8, torch.uint8)
        # The base is exactly Q(W − ΔW₀) with W the float32 checkpoint weight.
        W = full_precision[bert_key(name)]
        expected = layer.quantization_backend.quantize_dequantize(base, W - layer._init_delta_matrix("default"))
        torch.testing.assert_close(layer.get_base_weight().float(), expected, rtol=0, atol=1e-6)
    error = reconstruction_error(peft_model, full_precision)
    if init == "principal":
        # The top-r part is kept in float: QPiSSA's smaller quantization error.
        assert error < 0.97 * plain_error, (error, plain_error)
    else:
        assert error < 1.02 * plain_error, (error, plain_error)


@pytest.mark.parametrize("quant", list(QUANT))
def test_quant_refine_iters_lowers_the_reconstruction_error(checkpoint, full_precision, quant):
    errors = {}
    for iters in (0, 4):
        model = quantized_load(AutoModel, checkpoint, bnb_config(quant))
        config = LRAConfig(r=8, target_modules="all-linear", init_weights="principal", quant_refine_iters=iters)
        errors[iters] = reconstruction_error(get_peft_model(model, config), full_precision)
    assert errors[4] < 0.95 * errors[0], errors


def test_quant_refine_iters_with_minor_is_never_worse(checkpoint, full_precision):
    errors = {}
    for iters in (0, 3):
        model = quantized_load(AutoModel, checkpoint, bnb_config("nf4"))
        config = LRAConfig(r=8, target_modules="all-linear", init_weights="minor", quant_refine_iters=iters)
        peft_model = get_peft_model(model, config)
        errors[iters] = reconstruction_error(peft_model, full_precision)
    assert errors[3] <= errors[0]
    # The refined adapter still lives in W's minor subspaces: U ⟂ the top singular vectors of W.
    layer = lra_layers(peft_model)["base_model.model.encoder.layer.0.attention.self.query"]
    U_top = torch.linalg.svd(full_precision["encoder.layer.0.attention.self.query"])[0][:, :8]
    assert norm(U_top.T @ layer.lra_U["default"]) < 1e-3


def test_refine_quantized_init_keeps_the_best_iterate():
    torch.manual_seed(0)
    weight = torch.randn(48, 32) @ torch.diag(torch.logspace(0, -2, 32)) @ torch.linalg.qr(torch.randn(32, 32))[0]

    def round_to_grid(m: torch.Tensor) -> torch.Tensor:
        return torch.round(m / 0.05) * 0.05

    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    U, S, V = U[:, :4], S[:4], Vh[:4].T
    U2, S2, V2, errors = refine_quantized_init(weight, U, S, V, round_to_grid, 5, "principal")
    assert len(errors) == 6
    final = norm(weight - round_to_grid(weight - (U2 * S2) @ V2.T) - (U2 * S2) @ V2.T)
    assert final == pytest.approx(min(errors), rel=1e-5) and min(errors) < errors[0]
    # iters=0: the plain decomposition comes back untouched.
    assert refine_quantized_init(weight, U, S, V, round_to_grid, 0, "principal")[0] is U


def test_a_copied_or_pickled_quantized_model_forgets_the_checkpoint_source(checkpoint):
    model = quantized_load(AutoModel, checkpoint, bnb_config("int8"))
    copied = pickle.loads(pickle.dumps(model))  # a weakref inside would make this fail
    with pytest.warns(UserWarning, match="quantized_load"):
        get_peft_model(copied, LRAConfig(r=4, target_modules=["query"], init_weights="principal"))


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_svd_init_without_full_precision_source_decomposes_the_dequantized_weight(checkpoint, quant):
    model = AutoModel.from_pretrained(checkpoint, quantization_config=bnb_config(quant))  # plain Transformers
    query = model.encoder.layer[0].attention.self.query
    seen = quantization_backend_for(query).get_base_weight(query).float()  # Q(W), all that this model knows
    with pytest.warns(UserWarning, match="quantized_load"):
        peft_model = get_peft_model(model, LRAConfig(r=8, target_modules="all-linear", init_weights="principal"))
    layer = lra_layers(peft_model)["base_model.model.encoder.layer.0.attention.self.query"]
    expected = layer.quantization_backend.quantize_dequantize(
        layer.get_base_layer(), seen - layer._init_delta_matrix("default")
    )
    torch.testing.assert_close(layer.get_base_weight().float(), expected, rtol=0, atol=1e-6)


def test_full_precision_source_is_dropped_once_the_base_weight_changed(checkpoint, full_precision):
    """After merge_and_unload the checkpoint's W is no longer the base: a new principal adapter must not use it."""
    model = quantized_load(AutoModel, checkpoint, bnb_config("nf4"))
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LRAConfig(r=4, target_modules="all-linear", init_weights=False))
    scale_adapters(peft_model, 0.5)
    merged = peft_model.merge_and_unload()
    query = merged.encoder.layer[0].attention.self.query
    merged_weight = quantization_backend_for(query).get_base_weight(query).float()
    with pytest.warns(UserWarning, match="quantized_load"):
        again = get_peft_model(merged, LRAConfig(r=8, target_modules="all-linear", init_weights="principal"))
    layer = lra_layers(again)["base_model.model.encoder.layer.0.attention.self.query"]
    expected = layer.quantization_backend.quantize_dequantize(
        layer.get_base_layer(), merged_weight - layer._init_delta_matrix("default")
    )
    torch.testing.assert_close(layer.get_base_weight().float(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_svd_init_keeps_the_function_of_the_pretrained_model(checkpoint, quant):
    full = AutoModel.from_pretrained(checkpoint).eval()
    plain = get_peft_model(quantized_load(AutoModel, checkpoint, bnb_config(quant)),
                           LRAConfig(r=8, target_modules="all-linear")).eval()
    config = LRAConfig(r=8, target_modules="all-linear", init_weights="principal", quant_refine_iters=4)
    refined = get_peft_model(quantized_load(AutoModel, checkpoint, bnb_config(quant)), config).eval()
    reference = hidden(full)
    # Closer to the full-precision model than plain quantization is, and the same with adapters disabled.
    assert norm(hidden(refined) - reference) < norm(hidden(plain) - reference)
    with refined.disable_adapter():
        torch.testing.assert_close(hidden(refined), hidden(refined.base_model), rtol=0, atol=0)


def dequantized(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbF

    return bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_a_4bit_model_that_ran_on_the_cpu_keeps_its_weights_under_lra(checkpoint, quant):
    """bitsandbytes repacks a 4-bit weight on its first CPU inference; LRA must get the same weight back.

    Its inverse (bitsandbytes 0.50) leaves the block scales transposed unless double-quantized, which scrambled the
    rows of `output.dense` (128 inputs: two blocks a row) by about 20 %. Only the scales' bfloat16 rounding may stay.
    """
    model = AutoModel.from_pretrained(checkpoint, quantization_config=bnb_config(quant)).eval()  # plain Transformers
    dense = model.encoder.layer[0].output.dense
    assert dense.in_features == 2 * dense.weight.blocksize
    before = dequantized(dense)
    with torch.no_grad():
        reference = model(input_ids=batch()["input_ids"]).last_hidden_state
    if not getattr(dense.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack, nothing to undo")
    seen = quantization_backend_for(dense).get_base_weight(dense).float()
    assert norm(seen - before) / norm(before) < 0.005  # bfloat16 scales: about 0.15 %; scrambled rows were 20 %
    peft_model = get_peft_model(model, LRAConfig(r=4, target_modules="all-linear"))
    assert norm(hidden(peft_model) - reference) / norm(reference) < 0.005  # ΔW = 0: the model it was before


def test_quantized_load_keeps_4bit_weights_exact_through_a_cpu_inference(checkpoint):
    """A model from `quantized_load` is not repacked, so principal init still decomposes the checkpoint's W."""
    config = LRAConfig(r=4, target_modules="all-linear", init_weights="principal", quant_refine_iters=1)
    untouched = get_peft_model(quantized_load(AutoModel, checkpoint, bnb_config("nf4")), config)
    model = quantized_load(AutoModel, checkpoint, bnb_config("nf4")).eval()
    before = dequantized(model.encoder.layer[0].output.dense)
    hidden(model)
    torch.testing.assert_close(dequantized(model.encoder.layer[0].output.dense), before, rtol=0, atol=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        used = get_peft_model(model, config)
    assert not [w for w in caught if "does not quantize to the weight in place" in str(w.message)]
    for (name, a), (_, b) in zip(lra_layers(used).items(), lra_layers(untouched).items()):
        torch.testing.assert_close(a.get_base_weight(), b.get_base_weight(), rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_saved_principal_adapter_reloads_and_continues_exactly(checkpoint, quant, tmp_path):
    model = quantized_load(AutoModelForSequenceClassification, checkpoint, bnb_config(quant), num_labels=3)
    config = LRAConfig(r=4, target_modules=["query", "value", "dense"], init_weights="principal",
                       quant_refine_iters=2, task_type="SEQ_CLS")
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        peft_model(**batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    trained = peft_model(**batch(2)).logits.detach()
    peft_model.save_pretrained(tmp_path)

    fresh = quantized_load(AutoModelForSequenceClassification, checkpoint, bnb_config(quant), num_labels=3)
    loaded = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True).eval()
    # Loaded onto Q(W), the adapter subtracts ΔW₀ in the forward pass: Q(W) − ΔW₀ + ΔW ≈ Q(W − ΔW₀) + ΔW.
    approx = loaded(**batch(2)).logits.detach()
    assert not torch.equal(approx, trained)
    torch.testing.assert_close(approx, trained, rtol=0, atol=0.05 if quant == "int8" else 0.5)
    # Putting the quantized residual back reproduces the trained model bit for bit.
    assert restore_quantized_residual(loaded) == len(lra_layers(loaded))
    torch.testing.assert_close(loaded(**batch(2)).logits, trained, rtol=0, atol=1e-6)
    for (name, layer), (_, original) in zip(lra_layers(loaded).items(), lra_layers(peft_model).items()):
        assert torch.equal(layer.get_base_weight(), original.get_base_weight()), name
    # And training continues from there.
    loaded.train()
    loaded(**batch()).loss.backward()
    assert all(layer.lra_U["default"].grad is not None for layer in lra_layers(loaded).values())


def test_restore_quantized_residual_rejects_an_unknown_adapter(checkpoint):
    model = quantized_load(AutoModel, checkpoint, bnb_config("int8"))
    peft_model = get_peft_model(model, LRAConfig(r=4, target_modules=["query"], init_weights="principal"))
    with pytest.raises(ValueError, match="no LRA layer holds an SVD-initialised adapter 'other'"):
        restore_quantized_residual(peft_model, "other")
    assert restore_quantized_residual(peft_model) == 0  # already the residual owner: nothing to do
