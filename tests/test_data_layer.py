"""recipes/common/data.py and conll.py: the recipes read their files through 🤗 Datasets and tokenize with
`Dataset.map`. The examples must be those of the hand-written readers this replaced (training on them is then
bit-identical), bad rows must still be reported as `path:line: ...`, and a cache must never serve an earlier file's or
setting's features nor write next to the data."""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import os
import sys
from pathlib import Path

import datasets
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "recipes"))

data = importlib.import_module("common.data")
conll = importlib.import_module("common.conll")
errors = importlib.import_module("common.errors")
text_classification = importlib.import_module("common.text_classification")


def old_read_table(path: Path, text_column: str, label_column: str, delimiter: str = ",") -> list[tuple[str, str]]:
    """The reader the recipes used before (recipes/_common.py read_table), the reference for "same examples"."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with io.StringIO(path.read_bytes().decode("utf-8-sig"), newline="") as f:
        return [(row[text_column].strip(), row[label_column].strip())
                for row in csv.DictReader(f, delimiter=delimiter, quoting=quoting)]


def old_read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """The CoNLL reader ner.py used before (main's ner.read_conll, errors left out)."""
    sentences, words, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        lines = list(f)
    for line in lines:
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        words.append(columns[0])
        tags.append(columns[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def old_csv_rows(path: Path) -> list[dict]:
    """The rows recommend.py read before (its `_rows`: csv.DictReader, UTF-8)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def rows(dataset) -> list[tuple[str, str]]:
    return list(zip(data.column(dataset, data.TEXT), data.column(dataset, data.LABEL)))


def tokenizer(tmp_path: Path):
    from transformers import BertTokenizerFast

    tmp_path.mkdir(parents=True, exist_ok=True)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
                                "good", "bad", "movie", "plot", "great"]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


# ----------------------------------------------------------------------------------------- the same examples
def test_tsv_keeps_quote_characters_and_spaces_as_the_old_reader(tmp_path):
    path = tmp_path / "train.tsv"
    lines = ["sentence\tlabel", 'a "great" plot \t1', '"quoted at the start\t0', "it 's 12\" tall , isn't it\t1",
             "NA\t0", "", "  null  \t 1 ", "'single' quotes\t0"]
    path.write_text("\n".join(lines) + "\n")
    got = rows(data.read_table(path, "sentence", "label", delimiter="\t"))
    assert got == [('a "great" plot', "1"), ('"quoted at the start', "0"), ("it 's 12\" tall , isn't it", "1"),
                   ("NA", "0"), ("null", "1"), ("'single' quotes", "0")]
    assert got == old_read_table(path, "sentence", "label", delimiter="\t")
    # A line of spaces only is skipped like a blank line (the old reader refused it).
    path.write_text("\n".join(lines[:2] + ["   "] + lines[2:]) + "\n")
    assert rows(data.read_table(path, "sentence", "label", delimiter="\t")) == got


def test_quoted_multiline_csv_with_a_bom_gives_the_old_readers_examples(tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # with a byte-order mark, as Excel saves it
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        writer.writerow(["my card\nhas not arrived,\r\nyet", "card_arrival"])
        writer.writerow(['he said "fee", twice', "extra_charge"])
        writer.writerow([" padded ", "  failed_transfer "])
        writer.writerow(["", "empty_text"])
        writer.writerow(["0012", "007"])  # stays a string: no number parsing
    got = rows(data.read_table(path, "text", "category"))
    assert got == [("my card\nhas not arrived,\r\nyet", "card_arrival"), ('he said "fee", twice', "extra_charge"),
                   ("padded", "failed_transfer"), ("", "empty_text"), ("0012", "007")]
    assert got == old_read_table(path, "text", "category")


def test_conll_dataset_has_the_hub_columns_and_every_sentence(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nJohn NNP B-NP B-PER\nlives VBZ B-VP O\n\n\nParis B-LOC\n"
                    "-DOCSTART- -X- -X- O\nAcme B-ORG\nCorp I-ORG")
    dataset = conll.read_conll(path)
    assert dataset.column_names == ["tokens", "ner_tags"]
    assert dataset.to_list() == [{"tokens": ["John", "lives"], "ner_tags": ["B-PER", "O"]},
                                 {"tokens": ["Paris"], "ner_tags": ["B-LOC"]},
                                 {"tokens": ["Acme", "Corp"], "ner_tags": ["B-ORG", "I-ORG"]}]


def test_conll_and_movielens_files_give_the_old_readers_examples(tmp_path):
    import ner
    import recommend

    path = tmp_path / "train.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\t\n  \nGerman JJ B-NP B-MISC\n"
                    "call\tNN I-NP O\n\n\n-DOCSTART- -X- O\nPeter NNP B-PER\nBlackburn NNP I-PER")
    old = old_read_conll(path)
    assert len(old) == 3
    assert list(zip(data.column(conll.read_conll(path), conll.TOKENS),
                    data.column(conll.read_conll(path), conll.NER_TAGS))) == old
    # The NER features: those of one tokenizer call over all sentences, as ner.py computed them before.
    tok = tokenizer(tmp_path / "tok")
    label2id = {tag: i for i, tag in enumerate(sorted({t for _, tags in old for t in tags}))}
    encoded = tok([words for words, _ in old], is_split_into_words=True, truncation=True, max_length=4)
    expected = []
    for i, (_, tags) in enumerate(old):
        labels, previous = [], None
        for word in encoded.word_ids(i):
            labels.append(-100 if word is None or word == previous else label2id[tags[word]])
            previous = word
        expected.append({"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
                         "labels": labels, "index": i})
    assert ner.tokenize(tok, conll.read_conll(path), label2id, 4) == expected

    movies = tmp_path / "movies.csv"
    movies.write_text('movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n'
                      '11,"American President, The (1995)",Comedy|Drama|Romance\n'
                      '2,"Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1964)",Comedy\n'
                      '3,"""Great Performances"" Cats (1998)",Musical\n4, Padded title ,(no genres listed)\n'
                      '007,NA,\n')
    old_movies = {int(r["movieId"]): (r["title"].strip(), [] if r["genres"] in ("", "(no genres listed)")
                                      else r["genres"].split("|")) for r in old_csv_rows(movies)}
    assert {k: (m.title, m.genres) for k, m in recommend.read_movies(movies).items()} == old_movies
    assert old_movies[3][0] == '"Great Performances" Cats (1998)' and old_movies[7] == ("NA", [])
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,0.5,964981247\n12,007,5,1\n")
    assert recommend.read_ratings(ratings) == [
        recommend.Rating(int(r["userId"]), int(r["movieId"]), float(r["rating"]), int(r["timestamp"]))
        for r in old_csv_rows(ratings)]


def test_tokenized_rows_are_those_of_one_tokenizer_call_in_file_order(tmp_path):
    tok = tokenizer(tmp_path)
    path = tmp_path / "dev.tsv"
    texts = [f"good movie {'plot ' * (i % 7)}" for i in range(2500)]  # > one map batch of 1000
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)))
    features = data.tokenize(data.read_table(path, "sentence", "label", delimiter="\t"),
                              text_classification.classification_features, "test", tokenizer=tok, label2id={"0": 0, "1": 1},
                              max_length=6)
    encoded = tok([t.strip() for t in texts], truncation=True, max_length=6)
    assert features == [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
                         "labels": i % 2, "index": i} for i in range(len(texts))]


