"""recipes/instruct.py end to end on tiny causal LMs built here (GPT-2 and Llama, a character-level tokenizer) and a
copy task generated here: "copy bdc" → "bdc" over 3-letter strings of 6 letters (chance of an exact match 1/216)."""

from __future__ import annotations

import importlib
import itertools
import json
import random
import shutil
import string
import subprocess
from pathlib import Path

import pytest
import torch
from test_recipes import ACCELERATE, ENV, PYTHON, REPO, adapter, assert_clean_error, assert_same_weights, run_recipe

instruct = importlib.import_module("instruct")  # recipes/ is on sys.path through test_recipes
CHARS = sorted(set(string.printable) - set("\x0b\x0c\r\t"))
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# A chat template of the kind instruction-tuned models ship, in the tokenizer's own alphabet.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                 "</s>{% endif %}\n{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}")


def char_tokenizer(chat_template: str | None = None):
    """One token per printable character, BOS added in front, EOS/PAD/UNK as special tokens."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *CHARS])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_causal_lm(folder: Path, kind: str) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    # A random base stands in for a pretrained one. Its init is wider than the default 0.02 so that the frozen
    # random features are rich enough for a low-rank adapter to build on (at 0.02 an adapter barely learns).
    common = dict(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                                           embd_pdrop=0.0, attn_pdrop=0.0, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                             **common))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


def write_copy_task(folder: Path, n_train: int = 150, n_validation: int = 40, messages: bool = False) -> Path:
    """train.jsonl / validation.jsonl of "copy xyz" → "xyz"; validation strings never occur in training."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["".join(p) for p in itertools.product("abcdef", repeat=3)]
    random.Random(0).shuffle(words)
    for name, chunk in (("train.jsonl", words[:n_train]), ("validation.jsonl", words[n_train:n_train + n_validation])):
        with open(folder / name, "w") as f:
            for w in chunk:
                row = ({"messages": [{"role": "user", "content": f"copy {w}"}, {"role": "assistant", "content": w}]}
                       if messages else {"prompt": f"copy {w}", "response": w})
                f.write(json.dumps(row) + "\n")
    return folder


def args_for(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_file", str(data / "train.jsonl"), "--validation_file",
            str(data / "validation.jsonl"), "--output_dir", str(out), "--per_device_train_batch_size", "16",
            "--learning_rate", "1e-2", "--r", "16", "--logging_steps", "10", *extra]


# ---------------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE], ids=["plain", "chat-template"])
def test_masking_puts_no_loss_on_prompt_tokens(template):
    tokenizer = char_tokenizer(template)
    examples = [[{"role": "user", "content": "copy abc"}, {"role": "assistant", "content": "abc"}],
                [{"role": "system", "content": "be brief"}, {"role": "user", "content": "copy fe"},
                 {"role": "assistant", "content": "fe"}]]
    features, dropped = instruct.tokenize(tokenizer, examples, max_length=128)
    assert dropped == 0
    for feature, messages in zip(features, examples):
        ids, labels = feature["input_ids"], feature["labels"]
        answer = [i for i, label in enumerate(labels) if label != -100]
        # One contiguous block at the very end: the answer and its end marker, nothing of the prompt.
        assert answer == list(range(len(ids) - len(answer), len(ids)))
        assert [ids[i] for i in answer] == [labels[i] for i in answer]
        assert tokenizer.decode([ids[i] for i in answer], skip_special_tokens=True) == messages[-1]["content"]
        assert ids[answer[-1]] == tokenizer.eos_token_id  # the model learns to stop
        prompt = tokenizer.decode(ids[:answer[0]], skip_special_tokens=True)
        assert messages[-2]["content"] in prompt
        assert prompt.endswith("assistant: " if template else "### Response:\n")

    # Padding and packing keep the mask: padded positions and every prompt carry -100.
    batch = instruct.InstructionCollator(tokenizer.pad_token_id)(features)
    short = min(range(2), key=lambda i: len(features[i]["input_ids"]))
    n = len(features[short]["input_ids"])
    assert (batch["labels"][short, n:] == -100).all() and (batch["attention_mask"][short, n:] == 0).all()
    packed = instruct.pack(features, max_length=128)
    assert len(packed) == 1
    assert packed[0]["labels"] == features[0]["labels"] + features[1]["labels"]

    # The loss the model is trained on changes with the answer and not with the prompt.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=len(tokenizer)))
    batch = instruct.InstructionCollator(tokenizer.pad_token_id)(features[:1])
    logits = model(input_ids=batch["input_ids"]).logits
    first = features[0]["labels"].index(next(label for label in features[0]["labels"] if label != -100))
    expected = torch.nn.functional.cross_entropy(logits[0, first - 1:-1], batch["input_ids"][0, first:])
    assert torch.allclose(model(**batch).loss, expected, atol=1e-6)


