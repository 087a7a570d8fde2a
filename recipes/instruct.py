"""Instruction tuning (supervised fine-tuning) of a causal LM with LRA (or --method lora|adalora|vera|full).

    accelerate launch recipes/instruct.py --model_name_or_path meta-llama/Llama-3.2-1B --train_file train.jsonl
    accelerate launch recipes/instruct.py --model_name_or_path <folder> --train_file train.jsonl --load_in_4bit

Data: JSONL files (`--train_file`, `--validation_file`), one example a line, either {"prompt": ..., "response": ...}
or {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} ending with an assistant message. The
text is the tokenizer's chat template when it has one, else the plain template of `render_plain`:

    ### Instruction:
    {prompt}

    ### Response:
    {response}</s>

The loss is on the response tokens only (the final assistant message; labels are -100 on the prompt and padding).
Without --validation_file, --validation_split_percentage of the training file is held out. Evaluation: validation
loss and perplexity (token-weighted), and exact-match accuracy of greedy generations when every validation response
is short (at most --exact_match_max_tokens tokens). At the end, greedy generations for the first
--num_generation_samples validation prompts go to `generations.jsonl` in --output_dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from common.accelerator import make_accelerator
from common.args import TaskDefaults
from common.args import parse_args as parse_recipe_args
from common.batching import eval_dataloader
from common.data import load_hub_dataset, load_jsonl, require_nonempty, take
from common.errors import RecipeError, run_main
from common.loop import train
from common.methods import apply_method, load_model, load_tokenizer
from common.outputs import RunOutputs, save_outputs
from common.schedule import plan_schedule
from torch import nn
from transformers import AutoModelForCausalLM

DEFAULTS = TaskDefaults(dataset="instruct", learning_rate=2e-4, full_learning_rate=2e-5, num_train_epochs=1,
                        per_device_train_batch_size=8, per_device_eval_batch_size=8, max_length=512,
                        init_weights="principal", target_modules="all-linear", output_dir="outputs/instruct")
# Role headers of the plain template (tokenizers without a chat template, e.g. base models).
PLAIN_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
GENERATIONS_FILE = "generations.jsonl"


def add_task_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--train_file", default=None, help="JSONL with prompt/response or messages per line.")
    group.add_argument("--validation_file", default=None, help="JSONL like --train_file (default: a held-out part).")
    group.add_argument("--validation_split_percentage", type=float, default=5.0,
                       help="Without --validation_file: share of --train_file held out (at least one example).")
    group.add_argument("--split_seed", type=int, default=42, help="Seed of the train/validation split.")
    group.add_argument("--packing", action="store_true",
                       help="Pack whole examples into rows of up to --max_length tokens (less padding; a packed "
                            "example attends to the ones before it in its row).")
    group.add_argument("--num_generation_samples", type=int, default=5,
                       help="Validation prompts whose greedy generation goes to generations.jsonl at the end.")
    group.add_argument("--max_new_tokens", type=int, default=128, help="Token limit of those generations.")
    group.add_argument("--exact_match_max_tokens", type=int, default=16,
                       help="Report exact-match accuracy when no validation response is longer than this (0: never).")


# --------------------------------------------------------------------------------------------------------- data
Messages = list[dict[str, str]]


def read_jsonl(path: Path) -> list[Messages]:
    """Examples of a JSONL file (through `datasets`) as chat messages; a bad line raises a `RecipeError` naming file
    and line."""
    if not path.is_file():
        raise RecipeError(f"{path} does not exist; pass --train_file/--validation_file <JSONL file>")
    rows, lines = load_jsonl(path, to_messages)
    return [to_messages(row, f"{path}:{line}") for row, line in zip(rows, lines)]


def to_messages(row: Any, where: str) -> Messages:
    """{"prompt", "response"} or {"messages"} as a list of messages ending with the assistant's answer."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    messages = row.get("messages") if isinstance(row, dict) else None
    if (isinstance(messages, list) and len(messages) >= 2 and all(
            isinstance(m, dict) and m.get("role") in PLAIN_HEADERS and isinstance(m.get("content"), str)
            for m in messages) and messages[-1]["role"] == "assistant"):
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    raise RecipeError(f"{where}: expected {{\"prompt\": str, \"response\": str}} or {{\"messages\": [{{\"role\": "
                      "\"user\", \"content\": str}, ..., {\"role\": \"assistant\", \"content\": str}]}} (roles "
                      f"system/user/assistant, the last one the assistant's), got {str(row)[:200]}")


