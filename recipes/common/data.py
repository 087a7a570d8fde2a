"""Where a recipe's data comes from and how it is read, on 🤗 Datasets as in Transformers' `run_*_no_trainer.py`
examples: the data folder, local CSV/TSV files through `datasets.load_dataset("csv", data_files=...)` (JSON Lines
through `load_dataset("json", ...)`), Hub datasets,
tokenization with a batched `Dataset.map`, and the checks on the splits (sample limits, empty splits, labels never
seen in training). CoNLL files are read by `conll.py`.

Caching: a `load_dataset` result and every `map` over it are cached under `HF_DATASETS_CACHE` (never next to the data
files: the shared data folder is read-only), keyed by fingerprints that change with the data file (its modification
time and a hash of its content), the reading options, the tokenizer and the mapping's arguments (`max_length`, the label ids), so a cache never
returns features of an earlier file or setting. Local files need no network (`HF_DATASETS_OFFLINE=1` works).

Errors keep the `path:line: ...` form of the hand-written readers this replaced: when pandas (under `datasets`)
rejects a file, or a row lacks a field, the file is scanned with Python's `csv` module (only then) to name the line.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
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
    import datasets

    try:
        return datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not reachable / not found" to the user
        raise RecipeError(f"could not load dataset {args.dataset_name!r} from the Hub ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); use --data_dir <local folder> "
                          "instead") from None


def require_nonempty(split: Sequence, name: str, where: str) -> None:
    if len(split) == 0:
        raise RecipeError(f"the {name} split is empty ({where}); it needs at least one example")


def check_labels_known(labels: Sequence[str], known: set[str], split: str, where: str) -> None:
    unseen = sorted(set(labels) - known)
    if unseen:
        raise RecipeError(f"the {split} split ({where}) has label(s) {', '.join(map(repr, unseen[:10]))} that never "
                          "occur in the training data, so the model cannot predict them; fix the data or add training "
                          "examples with these labels")



# ------------------------------------------------------------------------------------------- splits and columns
TEXT = "text"  # the column names of a text-classification split, whatever the file calls them
LABEL = "label"


def add_column_args(group: argparse._ArgumentGroup, text: str, label: str) -> None:
    """`--text_column_name` / `--label_column_name` as in run_ner_no_trainer.py; `text`, `label` describe the
    default (None: the task's own columns)."""
    group.add_argument("--text_column_name", default=None, help=f"Column of the inputs. Default: {text}.")
    group.add_argument("--label_column_name", default=None, help=f"Column of the labels. Default: {label}.")


def take(items: Any, limit: Optional[int]) -> Any:
    """The first `limit` examples of a `Dataset` or list (all with None), as --max_train_samples / --max_eval_samples."""
    if limit is None:
        return items
    return items.select(range(min(limit, len(items)))) if hasattr(items, "select") else items[:limit]


def column(dataset: Any, name: str) -> list:
    """A column as a list. (`dataset[name]` is a lazy `Column` on datasets >= 4, slow to iterate row by row.)"""
    return dataset[name][:]


def label_set_and_slices(args: argparse.Namespace, splits: dict[str, Any], where: dict[str, str],
                         label_column: str) -> tuple[list[str], dict[str, Any]]:
    """The sorted label set of the whole training split, and {train, validation, test} cut to --max_train_samples
    / --max_eval_samples; an empty split, or an evaluation label never seen in training, is a `RecipeError`.

    As run_glue and run_ner do, the label set comes before --max_train_samples, so that a quick run on the first N
    rows of a file sorted by class (Banking77's train.csv is) keeps every class and the head of a full run.
    `label_column` holds an example's label (a text's) or its list of labels (a sentence's tags).
    """
    def labels_of(split: Any) -> list[str]:
        values = column(split, label_column)
        return [tag for tags in values for tag in tags] if values and isinstance(values[0], list) else values

    labels = sorted(set(labels_of(splits["train"])))
    splits = {"train": take(splits["train"], args.max_train_samples),
              **{s: take(splits[s], args.max_eval_samples) for s in ("validation", "test")}}
    for split, examples in splits.items():
        require_nonempty(examples, split, where[split])
    for split in ("validation", "test"):
        check_labels_known(labels_of(splits[split]), set(labels), split, where[split])
    return labels, splits


def tokenize(dataset: Any, function: Callable[..., dict], desc: str, **fn_kwargs: Any) -> list[dict]:
    """`dataset.map(function, batched=True, with_indices=True)` into new columns only, as rows: `function(batch,
    indices, **fn_kwargs)` returns the columns. Cached when `dataset` is (the fingerprint covers `function` and
    `fn_kwargs`: the tokenizer, max_length, label ids).

    The rows come back as plain dicts (`Dataset.to_list`): the train loop, length-grouped sampler and eval loaders
    index single rows, which costs ~0.1 ms each on a `Dataset` and nothing on a list.
    """
    return dataset.map(function, batched=True, with_indices=True, remove_columns=dataset.column_names,
                       fn_kwargs=fn_kwargs, desc=desc).to_list()


# ---------------------------------------------------------------------------------------------- reading errors
def _decoded(path: Path, data: Optional[bytes] = None) -> str:
    """The file's text (`data`, else read from `path`) as the readers see it: UTF-8, a leading byte-order mark
    dropped (Excel writes one); other bytes are a `RecipeError` naming file and line."""
    data = Path(path).read_bytes() if data is None else data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: byte {data[exc.start:exc.start + 1]!r} is not UTF-8 ({exc.reason}); save the "
                          "file as UTF-8") from None