def test_prompt_that_fills_max_length_is_skipped_not_trained_on_padding():
    tokenizer = char_tokenizer()
    examples = [[{"role": "user", "content": "copy " + "a" * 50}, {"role": "assistant", "content": "x"}],
                [{"role": "user", "content": "copy b"}, {"role": "assistant", "content": "b"}]]
    features, dropped = instruct.tokenize(tokenizer, examples, max_length=48)
    assert dropped == 1 and len(features) == 1


# ----------------------------------------------------------------------------------------------- end to end
def test_gpt2_learns_the_task_and_the_reloaded_adapter_generates_the_same_in_a_fresh_process(gpt2, tmp_path):
    data = write_copy_task(tmp_path / "copy")
    out = tmp_path / "out"
    run_recipe("instruct.py", *args_for(gpt2, data, out, "--max_train_steps", "160", "--lr_scheduler_type", "constant",
                                        "--num_generation_samples", "8",
                                        "--max_new_tokens", "6"))
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert history[0]["exact_match"] < 0.2, history[0]  # chance: 1/216
    assert metrics["eval_exact_match"] >= 0.5, history
    assert metrics["eval_perplexity"] < history[0]["perplexity"] / 2
    assert metrics["eval_loss"] == pytest.approx(torch.tensor(metrics["eval_perplexity"]).log().item(), rel=1e-4)
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "eval_report.txt",
                 "generations.jsonl", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    card = (out / "README.md").read_text()
    assert "AutoPeftModelForCausalLM" in card and "eval_exact_match" not in card.split("## How to load")[1]
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 8
    assert sum(g["generation"].strip() == g["reference"] for g in generations) >= 6

    # A fresh process: the original base from its folder, the adapter on top, greedy decoding of the same prompts.
    script = f"""
import json, sys
sys.path.insert(0, {str(REPO / 'recipes')!r})
import lra_peft  # noqa: F401
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
import instruct
tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(gpt2)!r}), {str(out)!r}).eval()
rows = [json.loads(line) for line in open({str(out / 'generations.jsonl')!r})]
prompts = [instruct.prompt_and_answer_ids(tokenizer, r["messages"] + [{{"role": "assistant", "content": ""}}])[0]
           for r in rows]
print(json.dumps(instruct.greedy(model, tokenizer, prompts, 6, "cpu", False)))
"""
    proc = subprocess.run([PYTHON, "-c", script], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [g["generation"] for g in generations]


def test_llama_4bit_run_and_resume_from_a_checkpoint_equals_an_uninterrupted_run(llama, tmp_path):
    data = write_copy_task(tmp_path / "copy", n_train=64, n_validation=8, messages=True)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ("--num_train_epochs", "2", "--checkpointing_steps", "3", "--load_in_4bit", "--packing",
              "--max_length", "96")
    run_recipe("instruct.py", *args_for(llama, data, full, *common))
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["args"]["load_in_4bit"] and metrics["args"]["init_weights"] == "principal"
    assert metrics["args"]["target_modules"] == "all-linear"
    assert metrics["train_rows"] < metrics["train_examples"]  # packed
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]  # it learns in 4 bits too
    steps = metrics["train_steps"]
    assert (full / "step_3").is_dir() and steps > 3
    resumed.mkdir()
    shutil.copytree(full / "step_3", resumed / "step_3")  # as if the run had stopped after its first checkpoint
    proc = run_recipe("instruct.py", *args_for(llama, data, resumed, *common, "--resume_from_checkpoint"))
    assert "Resuming from" in proc.stdout + proc.stderr
    assert_same_weights(adapter(full), adapter(resumed), atol=0)
    assert (full / "generations.jsonl").read_text() == (resumed / "generations.jsonl").read_text()

    # --packing changes which examples a step sees: a checkpoint of a packed run does not resume an unpacked one.
    other = args_for(llama, data, tmp_path / "other", "--num_train_epochs", "2", "--load_in_4bit", "--max_length",
                     "96", "--resume_from_checkpoint", str(full / "step_3"))
    assert_clean_error(run_recipe("instruct.py", *other, check=False), "packing=True (now False)")