def load_splits(args: argparse.Namespace) -> tuple[dict[str, list[Messages]], dict[str, str]]:
    """{train, validation: examples}, and where each split came from."""
    if args.dataset_name:
        hub = load_hub_dataset(args)
        raw = {}
        for split, names in (("train", ("train",)), ("validation", ("validation", "test"))):
            name = next((n for n in names if n in hub), None)
            if name is not None:
                raw[split] = [to_messages(row, f"{args.dataset_name}[{name}] row {i}") for i, row in enumerate(hub[name])]
        if "train" not in raw:
            raise RecipeError(f"dataset {args.dataset_name!r} has no 'train' split (it has {list(hub)})")
        where = {split: f"{args.dataset_name}[{split}]" for split in raw}
    else:
        if not args.train_file:
            raise RecipeError("no training data: pass --train_file <JSONL with prompt/response or messages per "
                              "line> (or --dataset_name <Hub dataset>)")
        raw = {"train": read_jsonl(Path(args.train_file))}
        where = {"train": args.train_file}
        if args.validation_file:
            raw["validation"], where["validation"] = read_jsonl(Path(args.validation_file)), args.validation_file
    if "validation" not in raw:
        if not 0 < args.validation_split_percentage < 100:
            raise RecipeError(f"--validation_split_percentage={args.validation_split_percentage} must be in (0, 100)")
        order = list(range(len(raw["train"])))
        random.Random(args.split_seed).shuffle(order)
        k = min(len(order) - 1, max(1, round(len(order) * args.validation_split_percentage / 100)))
        held_out = set(order[:k])
        raw = {"train": [e for i, e in enumerate(raw["train"]) if i not in held_out],
               "validation": [e for i, e in enumerate(raw["train"]) if i in held_out]}
        where["validation"] = (f"{args.validation_split_percentage:g}% of {where['train']} "
                               f"(split seed {args.split_seed})")
    return raw, where


# ------------------------------------------------------------------------------------------------- tokenization
def render_plain(messages: Messages) -> str:
    """The plain template of all messages but the last, ending with the header the answer follows."""
    return "".join(f"{PLAIN_HEADERS[m['role']]}{m['content']}\n\n" for m in messages[:-1]) + PLAIN_HEADERS["assistant"]