def _quoting(delimiter: str) -> int:
    # SST-2's sentences contain quote characters that are part of the text; CSV files (Banking77, MovieLens) quote
    # texts that hold commas or span lines.
    return csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL


def scan_rows(path: Path, delimiter: str = ",") -> Iterator[tuple[int, dict]]:
    """(line number, row) of each data row as Python's `csv.DictReader` parses it, the rows pandas reads: the line
    numbers for errors. A row with too many fields has a `None` key (the extra values), one with too few has `None`
    values."""
    with io.StringIO(_decoded(path), newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=_quoting(delimiter))
        for row in reader:
            first, *rest = row.values()
            if None not in row and not first.strip() and all(v is None for v in rest):
                continue  # a line of spaces only: pandas skips it like a blank line
            yield reader.line_num, row


def line_of_row(path: Path, index: int, delimiter: str = ",") -> int:
    """The line (1-based) on which data row `index` (0-based, as in the `Dataset`) ends."""
    for i, (line, _) in enumerate(scan_rows(path, delimiter)):
        if i == index:
            return line
    raise ValueError(f"{path} has no data row {index}")


def _root_cause(exc: BaseException) -> BaseException:
    # `datasets` wraps a builder's error in DatasetGenerationError; the parser's own error is at the end of the chain.
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


# ------------------------------------------------------------------------------------------------ CSV and TSV
def _content_name(raw: bytes) -> str:
    """The config name a local file is loaded under. `datasets` keys a local file's cache by its modification time
    only, so a file replaced by one with the same time (`cp -p`, `rsync -a`, `touch -r`) would be served from the old
    cache: the name adds a hash of the content."""
    return f"sha256-{hashlib.sha256(raw).hexdigest()[:16]}"


def load_csv(path: Path, columns: Sequence[str], delimiter: str = ",",
             bad_row: Optional[Callable[[dict], bool]] = None,
             describe: Optional[Callable[[int, dict, list[str]], str]] = None,
             missing_hint: str = "") -> Any:
    """A `Dataset` of a CSV/TSV file with a header, every column a string exactly as written in the file.

    `columns` must be in the header (else `path:1: ...`). `bad_row(row)` says which rows the caller rejects, in
    `csv.DictReader` terms (see `scan_rows`), and `describe(line, row, header)` the error text after `path:line: `;
    they are checked only when the parser fails or a field of `columns` is blank (pandas reads a missing field as
    empty), so a good file is parsed by `datasets` alone. Rows of whitespace only are skipped like blank lines.
    """
    import datasets
    import pyarrow.compute as pc

    path = Path(path)
    raw = path.read_bytes()
    text = _decoded(path, raw)
    header = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=_quoting(delimiter)), [])
    missing = [c for c in columns if c not in header]
    if missing:
        raise RecipeError(f"{path}:1: the header {header} lacks column(s) {missing}{missing_hint}")
    if len(set(header)) != len(header):
        raise RecipeError(f"{path}:1: the header {header} repeats a column name; give each column its own name")

    def structural_error() -> Optional[RecipeError]:
        found = None if bad_row is None else next(((n, row) for n, row in scan_rows(path, delimiter) if bad_row(row)),
                                                  None)
        return None if found is None else RecipeError(f"{path}:{found[0]}: {describe(*found, header)}")

    features = datasets.Features({name: datasets.Value("string") for name in header})
    if not text.partition("\n")[2].strip():
        # A header and no rows: `load_dataset` refuses a file without data; the recipes report an empty split.
        return datasets.Dataset.from_dict({name: [] for name in header}, features=features)
    try:
        dataset = datasets.load_dataset(
            "csv", name=_content_name(raw), data_files={"data": str(path)},
            split="data", delimiter=delimiter, quoting=_quoting(delimiter), encoding="utf-8-sig",
            keep_default_na=False, index_col=False, features=features)
    except Exception as exc:  # noqa: BLE001 - any parser failure becomes the file:line error of the row at fault
        cause = _root_cause(exc)
        if isinstance(cause, UnicodeDecodeError):
            _decoded(path)  # raises the file:line error
        error = structural_error()
        if error is not None:
            raise error from None
        raise RecipeError(f"{path}: could not be parsed as {'TSV' if delimiter == chr(9) else 'CSV'} "
                          f"({type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause) else ''}); "
                          "check its quoting and field separators") from None
    blank = [pc.any(pc.equal(pc.utf8_trim_whitespace(pc.fill_null(dataset.data.column(c), "")), "")).as_py()
             for c in columns]
    if any(blank):
        error = structural_error()
        if error is not None:
            raise error
    return dataset


