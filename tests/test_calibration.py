"""Task-aware initialisations (issue 18, section 2): `init_weights="corda"` / `"gradient"` after `lra_peft.preprocess`.

What each init promises, checked against statistics computed here independently of lra_peft: outputs unchanged at step
0; CorDA's ΔW₀ leaves exactly the tail of W·C̃'s spectrum in the frozen base; the gradient init spans the top singular
vectors of ∂L/∂W and its first SGD step moves W along them; the adapters save, reload in a fresh process onto the
original base, coexist with others, export to LoRA exactly and work on a 4-bit base.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import bitsandbytes as bnb
import pytest
import test_recipes as recipe_tests
import torch
from conftest import VOCAB, make_bert_seq_cls, make_gpt2, tiny_bert_config
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModel, BertModel, BitsAndBytesConfig

import lra_peft
from lra_peft import LRAConfig, LRALayer
from lra_peft.decomposition import CORDA_DAMPING

TARGETS = ["query", "value", "dense"]
R = 4


def batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 10), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(n)]


def run_model_for(model: nn.Module, init: str, data: list[dict]):
    def run_model() -> None:
        for batch in data:
            loss = model(**batch).loss
            if init == "gradient":
                loss.backward()
    return run_model


def config(init: str, **kwargs) -> LRAConfig:
    return LRAConfig(r=R, target_modules=TARGETS, init_weights=init, **kwargs)


def adapted(init: str, base: nn.Module | None = None, data: list[dict] | None = None, **kwargs) -> nn.Module:
    """`get_peft_model` after `preprocess` on a copy of `base` (default: the tiny BERT classifier)."""
    model = copy.deepcopy(base) if base is not None else make_bert_seq_cls()
    cfg = config(init, **kwargs)
    lra_peft.preprocess(model, cfg, run_model_for(model, init, data or batches()))
    return get_peft_model(model, cfg)


def lra_layers(model: nn.Module) -> dict[str, LRALayer]:
    return {name.split("base_model.model.", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, LRALayer)}


def logits(model: nn.Module, data: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"]).logits for b in data])


INITS = [("corda", {}), ("corda", {"corda_method": "kpm"}), ("gradient", {}), ("gradient", {"gradient_scale": 3.0})]


# ------------------------------------------------------------------------------------------------- step 0, storage
@pytest.mark.parametrize("init, kwargs", INITS)
def test_outputs_unchanged_at_step_0_and_the_adapter_owns_the_residual(init, kwargs):
    base = make_bert_seq_cls()
    data = batches(seed=7)
    model = adapted(init, base, **kwargs)
    torch.testing.assert_close(logits(model, data), logits(base, data), rtol=0, atol=1e-5)
    originals = dict(base.named_modules())
    for name, layer in lra_layers(model).items():
        assert layer.residual_owner == "default"
        W = originals[name].weight.detach()
        delta0 = layer._init_delta_matrix("default")
        assert torch.linalg.norm(delta0) > 1e-3 * torch.linalg.norm(W)  # a real part of W moved into the adapter
        torch.testing.assert_close(layer.get_base_weight() + delta0, W, rtol=0, atol=1e-6)
        assert not hasattr(layer.get_base_layer(), "lra_calibration")  # the statistics were freed
    assert model.peft_config["default"].init_weights == init


def inputs_of(model: nn.Module, names: list[str], data: list[dict]) -> dict[str, torch.Tensor]:
    """Every target layer's inputs over `data` (tokens × in), recorded with plain forward hooks."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n in names]
    with torch.no_grad():
        for batch in data:
            model(**batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(x).double() for n, x in seen.items()}


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_leaves_the_tail_of_w_times_c_in_the_base(method):
    base = make_bert_seq_cls()
    data = batches()
    model = adapted("corda", base, data, corda_method=method)
    layers = lra_layers(model)
    X = inputs_of(base, list(layers), data)
    originals = dict(base.named_modules())
    for name, layer in layers.items():
        C = X[name].T @ X[name]
        C = C + CORDA_DAMPING * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)  # the documented C̃
        W = originals[name].weight.detach().double()
        sigma = torch.linalg.svdvals(W @ C)
        tail = sigma[R:] if method == "ipm" else sigma[:-R]  # kpm puts the r smallest into the adapter
        residual = W - layer._init_delta_matrix("default").double()
        assert float(torch.linalg.norm(residual @ C)) == pytest.approx(float(torch.linalg.norm(tail)), rel=1e-4)
        # and ΔW₀·C̃ is the kept rank-r part: its singular values are W·C̃'s top (ipm) / bottom (kpm) r
        kept = sigma[:R] if method == "ipm" else sigma[-R:]
        got = torch.linalg.svdvals(layer._init_delta_matrix("default").double() @ C)[:R]
        torch.testing.assert_close(got, kept, rtol=1e-4, atol=0)


