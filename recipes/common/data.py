"""Where a recipe's data comes from and how it is read: the data folder, local CSV/TSV files, Hub datasets, and the
checks on the splits (sample limits, empty splits, labels never seen in training).

Every recipe reads its data through this module, so that changing how data is loaded is a change in one place.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from .errors import RecipeError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
DATA_ENV_VAR = "LRA_DATA_DIR"


def resolve_data_dir(data_dir: Optional[str], dataset: str, required: Sequence[str]) -> Path:
    """The folder to read `dataset` from: `--data_dir`, else `$LRA_DATA_DIR/<dataset>`, else ../shared/data/<dataset>.

    Raises a `RecipeError` that says where it looked and how to point it elsewhere when files are missing.
    """
    if data_dir:
        path, why = Path(data_dir).expanduser(), "--data_dir"
    elif os.environ.get(DATA_ENV_VAR):
        root = Path(os.environ[DATA_ENV_VAR]).expanduser()
        # Accept the dataset folder itself as well as the folder holding all datasets.
        path = root if all((root / f).is_file() for f in required) else root / dataset
        why = f"${DATA_ENV_VAR}={root}"
    else:
        path, why = DEFAULT_DATA_ROOT / dataset, "the default location"
    fix = (f"pass --data_dir <folder with {', '.join(required)}> or set {DATA_ENV_VAR} to the folder holding "
           f"{dataset}/")
    if not path.is_dir():
        raise RecipeError(f"data folder {path} does not exist (looked there because of {why}); {fix}")
    missing = [f for f in required if not (path / f).is_file()]
    if missing:
        raise RecipeError(f"data folder {path} (from {why}) has no {', '.join(missing)}; {fix}")
    return path


def load_hub_dataset(args: argparse.Namespace) -> Any:
    """`datasets.load_dataset(--dataset_name)`, or a `RecipeError` that says why it is unavailable."""
    import datasets  # only with --dataset_name: a slow import most runs do not need

    try:
        return datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not reachable / not found" to the user
        raise RecipeError(f"could not load dataset {args.dataset_name!r} from the Hub ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); use --data_dir <local folder> "
                          "instead") from None


def take(items: list, limit: Optional[int]) -> list:
    return items if limit is None else items[:limit]


def require_nonempty(split: Sequence, name: str, where: str) -> None:
    if len(split) == 0:
        raise RecipeError(f"the {name} split is empty ({where}); it needs at least one example")


def check_labels_known(labels: Sequence[str], known: set[str], split: str, where: str) -> None:
    unseen = sorted(set(labels) - known)
    if unseen:
        raise RecipeError(f"the {split} split ({where}) has label(s) {', '.join(map(repr, unseen[:10]))} that never "
                          "occur in the training data, so the model cannot predict them; fix the data or add training "
                          "examples with these labels")



def label_set_and_slices(args: argparse.Namespace, splits: dict[str, list], where: dict[str, str],
                         labels_of: Callable[[Any], Iterable[str]]) -> tuple[list[str], dict[str, list]]:
    """The sorted label set of the whole training split, and {train, validation, test} cut to --max_train_samples
    / --max_eval_samples; an empty split, or an evaluation label never seen in training, is a `RecipeError`.

    As run_glue and run_ner do, the label set comes before --max_train_samples, so that a quick run on the first N
    rows of a file sorted by class (Banking77's train.csv is) keeps every class and the head of a full run.
    `labels_of(example)` gives an example's labels (a sentence's tags, a text's one label).
    """
    labels = sorted({label for example in splits["train"] for label in labels_of(example)})
    splits = {"train": take(splits["train"], args.max_train_samples),
              **{s: take(splits[s], args.max_eval_samples) for s in ("validation", "test")}}
    for split, examples in splits.items():
        require_nonempty(examples, split, where[split])
    for split in ("validation", "test"):
        check_labels_known([label for e in splits[split] for label in labels_of(e)], set(labels), split, where[split])
    return labels, splits


Example = tuple[str, str]  # (text, label)


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, with a leading byte-order mark dropped (Excel writes one before the header);
    other bytes are a `RecipeError` naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: byte {data[exc.start:exc.start + 1]!r} is not UTF-8 ({exc.reason}); save the "
                          "file as UTF-8") from None


def read_table(path: Path, text_column: str, label_column: str, delimiter: str = ",") -> list[Example]:
    """(text, label) rows of a CSV/TSV file with a header; bad rows raise a `RecipeError` naming file and line.

    CSV goes through a real CSV parser (Banking77 has quoted texts spanning lines); TSV is read unquoted (SST-2's
    sentences contain quote characters that are part of the text).
    """
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows: list[Example] = []
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        header = reader.fieldnames or []
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise RecipeError(f"{path}:1: the header {header} lacks column(s) {missing}; the file needs a header line "
                              f"with {text_column!r} and {label_column!r}")
        for row in reader:
            text, label = row.get(text_column), row.get(label_column)
            if None in row or text is None or label is None or label.strip() == "":
                raise RecipeError(f"{path}:{reader.line_num}: expected {len(header)} fields ({', '.join(header)}) "
                                  f"separated by {delimiter!r}, got {row.get(None) or 'fewer'}")
            rows.append((text.strip(), label.strip()))
    return rows


def hub_text_classification_splits(args: argparse.Namespace, split_names: dict[str, str],
                                   text_columns: Sequence[str] = ("text", "sentence")) -> dict[str, list[Example]]:
    """{our split: (text, label name)} from a Hub dataset; `split_names` maps our split names to the dataset's."""
    hub = load_hub_dataset(args)
    splits: dict[str, list[Example]] = {}
    for ours, theirs in split_names.items():
        if theirs not in hub:
            raise RecipeError(f"dataset {args.dataset_name!r} has no {theirs!r} split (it has {list(hub)})")
        data = hub[theirs]
        text_column = next((c for c in text_columns if c in data.column_names), None)
        if text_column is None or "label" not in data.column_names:
            raise RecipeError(f"dataset {args.dataset_name!r} needs a text column ({' or '.join(text_columns)}) and "
                              f"a 'label' column; it has {data.column_names}")
        feature = data.features["label"]
        name = feature.int2str if hasattr(feature, "int2str") else str
        splits[ours] = [(row[text_column], name(row["label"])) for row in data]
    return splits