# ------------------------------------------------------------------------------------------------ JSON Lines
def load_jsonl(path: Path, check_row: Callable[[Any, str], Any]) -> tuple[Any, list[int]]:
    """A `Dataset` of a JSON Lines file (`datasets.load_dataset("json", data_files=...)`, one object a line, blank
    lines skipped) and the line number of each row, for the caller's `path:line` errors.

    When `datasets` (pyarrow) refuses the file, each line is read with Python's `json` and given to
    `check_row(row, "path:line")` (which raises a `RecipeError` for a row the caller rejects), so the error names the
    line at fault: not JSON, or a row of the wrong shape (pyarrow also refuses a field whose type changes between rows).
    """
    import datasets

    path = Path(path)
    raw = path.read_bytes()
    text = _decoded(path, raw)
    lines = [n for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        return datasets.Dataset.from_dict({}), []
    try:
        dataset = datasets.load_dataset("json", name=_content_name(raw),
                                        data_files={"data": str(path)}, split="data")
    except Exception as exc:  # noqa: BLE001 - any parser failure becomes the file:line error of the row at fault
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as bad:
                    raise RecipeError(f"{path}:{n}: not valid JSON ({bad.msg})") from None
                check_row(row, f"{path}:{n}")
        cause = _root_cause(exc)
        raise RecipeError(f"{path}: could not be read as JSON Lines ({type(cause).__name__}: "
                          f"{str(cause).strip().splitlines()[0] if str(cause) else ''}); give every line one JSON "
                          "object whose fields have the same types on every line") from None
    if len(dataset) != len(lines):
        raise RecipeError(f"{path}: {len(lines)} non-blank lines but {len(dataset)} rows were read; give every line "
                          "one JSON object (JSON Lines), not arrays or objects spanning lines")
    return dataset, lines


def read_table(path: Path, text_column: str, label_column: str, delimiter: str = ",") -> Any:
    """A `Dataset` of stripped `text` and `label` strings from a CSV/TSV file with a header; a row without a label
    raises a `RecipeError` naming file and line."""
    def bad(row: dict) -> bool:
        text, label = row.get(text_column), row.get(label_column)
        return None in row or text is None or label is None or label.strip() == ""

    def describe(line: int, row: dict, header: list[str]) -> str:
        return (f"expected {len(header)} fields ({', '.join(header)}) separated by {delimiter!r}, got "
                f"{row.get(None) or 'fewer'}")

    dataset = load_csv(path, (text_column, label_column), delimiter, bad, describe,
                       missing_hint=f"; the file needs a header line with {text_column!r} and {label_column!r} (or "
                                    "pass --text_column_name / --label_column_name)")

    def strip(batch: dict) -> dict:
        return {TEXT: [t.strip() for t in batch[text_column]], LABEL: [y.strip() for y in batch[label_column]]}

    if len(dataset) == 0:  # `map` never calls `strip`, so it would leave no columns at all
        return dataset.select_columns([text_column, label_column]).rename_columns(
            {text_column: TEXT, label_column: LABEL})
    return dataset.map(strip, batched=True, remove_columns=dataset.column_names, desc=f"Reading {path.name}")


def hub_text_classification_splits(args: argparse.Namespace, split_names: dict[str, str],
                                   text_columns: Sequence[str] = ("text", "sentence")) -> dict[str, Any]:
    """{our split: `Dataset` of `text` and `label` (the label's name)} from --dataset_name; `split_names` maps our
    split names to the dataset's. The text column is --text_column_name, else the first of `text_columns` it has; the
    label column is --label_column_name, else "label"."""
    hub = load_hub_dataset(args)
    text_columns = [args.text_column_name] if getattr(args, "text_column_name", None) else list(text_columns)
    label_column = getattr(args, "label_column_name", None) or "label"
    splits: dict[str, Any] = {}
    for ours, theirs in split_names.items():
        if theirs not in hub:
            raise RecipeError(f"dataset {args.dataset_name!r} has no {theirs!r} split (it has {list(hub)})")
        data = hub[theirs]
        text_column = next((c for c in text_columns if c in data.column_names), None)
        if text_column is None or label_column not in data.column_names:
            raise RecipeError(f"dataset {args.dataset_name!r} needs a text column ({' or '.join(text_columns)}) and "
                              f"a {label_column!r} column; it has {data.column_names}: pass --text_column_name / "
                              "--label_column_name")
        feature = data.features[label_column]
        name = feature.int2str if hasattr(feature, "int2str") else str

        def rename(batch: dict, text_column: str = text_column, name: Callable = name) -> dict:
            return {TEXT: batch[text_column], LABEL: [name(y) for y in batch[label_column]]}

        splits[ours] = data.map(rename, batched=True, remove_columns=data.column_names)
    return splits
