"""CoNLL files (one token per line, its tag in the last column) as a `Dataset` with the Hub conll2003's `tokens` /
`ner_tags` columns, so that a local file and `--dataset_name conll2003` reach the NER recipe in the same shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import RecipeError

TOKENS = "tokens"  # the column names of a token-classification split, as the Hub's conll2003
NER_TAGS = "ner_tags"


def read_conll(path: Path) -> Any:
    """A `Dataset` of a CoNLL file's sentences, columns `tokens` and `ner_tags` (tag strings), in file order.

    One token per line with its tag in the last column, a blank line between sentences, `-DOCSTART-` lines ignored; a
    line without a tag column raises a `RecipeError` naming file and line. The dataset lives in memory (reading is
    fast), so tokenizing it is not cached on disk.
    """
    import datasets

    sentences: dict[str, list[list[str]]] = {TOKENS: [], NER_TAGS: []}
    words: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            columns = line.split()
            if not columns or columns[0] == "-DOCSTART-":
                if words:
                    sentences[TOKENS].append(words)
                    sentences[NER_TAGS].append(tags)
                    words, tags = [], []
                continue
            if len(columns) < 2:
                raise RecipeError(f"{path}:{lineno}: expected a token and its tag separated by spaces (the tag in "
                                  f"the last column), got {line.rstrip()!r}")
            words.append(columns[0])
            tags.append(columns[-1])
    if words:
        sentences[TOKENS].append(words)
        sentences[NER_TAGS].append(tags)
    features = datasets.Features({TOKENS: datasets.Sequence(datasets.Value("string")),
                                  NER_TAGS: datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_dict(sentences, features=features)