# ------------------------------------------------------------------------------------------ file:line errors
def recipe_error(match: str, function, *args, **kwargs) -> str:
    with pytest.raises(errors.RecipeError) as info:
        function(*args, **kwargs)
    assert match in str(info.value), str(info.value)
    return str(info.value)


def test_rows_without_a_label_or_with_extra_fields_name_their_line(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\ngood\t1\n\nno label here\nbad\t0\n")
    message = recipe_error(f"{tsv}:4: expected 2 fields (sentence, label) separated by '\\t', got fewer",
                           data.read_table, tsv, "sentence", "label", delimiter="\t")
    tsv.write_text("sentence\tlabel\ngood\t1\nbad\t0\tmore\n")  # pandas' ParserError, translated
    message = recipe_error(f"{tsv}:3: expected 2 fields (sentence, label) separated by '\\t', got ['more']",
                           data.read_table, tsv, "sentence", "label", delimiter="\t")
    assert "Traceback" not in message and "C error" not in message
    tsv.write_text("sentence\tlabel\ngood\t1\nbad\t   \n")
    recipe_error(f"{tsv}:3: expected 2 fields", data.read_table, tsv, "sentence", "label", delimiter="\t")

    # Line numbers count physical lines, also after a quoted text that spans three of them.
    csv_file = tmp_path / "train.csv"
    csv_file.write_text('text,category\n"a\nlong\ntext",x\nshort,y,extra\n')
    recipe_error(f"{csv_file}:5: expected 2 fields (text, category) separated by ',', got ['extra']",
                 data.read_table, csv_file, "text", "category")


def test_a_header_without_rows_is_an_empty_split_not_a_parser_error(tmp_path):
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("sentence\tlabel\n")  # the recipes then report "the validation split is empty (<file>)"
    empty = data.read_table(tsv, "sentence", "label", delimiter="\t")
    assert len(empty) == 0 and empty.column_names == ["text", "label"]


def test_header_and_encoding_errors_name_the_file_line_and_fix(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text("text\tlabel\ngood\t1\n")
    recipe_error(f"{tsv}:1: the header ['text', 'label'] lacks column(s) ['sentence']", data.read_table, tsv,
                 "sentence", "label", delimiter="\t")
    assert "--text_column_name" in recipe_error("--label_column_name", data.read_table, tsv, "sentence", "label",
                                                delimiter="\t")
    tsv.write_bytes(b"sentence\tlabel\ngood\t1\nd\xe9j\xe0 vu\t0\n")
    recipe_error(f"{tsv}:3: byte b'\\xe9' is not UTF-8", data.read_table, tsv, "sentence", "label", delimiter="\t")


def test_movielens_and_conll_errors_keep_their_lines(tmp_path):
    import recommend

    ratings = tmp_path / "ratings.csv"
    ratings.write_text("userId,movieId,rating,timestamp\n1,2,4.0,100\n\n  \n1,3,four,100\n")
    recipe_error(f"{ratings}:5: userId, movieId and timestamp must be integers", recommend.read_ratings, ratings)
    ratings.write_text("userId,movieId,rating,timestamp\n1,2,4.0,100\n1,3,4.0\n")
    recipe_error(f"{ratings}:3: expected the fields ['userId', 'movieId', 'rating', 'timestamp']",
                 recommend.read_ratings, ratings)
    movies = tmp_path / "movies.csv"
    movies.write_text('movieId,title,genres\n1,"Heat, the film (1995)",Action|Crime\n2,"Toy Story (1995)"\n')
    recipe_error(f"{movies}:3: expected the fields", recommend.read_movies, movies)
    movies.write_text('movieId,title,genres\n1,"Heat, the film (1995)",Action|Crime\n2,No genres,\n')
    assert {k: (m.title, m.genres) for k, m in recommend.read_movies(movies).items()} == {
        1: ("Heat, the film (1995)", ["Action", "Crime"]), 2: ("No genres", [])}

    conll_file = tmp_path / "valid.txt"
    conll_file.write_text("John B-PER\n\nlonelytoken\n")
    recipe_error(f"{conll_file}:3: expected a token and its tag", conll.read_conll, conll_file)


# ------------------------------------------------------------------------------------------------ column flags
def test_column_flags_choose_the_columns_of_local_files(tmp_path):
    import intent
    import sentiment

    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        (sst2 / name).write_text("id\treview\tstars\n1\tgood movie\tpos\n2\tbad plot\tneg\n")
    args = sentiment.parse_args(["--data_dir", str(sst2), "--text_column_name", "review",
                                 "--label_column_name", "stars"])
    splits, _ = sentiment.load_splits(args)
    assert rows(splits["test"]) == [("good movie", "pos"), ("bad plot", "neg")]
    recipe_error("lacks column(s) ['sentence', 'label']", sentiment.load_splits, sentiment.parse_args(["--data_dir", str(sst2)]))

    banking = tmp_path / "banking"
    banking.mkdir()
    for name in ("train.csv", "test.csv"):
        (banking / name).write_text("query,intent\n" + "".join(f"q{i},{'ab'[i % 2]}\n" for i in range(20)))
    splits, _ = intent.load_splits(intent.parse_args(["--data_dir", str(banking), "--text_column_name", "query",
                                                      "--label_column_name", "intent"]))
    assert sorted(rows(splits["train"]) + rows(splits["validation"])) == sorted(rows(splits["test"]))
    assert len(splits["validation"]) == 2  # 10 % of each class


def test_column_flags_choose_the_columns_of_hub_datasets(monkeypatch):
    import ner
    import sentiment

    labels = datasets.ClassLabel(names=["neg", "pos"])
    sst = datasets.Dataset.from_dict({"review": ["good", "bad"], "sentence": ["x", "y"], "stars": [1, 0]},
                                     features=datasets.Features({"review": datasets.Value("string"),
                                                                 "sentence": datasets.Value("string"),
                                                                 "stars": labels}))
    monkeypatch.setattr(data, "load_hub_dataset", lambda args: datasets.DatasetDict(
        train=sst, validation=sst, test=sst))
    splits, where = sentiment.load_splits(sentiment.parse_args(["--dataset_name", "someone/reviews",
                                                                "--text_column_name", "review",
                                                                "--label_column_name", "stars"]))
    assert rows(splits["train"]) == [("good", "pos"), ("bad", "neg")] and where["test"] == "someone/reviews[test]"
    recipe_error("'label' column", sentiment.load_splits, sentiment.parse_args(["--dataset_name", "someone/reviews"]))

    tags = datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER"]))
    conll = datasets.Dataset.from_dict({"words": [["John", "runs"]], "tags": [[1, 0]]},
                                       features=datasets.Features({"words": datasets.Sequence(datasets.Value("string")),
                                                                   "tags": tags}))
    monkeypatch.setattr(ner, "load_hub_dataset", lambda args: datasets.DatasetDict(
        train=conll, validation=conll, test=conll))
    splits, _ = ner.load_splits(ner.parse_args(["--dataset_name", "someone/ner", "--text_column_name", "words",
                                                "--label_column_name", "tags"]))
    assert splits["validation"].to_list() == [{"tokens": ["John", "runs"], "ner_tags": ["B-PER", "O"]}]
    recipe_error("--text_column_name", ner.load_splits, ner.parse_args(["--dataset_name", "someone/ner"]))
    # CoNLL files have no named columns: the flags are refused rather than ignored.
    recipe_error("drop these flags", ner.load_splits, ner.parse_args(["--text_column_name", "words"]))


# ----------------------------------------------------------------------------------------------------- caching
def test_cache_follows_the_file_the_tokenizer_and_max_length(tmp_path):
    tok = tokenizer(tmp_path)
    path = tmp_path / "train.tsv"
    label2id = {"0": 0, "1": 1}

    def features(max_length: int = 8):
        dataset = data.read_table(path, "sentence", "label", delimiter="\t")
        return dataset, data.tokenize(dataset, text_classification.classification_features, "test", tokenizer=tok,
                                       label2id=label2id, max_length=max_length)

    path.write_text("sentence\tlabel\ngood movie\t1\nbad plot\t0\n")
    first, before = features()
    assert first.cache_files, "a load_dataset-backed dataset is cached on disk"
    again, same = features()
    assert same == before and again.cache_files == first.cache_files  # unchanged file: the cache is reused
    path.write_text("sentence\tlabel\nbad movie\t0\ngood plot\t1\n")  # same size, new content and mtime
    changed, after = features()
    assert rows(changed) == [("bad movie", "0"), ("good plot", "1")]
    assert after == [{**f, "input_ids": tok(t)["input_ids"], "labels": y}
                     for f, t, y in zip(before, ["bad movie", "good plot"], [0, 1])]
    assert [f["input_ids"] for f in features(max_length=3)[1]] == [tok(t, truncation=True, max_length=3)["input_ids"]
                                                                  for t in ["bad movie", "good plot"]]
    other = tokenizer(tmp_path / "other")
    other.add_tokens(["badmovie"])  # a different tokenizer state: the map fingerprint must change with it
    path.write_text("sentence\tlabel\nbadmovie\t0\ngood plot\t1\n")
    _, before_other = features()
    tok = other
    _, with_other = features()
    assert before_other[0]["input_ids"] != with_other[0]["input_ids"] == other("badmovie")["input_ids"]


def test_reading_and_tokenizing_never_write_next_to_the_data(tmp_path):
    tok = tokenizer(tmp_path / "tok")
    folder = tmp_path / "sst2"
    folder.mkdir()
    path = folder / "train.tsv"
    path.write_text("sentence\tlabel\ngood movie\t1\nbad plot\t0\n")
    before = sorted(p.name for p in folder.rglob("*"))
    dataset = data.read_table(path, "sentence", "label", delimiter="\t")
    features = text_classification.tokenize(tok, dataset, ["0", "1"], 8)
    assert sorted(p.name for p in folder.rglob("*")) == before == ["train.tsv"]
    cache = Path(datasets.config.HF_DATASETS_CACHE).resolve()
    assert dataset.cache_files and all(Path(f["filename"]).resolve().is_relative_to(cache) for f in dataset.cache_files)
    # The tokenization is cached there too: the same call again is read back, not computed into a new file.
    arrow_files = set(Path(dataset.cache_files[0]["filename"]).parent.glob("*.arrow"))
    assert text_classification.tokenize(tok, dataset, ["0", "1"], 8) == features
    assert set(Path(dataset.cache_files[0]["filename"]).parent.glob("*.arrow")) == arrow_files


def test_cache_follows_the_content_of_a_file_replaced_with_the_same_modification_time(tmp_path):
    # datasets keys a local file by its mtime only; `cp -p`, `rsync -a` or `touch -r` keep it across a new content.
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood movie\t1\n")
    stamp = path.stat()
    assert rows(data.read_table(path, "sentence", "label", delimiter="\t")) == [("good movie", "1")]
    path.write_text("sentence\tlabel\nbad plot!!\t0\n")
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_mtime_ns == stamp.st_mtime_ns
    assert rows(data.read_table(path, "sentence", "label", delimiter="\t")) == [("bad plot!!", "0")]


def test_take_and_column_on_datasets():
    dataset = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": ["x", "y", "x"]})
    assert data.column(data.take(dataset, 2), "text") == ["a", "b"]
    assert data.take(dataset, None) is dataset and len(data.take(dataset, 10)) == 3
    assert isinstance(data.column(dataset.select([2, 0]), "label"), list)
    assert data.column(dataset.select([2, 0]), "text") == ["c", "a"]


def test_add_column_args_defaults_to_none():
    parser = argparse.ArgumentParser()
    data.add_column_args(parser.add_argument_group("data"), "text", "label")
    assert vars(parser.parse_args([])) == {"text_column_name": None, "label_column_name": None}


# ------------------------------------------------------------------------------------------------ JSON Lines
def instruct_module():
    return importlib.import_module("instruct")


def test_jsonl_through_datasets_gives_the_examples_of_a_line_by_line_json_read(tmp_path):
    rows = [{"prompt": "copy a, b", "response": "a, b"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi \"there\""},
                          {"role": "assistant", "content": "hello\nworld"}]},
            {"prompt": "é ü", "response": "", "id": 3}]
    path = tmp_path / "train.jsonl"
    path.write_text("\ufeff" + json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n",
                    encoding="utf-8")
    instruct = instruct_module()
    expected = [instruct.to_messages(row, "row") for row in rows]  # what a json.loads per line gives
    assert instruct.read_jsonl(path) == expected
    dataset, lines = data.load_jsonl(path, instruct.to_messages)
    assert isinstance(dataset, datasets.Dataset) and lines == [1, 3, 4]


def test_jsonl_errors_name_the_line(tmp_path):
    instruct = instruct_module()
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c" "response": "d"}\n')
    recipe_error(f"{bad_json}:3: not valid JSON", instruct.read_jsonl, bad_json)
    # pyarrow refuses a field whose type changes between rows; the line scan names the row the recipe rejects.
    bad_type = tmp_path / "type.jsonl"
    bad_type.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": 5}\n')
    recipe_error(f"{bad_type}:2: expected", instruct.read_jsonl, bad_type)
    # A row of the wrong shape that pyarrow reads (another field name) is rejected with its line too.
    bad_field = tmp_path / "field.jsonl"
    bad_field.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "answer": "d"}\n')
    recipe_error(f"{bad_field}:2: expected", instruct.read_jsonl, bad_field)