def prompt_and_answer_ids(tokenizer: Any, messages: Messages) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (every message but the last, with the generation prompt) and of the answer.

    The two are tokenized separately and concatenated, so the boundary between them (and so the loss mask) is exact
    whatever the tokenizer merges. With a chat template the answer is the template's text after the prompt (its
    end-of-turn marker included); with the plain template it is the answer and EOS.
    """
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise RecipeError("the tokenizer's chat template renders the conversation without its generation "
                              "prompt as a prefix, so the answer cannot be told apart from the prompt; use a "
                              "tokenizer whose template does, or remove its chat_template to use the plain one")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        return prompt_ids, answer_ids
    prompt_ids = tokenizer(render_plain(messages), add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    return prompt_ids, answer_ids


def tokenize(tokenizer: Any, examples: list[Messages], max_length: int) -> tuple[list[dict], int]:
    """Features {input_ids, labels} with labels -100 on the prompt, cut to `max_length`, and the number of examples
    dropped because their prompt alone fills `max_length` (no answer token would be left to learn from)."""
    features, dropped = [], 0
    for messages in examples:
        prompt_ids, answer_ids = prompt_and_answer_ids(tokenizer, messages)
        input_ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
        if all(label == -100 for label in labels):
            dropped += 1
            continue
        features.append({"input_ids": input_ids, "labels": labels})
    return features, dropped


def pack(features: list[dict], max_length: int) -> list[dict]:
    """Whole examples concatenated, in order, into rows of at most `max_length` tokens (none is split)."""
    rows: list[dict] = []
    for feature in features:
        if rows and len(rows[-1]["input_ids"]) + len(feature["input_ids"]) <= max_length:
            rows[-1]["input_ids"] = rows[-1]["input_ids"] + feature["input_ids"]
            rows[-1]["labels"] = rows[-1]["labels"] + feature["labels"]
        else:
            rows.append({"input_ids": list(feature["input_ids"]), "labels": list(feature["labels"])})
    return rows


class InstructionCollator:
    """Right-pads `input_ids` with the pad token and `labels` with -100; shapes (batch, longest row)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, Any] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(f["labels"] + [-100] * pad)
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if "index" in features[0]:
            out["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        return out


def left_padded(prompts: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Prompts padded on the left for generation; (batch, longest prompt)."""
    width = max(len(p) for p in prompts)
    ids = [[pad_token_id] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def greedy(model: nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, device: Any,
           synced: bool) -> list[str]:
    """Greedy continuations of `prompts`, decoded without special tokens. `synced` keeps every process stepping
    until all are done (Transformers' `synced_gpus`), which sharded models (FSDP, ZeRO-3) need."""
    inputs = {k: v.to(device) for k, v in left_padded(prompts, tokenizer.pad_token_id).items()}
    # Models with learned positions (GPT-2) fail past their last position: stop there rather than crash.
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None:
        max_new_tokens = max(1, min(max_new_tokens, limit - inputs["input_ids"].shape[1]))
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, inputs["input_ids"].shape[1]:]]


class Evaluator:
    """Validation loss and perplexity over answer tokens; exact match of greedy answers when answers are short."""

    def __init__(self, accelerator: Any, tokenizer: Any, examples: list[Messages], args: argparse.Namespace) -> None:
        self.accelerator, self.tokenizer, self.args = accelerator, tokenizer, args
        features, _ = tokenize(tokenizer, examples, args.max_length)
        self.features = [{**f, "index": i} for i, f in enumerate(features)]
        self.prompts = [prompt_and_answer_ids(tokenizer, m)[0] for m in examples]
        self.answers = [m[-1]["content"].strip() for m in examples]
        longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in self.answers)
        self.exact_match = 0 < longest <= args.exact_match_max_tokens
        self.answer_tokens = longest + 2  # room for the end-of-turn tokens a correct answer ends with
        self.loader = accelerator.prepare(eval_dataloader(
            self.features, InstructionCollator(tokenizer.pad_token_id), args.per_device_eval_batch_size))
        order = list(range(len(examples)))
        self.prompt_loader = accelerator.prepare(torch.utils.data.DataLoader(
            order, batch_size=args.per_device_eval_batch_size, collate_fn=lambda idx: torch.tensor(idx)))

    @torch.no_grad()
    def __call__(self, model: nn.Module, split: str) -> tuple[dict, str]:
        was_training = model.training
        model.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for batch in self.loader:
            index, labels = batch.pop("index"), batch.pop("labels")
            logits = model(**batch).logits.float()
            # Next-token loss per answer token, summed per example: a token-weighted mean over the whole split.
            losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
            sums, counts = losses.sum(1), (labels[:, 1:] != -100).sum(1)
            _, sums, counts = self.accelerator.gather_for_metrics((index, sums, counts))
            total += sums.double().sum().cpu()
            count += int(counts.sum())
        loss = float(total / max(1, count))
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        report = f"{split}: loss {loss:.4f}, perplexity {metrics['perplexity']:.4f} over {count} answer tokens\n"
        if self.exact_match:
            correct, seen = 0, 0
            for index in self.prompt_loader:
                texts = greedy(model, self.tokenizer, [self.prompts[i] for i in index.tolist()], self.answer_tokens,
                               self.accelerator.device, self.accelerator.num_processes > 1)
                hits = torch.tensor([t.strip() == self.answers[i] for t, i in zip(texts, index.tolist())],
                                    device=self.accelerator.device)
                hits = self.accelerator.gather_for_metrics(hits)
                correct, seen = correct + int(hits.sum()), seen + len(hits)
            metrics["exact_match"] = correct / max(1, seen)
            report += f"{split}: exact match {metrics['exact_match']:.4f} ({correct}/{seen}, greedy, stripped text)\n"
        model.train(was_training)
        return metrics, report