# --------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_a_clear_error_before_any_model_is_loaded(gpt2, tmp_path):
    data = write_copy_task(tmp_path / "copy", n_train=4, n_validation=2)
    with open(data / "train.jsonl", "a") as f:
        f.write('{"prompt": "copy abc", "answer": "abc"}\n')
    proc = run_recipe("instruct.py", *args_for(gpt2, data, tmp_path / "o"), check=False)
    assert_clean_error(proc, "train.jsonl:5", '"response"')
    no_model = [a for a in args_for(gpt2, data, tmp_path / "o") if a not in ("--model_name_or_path", str(gpt2))]
    assert_clean_error(run_recipe("instruct.py", *no_model, check=False), "--model_name_or_path")
    no_data = ["--model_name_or_path", str(gpt2), "--output_dir", str(tmp_path / "o")]
    assert_clean_error(run_recipe("instruct.py", *no_data, check=False), "--train_file")
    assert not (tmp_path / "o").exists()



# ------------------------------------------------------------------------------------------------ multi-process
def test_two_processes_with_the_ddp_config_give_the_same_adapter_and_generations_as_one(gpt2, tmp_path):
    data = write_copy_task(tmp_path / "copy", n_train=32, n_validation=6)
    common = ("--max_train_steps", "4", "--per_device_train_batch_size", "4", "--max_new_tokens", "4")
    one, two = tmp_path / "one", tmp_path / "two"
    run_recipe("instruct.py", *args_for(gpt2, data, one, *common, "--gradient_accumulation_steps", "2"))
    run_recipe("instruct.py", *args_for(gpt2, data, two, *common),
               launcher=(ACCELERATE, "launch", "--config_file", str(REPO / "recipes/configs/ddp.yaml"),
                         "--num_processes", "2", "--main_process_port", "29531"))
    m1, m2 = (json.loads((o / "metrics.json").read_text()) for o in (one, two))
    assert (m1["num_processes"], m2["num_processes"]) == (1, 2)
    assert_same_weights(adapter(one), adapter(two), atol=1e-5)
    assert m1["eval_loss"] == pytest.approx(m2["eval_loss"], abs=1e-5)
    assert m1["eval_exact_match"] == m2["eval_exact_match"]
    assert (one / "generations.jsonl").read_text() == (two / "generations.jsonl").read_text()


def test_an_fsdp_config_on_cpus_is_refused_not_silently_run_unsharded(gpt2, tmp_path):
    # What `accelerate launch --config_file recipes/configs/fsdp.yaml` sets; Accelerate ignores it without GPUs.
    data = write_copy_task(tmp_path / "copy", n_train=8, n_validation=2)
    proc = run_recipe("instruct.py", *args_for(gpt2, data, tmp_path / "o"), check=False,
                      env={**ENV, "ACCELERATE_USE_FSDP": "true"})
    assert_clean_error(proc, "asks for FSDP", "runs this job as", "ddp.yaml")
    assert not (tmp_path / "o").exists()