def task_gradients(base: nn.Module, names: list[str], data: list[dict]) -> dict[str, torch.Tensor]:
    """∂L/∂W summed over `data`, by autograd on a copy of the model (nothing of lra_peft involved)."""
    model = copy.deepcopy(base)
    model.zero_grad()
    for batch in data:
        model(**batch).loss.backward()
    modules = dict(model.named_modules())
    return {n: modules[n].weight.grad.detach().double() for n in names}


def projector(Q: torch.Tensor) -> torch.Tensor:
    Q = torch.linalg.qr(Q.double())[0]
    return Q @ Q.T


def test_gradient_init_spans_the_top_singular_vectors_of_the_task_gradient():
    base = make_bert_seq_cls()
    data = batches()
    model = adapted("gradient", base, data)
    layers = lra_layers(model)
    G = task_gradients(base, list(layers), data)
    for name, layer in layers.items():
        u, s, vh = torch.linalg.svd(G[name])
        assert s[R - 1] > 1.01 * s[R]  # a gap, so the top-r subspaces are well defined
        U0, V0 = layer.lra_U0["default"], layer.lra_V0["default"]
        torch.testing.assert_close(projector(U0), projector(u[:, :R]), rtol=0, atol=1e-4)
        torch.testing.assert_close(projector(V0), projector(vh[:R].T), rtol=0, atol=1e-4)
        # ΔW₀ = gradient_scale · U₀V₀ᵀ: every singular value is the scale (1.0 by default)
        singular = torch.linalg.svdvals(layer._init_delta_matrix("default"))
        torch.testing.assert_close(singular[:R], torch.ones(R), rtol=1e-5, atol=1e-5)
        assert singular[R:].abs().max() < 1e-5


def test_first_sgd_step_of_the_gradient_init_moves_w_along_the_task_gradient():
    """The documented property: with every λ₀ equal, an SGD step of (U, λ, V) changes W, to first order in the
    learning rate η, by −η·s²·(1 + 2λ₀²)·G_r, G_r the rank-r truncation of G = ∂L/∂W (full fine-tuning's step −η·G)."""
    base = make_bert_seq_cls()
    data = batches()
    scale = 0.5
    model = adapted("gradient", base, data, gradient_scale=scale, lra_alpha=2 * R)  # s = 2: λ₀ = scale / s
    model.train()
    layers = lra_layers(model)
    G = task_gradients(base, list(layers), data)
    for batch in data:
        model(**batch).loss.backward()
    for name, layer in layers.items():
        s = layer.scaling["default"]
        U, lam, V = (t.detach().double() for t in (layer.lra_U["default"], layer.lra_lambda["default"],
                                                    layer.lra_V["default"]))
        gU, glam, gV = (t.grad.double() for t in (layer.lra_U["default"], layer.lra_lambda["default"],
                                                   layer.lra_V["default"]))
        # d(s·U·diag(λ)·Vᵀ) along the descent direction (−grad of each factor), in float64: no rounding of W + tiny.
        first_order = -s * ((gU * lam) @ V.T + (U * glam) @ V.T + (U * lam) @ gV.T)
        u, sv, vh = torch.linalg.svd(G[name])
        G_r = (u[:, :R] * sv[:R]) @ vh[:R]
        lam0 = scale / s
        expected = -(s**2) * (1 + 2 * lam0**2) * G_r
        assert torch.linalg.norm(first_order - expected) < 1e-3 * torch.linalg.norm(expected), name