# ---------------------------------------------------------------------------------------------------------- main
USAGE = """import lra_peft  # noqa: F401  (registers the LRA method with PEFT; import it first)
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{ref}")
tokenizer = AutoTokenizer.from_pretrained("{ref}")
# The prompt as in training: the tokenizer's chat template, or the plain "### Instruction:" template
inputs = tokenizer("### Instruction:\\nYour question\\n\\n### Response:\\n", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=128)[0], skip_special_tokens=True))"""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The recipe's flags with every default resolved (what `main` runs with and metrics.json records)."""
    args = parse_recipe_args(__doc__.splitlines()[0], DEFAULTS, add_task_args, argv=argv)
    for name in ("max_new_tokens",):
        if getattr(args, name) <= 0:
            raise RecipeError(f"--{name}={getattr(args, name)} must be a positive integer")
    for name in ("num_generation_samples", "exact_match_max_tokens"):
        if getattr(args, name) < 0:
            raise RecipeError(f"--{name}={getattr(args, name)} must be 0 or more")
    if args.model_name_or_path is None:
        # The shared default (MiniLM) is an encoder; a causal LM has to be named.
        raise RecipeError("pass --model_name_or_path <causal LM folder or Hub id>, e.g. meta-llama/Llama-3.2-1B")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    started = time.perf_counter()
    args = parse_args(argv)
    splits, where = load_splits(args)
    splits = {"train": take(splits["train"], args.max_train_samples),
              "validation": take(splits["validation"], args.max_eval_samples)}
    for split, rows in splits.items():
        require_nonempty(rows, split, where[split])

    accelerator = make_accelerator(args)
    tokenizer = load_tokenizer(args)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise RecipeError(f"the tokenizer of {args.model_name_or_path} has neither a pad nor an EOS token; save "
                              "one with a pad_token (tokenizer.add_special_tokens) and pass that folder")
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and loss anyway
    train_features, dropped = tokenize(tokenizer, splits["train"], args.max_length)
    if not train_features:
        raise RecipeError(f"every training example's prompt fills --max_length={args.max_length} tokens, so no "
                          "answer token is left to learn from; raise --max_length")
    if dropped:
        accelerator.print(f"{dropped} training example(s) skipped: their prompt fills --max_length={args.max_length}")
    if args.packing:
        train_features = pack(train_features, args.max_length)
    schedule = plan_schedule(args, len(train_features), accelerator.num_processes)
    model = load_model(AutoModelForCausalLM, args)
    model = apply_method(model, args, "CAUSAL_LM", schedule.max_train_steps)
    evaluate = Evaluator(accelerator, tokenizer, splits["validation"], args)

    collator = InstructionCollator(tokenizer.pad_token_id)
    result = train(args, accelerator, model, train_features, collator, evaluate, schedule, task="instruct")
    eval_metrics = {k: v for k, v in result.history[-1].items() if k not in ("epoch", "step")}
    _, report = evaluate(accelerator.unwrap_model(model), "validation")

    samples = splits["validation"][:args.num_generation_samples]
    generations = []
    if samples:
        texts = greedy(accelerator.unwrap_model(model), tokenizer,
                       [prompt_and_answer_ids(tokenizer, m)[0] for m in samples], args.max_new_tokens,
                       accelerator.device, accelerator.num_processes > 1)
        generations = [{"messages": m[:-1], "reference": m[-1]["content"], "generation": t}
                       for m, t in zip(samples, texts)]
    report += "".join(f"\n--- prompt\n{m[-2]['content']}\n--- generation\n{g['generation']}\n"
                      for m, g in zip(samples, generations))
    metrics = save_outputs(args, accelerator, model, tokenizer, result, RunOutputs(
        task="instruct", dataset=args.dataset_name or where["train"], pipeline="text-generation",
        auto_class="AutoPeftModelForCausalLM", base_auto_class="AutoModelForCausalLM", eval_metrics=eval_metrics,
        test_metrics={}, report_name="eval_report.txt", report_text=report, usage=USAGE,
        extra_metrics={"train_examples": len(splits["train"]), "skipped_examples": dropped,
                       "train_rows": len(train_features)}), started)
    if accelerator.is_main_process:
        out = Path(args.output_dir) / GENERATIONS_FILE
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations), encoding="utf-8")
        os.replace(tmp, out)
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    run_main(main)
