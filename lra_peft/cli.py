"""The `lra-peft` command line: inspect, export-lora, merge, compress and push LRA adapters.

Every command works on a saved adapter folder (adapter_config.json + adapter_model.safetensors); only `merge` loads
the base model. Errors print one line on stderr and exit with status 1 (`--traceback` shows the full trace).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Optional

from huggingface_hub.utils import disable_progress_bars
from safetensors import safe_open
from transformers.utils import logging as transformers_logging

from ._io import human_size
from ._version import __version__
from .export import compress, export_lora, export_merged, full_rank
from .format import SAFETENSORS_WEIGHTS_NAME
from .hub import push_to_hub
from .report import plot_rank_report, rank_report, require_matplotlib
from .snapshot import snapshot_from_dir

EPILOG = "Run `lra-peft COMMAND --help` for the options of a command."


def _inspect(args: argparse.Namespace) -> int:
    if args.plot:
        require_matplotlib()  # before any work: say what to install, not fail at the end
    snapshot = snapshot_from_dir(args.adapter_dir)
    report = rank_report(args.adapter_dir, tol=args.tol)
    config = snapshot.config
    broken = snapshot.non_finite()
    if broken:
        # A NaN λ would otherwise count as pruned and NaN would pass for a statistic.
        warnings.warn(f"{snapshot.weights_file} holds NaN or Inf values in {', '.join(broken[:5])}"
                      f"{f' (and {len(broken) - 5} more)' if len(broken) > 5 else ''}: the adapter is broken (often "
                      "saved from a diverged training run) and loading it fails; the |λ| statistics below leave "
                      "those values out", stacklevel=1)
    factor_params = sum(layer.num_trainable() for layer in snapshot.layers.values())
    extra_params = snapshot.num_trainable() - factor_params
    all_magnitudes = [v for layer in report.layers.values() for v in layer.lambda_abs]
    magnitudes = [v for v in all_magnitudes if math.isfinite(v)]
    nonzero = [v for v in magnitudes if v > args.tol]
    modules = sorted({name.rsplit(".", 1)[-1] for name in snapshot.layers})
    ranks = list(report.ranks.values())
    init_stored = any(layer.has_init for layer in snapshot.layers.values())
    summary: dict[str, Any] = {
        "adapter_dir": str(args.adapter_dir),
        "method": "LRA",
        "r": config.r,
        "lra_alpha": config.lra_alpha,
        "init_weights": config.init_weights,
        "base_model": config.base_model_name_or_path,
        "task_type": str(config.task_type) if config.task_type is not None else None,
        "target_modules": modules,
        "num_layers": len(snapshot.layers),
        "modules_to_save": sorted(config.modules_to_save or []),
        "trainable_params": snapshot.num_trainable(),
        "factor_params": factor_params,
        "file": snapshot.weights_file.name,
        "file_size": snapshot.file_size(),
        "lambda_abs": {
            "min_nonzero": min(nonzero) if nonzero else None,
            "median": statistics.median(magnitudes) if magnitudes else None,
            "max": max(magnitudes) if magnitudes else None,
            "zeros": len(magnitudes) - len(nonzero),
            "non_finite": len(all_magnitudes) - len(magnitudes),
        },
        "non_finite_factors": broken,
        "ranks": report.to_dict(),
    }
    if args.plot:
        plot_rank_report(report, args.plot)
        summary["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    lam = summary["lambda_abs"]
    lam_line = (
        f"min≠0 {lam['min_nonzero']:.3g}, median {lam['median']:.3g}, max {lam['max']:.3g}, {lam['zeros']} zero"
        if nonzero
        else f"all {lam['zeros']} zero (ΔW = 0: an untrained adapter)" if not broken
        else f"{lam['zeros']} zero"
    ) + (f", {lam['non_finite']} NaN/Inf (broken)" if lam["non_finite"] else "")
    rows = [
        ("adapter", str(args.adapter_dir)),
        ("method", f"LRA  r={config.r}  lra_alpha={config.lra_alpha}  init_weights={config.init_weights!r}"
                   + ("  (ΔW₀ factors stored: residual-free export)" if init_stored else "")),
        ("base model", str(config.base_model_name_or_path)),
        ("task", summary["task_type"] or "-"),
        ("targets", f"{', '.join(modules)}  ({len(snapshot.layers)} layers)"),
        ("trainable", f"{snapshot.num_trainable():,} parameters (U, λ, V: {factor_params:,}"
                      + (f"; modules_to_save / biases: {extra_params:,})" if extra_params else ")")),
        ("file size", f"{human_size(summary['file_size'])} ({summary['file']})"),
        ("rank", f"total {report.total_rank} of {report.total_r} allocated; per layer min {min(ranks)}, "
                 f"mean {report.mean_rank:.2f}, max {max(ranks)}"),
        ("|λ|", lam_line),
    ]
    for key, value in rows:
        print(f"{key:<11} {value}")
    print()
    print(report)
    if args.plot:
        print(f"\nwrote {args.plot}")
    return 0


def _export_lora(args: argparse.Namespace) -> int:
    out = export_lora(args.adapter_dir, args.out_dir, base=args.base)
    with safe_open(str(out / SAFETENSORS_WEIGHTS_NAME), "pt") as handle:
        keys = [k for k in handle.keys() if k.endswith(("lora_A.weight", "lora_embedding_A"))]
        ranks = [handle.get_slice(k).get_shape()[0] for k in keys]
    print(f"wrote LoRA adapter to {out} ({len(ranks)} layers, LoRA rank {min(ranks)}-{max(ranks)}); load it with "
          "peft.PeftModel.from_pretrained(base_model, path), no lra-peft needed")
    return 0


def _merge(args: argparse.Namespace) -> int:
    out = export_merged(args.adapter_dir, args.out_dir, base=args.base, safe_merge=not args.no_safe_merge)
    print(f"wrote merged model to {out}; load it with transformers' AutoModel*.from_pretrained(path)")
    return 0


def _compress(args: argparse.Namespace) -> int:
    snapshot = snapshot_from_dir(args.adapter_dir)
    before = snapshot.file_size()
    report = compress(args.adapter_dir, args.out_dir, args.r)
    after = (report.out_dir / SAFETENSORS_WEIGHTS_NAME).stat().st_size
    print(report)
    print(f"\nwrote rank-{args.r} LRA adapter to {report.out_dir} ({human_size(before)} -> {human_size(after)}); "
          f"relative error of ΔW over all layers: {report.total_error:.3e}")
    if args.r == full_rank(snapshot):
        print(f"note: {args.r} is this adapter's full rank, so nothing was dropped: the output is the same adapter "
              f"in residual-free form, not a smaller one. Pass --r below {args.r} to shrink it.")
    return 0


def _push(args: argparse.Namespace) -> int:
    info = push_to_hub(
        args.adapter_dir,
        args.repo_id,
        private=True if args.private else None,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
    )
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or args.repo_id
    print(f"pushed {args.adapter_dir} to {url}")
    return 0


def _tolerance(value: str) -> float:
    try:
        tol = float(value)
    except ValueError:
        tol = math.nan
    if not 0 <= tol < math.inf:
        raise argparse.ArgumentTypeError(f"{value!r} is not a threshold: use a finite number >= 0, e.g. 1e-6")
    return tol


def _command(commands: Any, name: str, func: Any, help: str, description: str,
             **positionals: Any) -> argparse.ArgumentParser:
    """A sub-command running `func`, with its positional arguments in order (name=help, or name=add_argument kwargs)."""
    parser = commands.add_parser(name, help=help, description=description)
    for arg, spec in positionals.items():
        parser.add_argument(arg, **(spec if isinstance(spec, dict) else {"help": spec}))
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lra-peft", description="Inspect, convert and publish LRA adapters (lra-peft).", epilog=EPILOG
    )
    parser.add_argument("--version", action="version", version=f"lra-peft {__version__}")
    parser.add_argument("--traceback", action="store_true", help="On error, show the full Python traceback.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _command(commands, "inspect", _inspect,
                 "Summarise an adapter: method, base model, targets, ranks, parameters, size, |λ|.",
                 "Summarise a saved LRA adapter without loading its base model.",
                 adapter_dir="Folder with adapter_config.json and adapter_model.safetensors.")
    p.add_argument("--plot", metavar="PNG", help="Also draw rank per layer × module and the sorted |λ| of each layer.")
    p.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    p.add_argument("--tol", type=_tolerance, default=0.0, help="|λ| at or below this counts as pruned (default 0).")

    p = _command(commands, "export-lora", _export_lora, "Convert to a standard PEFT LoRA adapter (exact).",
                 "Write a standard LoRA adapter that stock PEFT, vLLM or TGI load without lra-peft and that reproduces "
                 "the LRA adapter exactly (principal/minor adapters in residual-free form).",
                 adapter_dir="The LRA adapter folder.", out_dir="Output folder for the LoRA adapter.")
    p.add_argument("--base", help="Base model folder, only needed for Embedding/Conv2d adapters whose base model "
                   "config is not local.")

    p = _command(commands, "merge", _merge,
                 "Merge the adapter into its base model and save it (safetensors + tokenizer).",
                 "Merge an LRA adapter into its base model; plain Transformers loads the result.",
                 base=dict(nargs="?", default=None,
                           help="Base model folder (default: the adapter config's base_model_name_or_path, if local)."),
                 adapter_dir="The LRA adapter folder.", out_dir="Output folder for the merged model.")
    p.add_argument("--no-safe-merge", action="store_true", help="Skip the NaN/Inf check of the merged weights.")

    p = _command(commands, "compress", _compress,
                 "Re-factor each layer's ΔW to rank K by SVD (best rank-K approximation).",
                 "Re-factor every layer's learned ΔW (relative to the original base) to its best rank-K "
                 "approximation, print the relative error per layer and in total, and write a smaller LRA adapter that "
                 "loads onto the original base model.",
                 adapter_dir="The LRA adapter folder.", out_dir="Output folder for the compressed adapter.")
    p.add_argument("--r", type=int, required=True, metavar="K", help="The new rank.")

    p = _command(commands, "push", _push, "Upload the adapter folder to the Hugging Face Hub with an LRA model card.",
                 "Upload an adapter folder with an LRA model card (README.md). Uses your Hub token from HF_TOKEN or "
                 "`hf auth login`.",
                 adapter_dir="The LRA adapter folder.",
                 repo_id="Target model repository, e.g. your-name/my-lra-adapter.")
    p.add_argument("--private", action="store_true", help="Create the repository as private.")
    p.add_argument("--revision", help="Branch to push to.")
    p.add_argument("--commit-message", help="Commit message.")
    p.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    return parser


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (OSError, ValueError, TypeError, RuntimeError)) and message != type(exc).__name__:
        return message
    return f"{type(exc).__name__}: {message}"


def _quiet_libraries() -> None:
    """Only lra-peft's own warnings reach the terminal, each on one line."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"lra_peft(\.|$)")
    warnings.showwarning = lambda message, *a, **k: print(f"lra-peft: warning: {message}", file=sys.stderr)
    for name in ("transformers", "peft", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    with warnings.catch_warnings():
        _quiet_libraries()
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print(f"lra-peft {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - a CLI user gets one line, `--traceback` gives the rest
            if args.traceback:
                raise
            print(f"lra-peft {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