# ------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("init", ["corda", "gradient"])
def test_get_peft_model_without_preprocess_is_a_clear_error_and_changes_nothing(init):
    model = make_bert_seq_cls()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lra_peft\.preprocess\(model, config, run_model\)"):
        get_peft_model(model, config(init))
    assert not any(isinstance(m, LRALayer) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_statistics_of_the_other_init_or_a_spent_preprocess_are_refused():
    model = make_bert_seq_cls()
    lra_peft.preprocess(model, config("corda"), run_model_for(model, "corda", batches()))
    with pytest.raises(ValueError, match="lra_peft.preprocess"):
        get_peft_model(copy.deepcopy(model), config("gradient"))
    peft_model = get_peft_model(model, config("corda"))
    with pytest.raises(ValueError, match="lra_peft.preprocess"):  # consumed by the first adapter
        peft_model.add_adapter("again", config("corda"))


def test_preprocess_rejects_a_run_model_that_does_not_do_its_part():
    model = make_bert_seq_cls()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    forward_only = run_model_for(model, "corda", batches())  # no backward: no gradient reaches any layer
    with pytest.raises(ValueError, match=r"loss\.backward\(\).*Nothing was stored"):
        lra_peft.preprocess(model, config("gradient"), forward_only)
    with pytest.raises(ValueError, match="saw no input"):
        lra_peft.preprocess(model, config("corda"), lambda: None)
    assert not any(hasattr(m, "lra_calibration") for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())  # the gradient init's backward left no .grad behind
    with pytest.raises(ValueError, match="needs no statistics"):
        lra_peft.preprocess(model, config("principal"), lambda: None)


@pytest.mark.parametrize("kwargs, fragment", [({"corda_method": "both"}, "corda_method"),
                                              ({"gradient_scale": 0.0}, "gradient_scale"),
                                              ({"svd_niter": 2}, "svd_niter")])
def test_config_rejects_bad_task_aware_settings(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        config("corda", **kwargs)


# ------------------------------------------------------------------------------------- saving, coexisting, export
LOADER = textwrap.dedent(
    """
    import sys, torch
    import lra_peft, lra_peft.decomposition as dec, lra_peft.layer as layer
    from transformers import AutoModelForSequenceClassification
    from peft import PeftModel

    def no_init(*args, **kwargs):
        raise AssertionError("loading a saved adapter must not decompose anything")
    for name in ("top_or_bottom_svd", "corda_factors", "gradient_factors"):
        setattr(dec, name, no_init)
        setattr(layer, name, no_init)

    base_dir, adapter_dir, ref_path = sys.argv[1:4]
    ref = torch.load(ref_path)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"]).logits
        with model.disable_adapter():
            base = model(input_ids=ref["input_ids"]).logits
    print(((out - ref["adapted"]).abs().max().item(), (base - ref["base"]).abs().max().item()))
    """
)


def train_like(model: nn.Module, seed: int = 0) -> None:
    """Move every trainable parameter, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("init", ["corda", "gradient"])
def test_save_then_fresh_process_loads_onto_the_original_base_with_the_same_outputs(init, tmp_path: Path):
    base = make_bert_seq_cls()
    base.save_pretrained(tmp_path / "base")
    model = adapted(init, base)
    train_like(model)
    model.eval()
    input_ids = batches(1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        ref = {"input_ids": input_ids, "adapted": model(input_ids=input_ids).logits,
               "base": base(input_ids=input_ids).logits}
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_weights"] == init
    torch.save(ref, tmp_path / "ref.pt")
    (tmp_path / "load.py").write_text(LOADER)
    proc = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "base"), str(tmp_path / "adapter"),
                           str(tmp_path / "ref.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapted_err, base_err = eval(proc.stdout.strip().splitlines()[-1])
    assert adapted_err < 1e-5 and base_err < 1e-5, (adapted_err, base_err)
    assert (ref["adapted"] - ref["base"]).abs().max() > 1e-2  # the comparison can tell the two apart
    # In this process too, with a config the user built (no statistics: the factors come from the checkpoint).
    user_config = config(init)  # as built for training (no task_type there either)
    loaded = PeftModel.from_pretrained(make_bert_seq_cls(), tmp_path / "adapter", config=user_config).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, ref["adapted"], rtol=0, atol=1e-5)


def test_task_aware_adapter_coexists_with_a_principal_one():
    base = make_bert_seq_cls()
    data = batches(seed=9)
    model = get_peft_model(copy.deepcopy(base), LRAConfig(r=R, target_modules=TARGETS, init_weights="principal"))
    train_like(model, seed=1)
    model.eval()
    principal_out = logits(model, data)
    cfg = config("gradient")
    lra_peft.preprocess(model, cfg, run_model_for(model, "gradient", batches()))
    model.add_adapter("task", cfg)
    for layer in lra_layers(model).values():
        assert layer.residual_owner == "default" and "task" in layer.lra_U0
    model.set_adapter("task")
    torch.testing.assert_close(logits(model, data), logits(base, data), rtol=0, atol=1e-5)  # step 0 of "task"
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, data), principal_out, rtol=0, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, data), logits(base, data), rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["corda", "gradient"])
def test_export_to_lora_gives_the_same_outputs_on_the_original_base(init, tmp_path: Path):
    base = make_bert_seq_cls()
    model = adapted(init, base)
    train_like(model, seed=2)
    model.eval()
    data = batches(seed=11)
    expected = logits(model, data)
    lra_peft.export_lora(model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    assert isinstance(lora.peft_config["default"], LoraConfig)
    torch.testing.assert_close(logits(lora, data), expected, rtol=0, atol=1e-5)


def test_gpt2_conv1d_layers_get_the_gradient_of_their_matrix_view():
    """Conv1D stores W as in × out; G and the adapter must still be out × in (the LRA matrix view)."""
    base = make_gpt2()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    cfg = LRAConfig(r=2, target_modules=["c_attn"], init_weights="gradient")
    model = copy.deepcopy(base)
    lra_peft.preprocess(model, cfg, lambda: model(input_ids=ids, labels=ids).loss.backward())
    peft_model = get_peft_model(model, cfg)
    reference = copy.deepcopy(base)
    reference(input_ids=ids, labels=ids).loss.backward()
    for name, layer in lra_layers(peft_model).items():
        G = reference.get_submodule(name).weight.grad.T.double()  # Conv1D's grad is in × out
        u = torch.linalg.svd(G)[0]
        torch.testing.assert_close(projector(layer.lra_U0["default"]), projector(u[:, :2]), rtol=0, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ 4-bit base
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    model = BertModel(tiny_bert_config(hidden_size=64, intermediate_size=128))  # 4-bit blocks of 64 values are full
    path = tmp_path_factory.mktemp("tiny_bert_4bit")
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("init", ["corda", "gradient"])
def test_4bit_base_through_quantized_load_decomposes_full_precision_w(checkpoint, init):
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    full = dict(BertModel.from_pretrained(checkpoint).named_modules())
    model = lra_peft.quantized_load(AutoModel, checkpoint, nf4)
    data = batches()
    cfg = LRAConfig(r=R, target_modules=["query", "value"], init_weights=init)

    def run_model() -> None:
        for batch in data:  # a headless model: any differentiable function of its output is a loss
            loss = model(input_ids=batch["input_ids"]).last_hidden_state.pow(2).mean()
            if init == "gradient":
                loss.backward()

    lra_peft.preprocess(model, cfg, run_model)
    peft_model = get_peft_model(model, cfg)
    for name, layer in lra_layers(peft_model).items():
        base = layer.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit) and layer.residual_owner == "default"
        # The base holds Q(W − ΔW₀) with W the checkpoint's float32 weight, not its quantized copy.
        W = full[name].weight.detach()
        expected = layer.quantization_backend.quantize_dequantize(base, W - layer._init_delta_matrix("default"))
        torch.testing.assert_close(layer.get_base_weight().float(), expected, rtol=0, atol=1e-6)
    ids = data[0]["input_ids"]
    with torch.no_grad():
        out = peft_model(input_ids=ids).last_hidden_state
        plain_quant = lra_peft.quantized_load(AutoModel, checkpoint, nf4)(input_ids=ids).last_hidden_state
        reference = BertModel.from_pretrained(checkpoint)(input_ids=ids).last_hidden_state
    # At step 0 the model is W up to quantization error, like the quantized base itself.
    assert torch.linalg.norm(out - reference) < 1.5 * torch.linalg.norm(plain_quant - reference)


# ---------------------------------------------------------------------------------------------------- recipes
tiny_model = recipe_tests.tiny_model  # the session fixture: a tiny BERT folder with a tokenizer
run_recipe, small, write_conll = recipe_tests.run_recipe, recipe_tests.small, recipe_tests.write_conll


def test_ner_recipe_with_corda_calibrates_on_the_training_split_and_saves_its_factors(tiny_model, tmp_path):
    from common.calibration import calibration_subset
    from safetensors.torch import load_file

    data = write_conll(tmp_path / "conll")
    runs = {}
    for init in ("corda", "principal"):
        out = tmp_path / init
        run_recipe("ner.py", *small(tiny_model, data, out, "--init_weights", init, "--calibration_samples", "16",
                                    "--max_train_steps", "2"))
        runs[init] = load_file(out / "adapter_model.safetensors")
    metrics = json.loads((tmp_path / "corda" / "metrics.json").read_text())
    assert metrics["args"]["init_weights"] == "corda" and metrics["args"]["calibration_samples"] == 16
    assert json.loads((tmp_path / "corda" / "adapter_config.json").read_text())["init_weights"] == "corda"
    u0 = [k for k in runs["corda"] if k.endswith("lra_U0")]
    assert u0 and all(not torch.allclose(runs["corda"][k], runs["principal"][k], atol=1e-3) for k in u0)
    # The calibration subset: drawn with the seed, without repeats, from the training features only.
    features = [{"input_ids": [i], "index": i} for i in range(10)]
    subset = calibration_subset(features, 4, seed=42)
    assert subset == calibration_subset(features, 4, seed=42) and len({f["input_ids"][0] for f in subset}) == 4
    assert subset != calibration_subset(features, 4, seed=43) and all("index" not in f for f in subset)
    assert len(calibration_subset(features, 256, seed=42)) == 10


def test_recommend_recipe_with_gradient_uses_the_bi_encoder_loss(tiny_model, tmp_path):
    out = tmp_path / "out"
    run_recipe("recommend.py", *small(tiny_model, recipe_tests.write_movielens(tmp_path / "ml"), out, "--num_eval_negatives", "9",
                                      "--init_weights", "gradient", "--max_train_steps", "2"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["init_weights"] == "gradient" and metrics["train_steps"] == 2


def test_recipe_rejects_a_non_positive_calibration_sample_count(tiny_model, tmp_path):
    proc = run_recipe("ner.py", *small(tiny_model, write_conll(tmp_path / "conll"), tmp_path / "out",
                                       "--init_weights", "corda", "--calibration_samples", "0"), check=False)
    assert proc.returncode != 0 and "--calibration_samples=0" in proc.stderr


def test_intent_recipe_with_gradient_on_a_4bit_base(tiny_model, tmp_path):
    out = tmp_path / "out"
    run_recipe("intent.py", *small(tiny_model, recipe_tests.write_banking(tmp_path / "banking"), out, "--r", "4",
                                   "--load_in_4bit", "--init_weights", "gradient", "--max_train_steps", "1"))
    assert json.loads((out / "adapter_config.json").read_text())["init_weights"] == "gradient"
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 1


def test_recommend_recipe_with_peft_corda_feeds_one_sequence_per_pass(tiny_model, tmp_path):
    """An example is a profile and several movies; PEFT's CorDA hook takes one sequence per forward pass."""
    out = tmp_path / "out"
    run_recipe("recommend.py", *small(tiny_model, recipe_tests.write_movielens(tmp_path / "ml"), out, "--num_eval_negatives", "9",
                                      "--method", "lora", "--init_lora_weights", "corda", "--calibration_samples", "4",
                                      "--max_train_steps", "1"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["init_lora_weights"] == "corda" and metrics["train_steps"] == 1
