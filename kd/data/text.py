"""Text data: a user's own ``text:PATH`` data set and its tokenizer (the text models are in :mod:`kd.models`).

``PATH/train.*`` and ``PATH/val.*`` (or ``test.*``) are CSV, TSV, JSON Lines or JSON files with a text column and
a label column (``--text-column``, ``--label-column``; default ``text`` and ``label``). Labels are names or
integers; the classes are the training file's labels, sorted (integers by value, named by their strings).

Text becomes token ids once, when the data set is loaded: word n-grams (and optionally each word's character
n-grams) looked up in a vocabulary built from the training split, or hashed into a fixed number of buckets
(:class:`NgramTokenizer`), or a local Hugging Face directory's own tokenizer (``hf:DIR``, :class:`HFTokenizer`).
Either is saved in the run directory as JSON (``tokenizer.json``), and whatever later reads the run (its
students, its cache, its proxy export, ``kd report``) encodes with that file, so token ids mean the same thing.

A text data set is a map-style :class:`TextDataset` of variable-length token-id tensors; its ``collate`` pads
each batch to its longest sequence (id :data:`PAD_ID`) after cutting each at the tokenizer's ``max_length``.
The models (:class:`kd.models.FastText`, :class:`kd.models.TextTransformer`, ``hf:DIR``) find the padding by its id.

For the model table a text data set's "channels" are its token ids (``DatasetInfo.channels`` = vocabulary
size) and its "image size" is the maximum sequence length, so ``create_model(name, K, vocab_size, max_length)``
builds a text model and a run's ``summary.json`` (``in_channels``, ``image_size``) rebuilds it.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from kd.data.tensors import DataSplit, DatasetInfo
from kd.errors import KDError
from kd.runs import atomic_write

TEXT_PREFIX = "text:"
HF_PREFIX = "hf:"
#: The file a text run keeps its tokenizer in (JSON).
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FORMAT = "proxykd-text-tokenizer-v1"
PAD_ID, UNK_ID = 0, 1   # proxykd's tokenizer: ids 0 and 1 are padding and unknown words; n-grams start at 2
FIRST_ID = 2
#: Suffixes a text file may have, and how pandas reads each.
TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
CHAR_MIN = 3            # character n-grams have lengths 3..--char-ngrams (fastText's subwords)
NGRAM_MIN_COUNT = 2     # a vocabulary keeps word n-grams of order >= 2 and character n-grams seen this often
WORD = re.compile(r"\w+|[^\w\s]")  # words, and each punctuation mark on its own
INTEGER = re.compile(r"[+-]?\d+")  # labels that are all integers sort by value
NEWLINE = b"\n"
TEXT_MODELS = ("fasttext", "text-transformer")


def text_path(name: str | None) -> Path | None:
    """PATH of a ``text:PATH`` data set name, None for any other name."""
    if not name or not str(name).lower().startswith(TEXT_PREFIX):
        return None
    rest = str(name)[len(TEXT_PREFIX):].strip()
    if not rest:
        raise KDError("text: needs a folder: --dataset text:PATH with PATH/train.csv and PATH/test.csv "
                      "(or .tsv, .jsonl, .json; val.* in place of test.*)")
    return Path(rest).expanduser()


def hf_path(name: str | None) -> Path | None:
    """DIR of an ``hf:DIR`` model or tokenizer name, None for any other name."""
    if not name or not str(name).startswith(HF_PREFIX):
        return None
    rest = str(name)[len(HF_PREFIX):].strip()
    if not rest:
        raise KDError("hf: needs a folder: hf:DIR, a local Hugging Face model directory (config.json, weights, "
                      "tokenizer files)")
    return Path(rest).expanduser()


def is_text_model(name: str) -> bool:
    """Whether a model name builds a network that reads token ids (fasttext, text-transformer, hf:DIR)."""
    return name in TEXT_MODELS or str(name).startswith(HF_PREFIX)


# ---------------------------------------------------------------------------------------
# Options (TrainConfig's text fields)


@dataclass(frozen=True)
class TextOptions:
    """How a ``text:PATH`` data set is read and encoded; the defaults are what None means in TrainConfig."""

    text_column: str = "text"
    label_column: str = "label"
    tokenizer: str | None = None   # a proxykd tokenizer.json (a run's), or hf:DIR; None: built from the training split
    max_length: int = 256          # tokens kept per sample (the collate cuts the rest)
    hash_buckets: int = 0          # > 0: n-grams hashed into this many ids instead of a vocabulary
    word_ngrams: int = 2           # word n-grams up to this order
    char_ngrams: int = 0           # > 0: also each word's character n-grams of length 3..this
    max_vocab: int = 100_000       # the vocabulary keeps the most frequent this many n-grams

    def check(self) -> "TextOptions":
        """Refuse impossible values in one line."""
        for name, low in (("max_length", 1), ("hash_buckets", 0), ("word_ngrams", 1), ("max_vocab", 1)):
            if getattr(self, name) < low:
                raise KDError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if self.char_ngrams and self.char_ngrams < CHAR_MIN:
            raise KDError(f"--char-ngrams takes 0 (none) or a longest length >= {CHAR_MIN}, got {self.char_ngrams}")
        if not self.text_column or not self.label_column or self.text_column == self.label_column:
            raise KDError(f"--text-column and --label-column must name two different columns, got "
                          f"'{self.text_column}' and '{self.label_column}'")
        return self


#: TrainConfig fields that set :class:`TextOptions` (None: the option's default).
TEXT_FIELDS = tuple(f.name for f in fields(TextOptions))


def text_options(cfg: Any) -> TextOptions | None:
    """The text options of a run config: None for an image data set (where giving any of them is refused),
    else :class:`TextOptions` with the given fields; an ``hf:DIR`` model encodes with its own tokenizer."""
    given = {k: getattr(cfg, k, None) for k in TEXT_FIELDS if getattr(cfg, k, None) is not None}
    if text_path(cfg.dataset) is None:
        if given:
            flag = next(iter(given)).replace("_", "-")
            raise KDError(f"--{flag} applies to text:PATH data sets only; '{cfg.dataset}' is not one: drop it")
        return None
    if cfg.mixup or cfg.cutmix:
        raise KDError("--mixup and --cutmix mix images; a text:PATH data set takes neither: drop them")
    model_dir = hf_path(cfg.model)
    if model_dir is not None:
        own = HF_PREFIX + str(model_dir)
        if given.get("tokenizer") not in (None, own) and not _names_hf_dir(given["tokenizer"], model_dir):
            raise KDError(f"model {cfg.model} reads the token ids of its own tokenizer; drop --tokenizer "
                          f"{given['tokenizer']}")
        given["tokenizer"] = own
    try:
        values = {k: (v if k in ("text_column", "label_column", "tokenizer") else int(v)) for k, v in given.items()}
    except (TypeError, ValueError) as e:
        raise KDError(f"text options: bad value ({e})") from None
    return TextOptions(**values).check()


def _names_hf_dir(tokenizer: str, model_dir: Path) -> bool:
    """Whether a --tokenizer value is a proxykd tokenizer file that stands for the same hf:DIR."""
    p = Path(tokenizer)
    p = p / TOKENIZER_FILE if p.is_dir() else p
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return data.get("kind") == "hf" and Path(data.get("path", "")).resolve() == model_dir.resolve()


# ---------------------------------------------------------------------------------------
# Tokenizers


class TextTokenizer:
    """What a text data set needs of a tokenizer: ids for texts, the id count, padding, and a JSON form."""

    kind = ""
    pad_id = PAD_ID
    max_length = 256

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A SHA-256 of the JSON form: two tokenizers with the same fingerprint give the same ids."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def save(self, path: Path) -> Path:
        """Write the JSON form to ``path`` (atomically, :func:`kd.runs.atomic_write`)."""
        atomic_write(path, json.dumps(self.to_json(), ensure_ascii=False) + "\n")
        return path


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


@dataclass
class NgramTokenizer(TextTokenizer):
    """Word n-grams (1..``word_ngrams``) and, with ``char_ngrams``, each word's character n-grams (lengths 3..N
    of ``<word>``), mapped to ids by a vocabulary of the training split or by CRC-32 hashing into ``buckets``.

    A text's ids are its words in order, then its bigrams, ..., then the character n-grams, so cutting at
    ``max_length`` drops the higher-order features first. With a vocabulary an unknown word becomes
    :data:`UNK_ID` and an unknown n-gram is dropped; a text always gives at least one id.
    """

    word_ngrams: int = 2
    char_ngrams: int = 0
    buckets: int = 0
    max_length: int = 256
    vocab: list[str] = field(default_factory=list)  # feature strings; feature i has id FIRST_ID + i
    kind = "ngram"

    def __post_init__(self) -> None:
        self._index = {f: FIRST_ID + i for i, f in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return FIRST_ID + (self.buckets if self.buckets else len(self.vocab))

    def features(self, text: str) -> list[str]:
        """The text's features as strings: ``w:`` word n-grams by order, then ``c:`` character n-grams."""
        words = _words(text)
        out = ["w:" + w for w in words]
        for n in range(2, self.word_ngrams + 1):
            out += ["w:" + " ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
        if self.char_ngrams:
            for w in words:
                marked = f"<{w}>"
                for n in range(CHAR_MIN, self.char_ngrams + 1):
                    out += ["c:" + marked[i:i + n] for i in range(len(marked) - n + 1)]
        return out

    def encode(self, text: str) -> list[int]:
        feats = self.features(text)
        if self.buckets:
            ids = [FIRST_ID + zlib.crc32(f.encode("utf-8")) % self.buckets for f in feats]
        else:
            index = self._index
            ids = [index.get(f, UNK_ID) for f in feats if f in index or (f.startswith("w:") and " " not in f)]
        return ids or [UNK_ID]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @classmethod
    def fit(cls, texts: Sequence[str], options: TextOptions) -> "NgramTokenizer":
        """A tokenizer for ``options``: hashed, or with a vocabulary of the most frequent features of ``texts``
        (words seen once kept; word n-grams and character n-grams seen :data:`NGRAM_MIN_COUNT` times)."""
        tok = cls(options.word_ngrams, options.char_ngrams, options.hash_buckets, options.max_length)
        if options.hash_buckets:
            return tok
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(tok.features(t))
        kept = [(f, c) for f, c in counts.items() if c >= NGRAM_MIN_COUNT or (f.startswith("w:") and " " not in f)]
        kept.sort(key=lambda fc: (-fc[1], fc[0]))
        return cls(options.word_ngrams, options.char_ngrams, 0, options.max_length,
                   [f for f, _ in kept[:options.max_vocab]])

    def to_json(self) -> dict[str, Any]:
        return {"format": TOKENIZER_FORMAT, "kind": self.kind, "lowercase": True, "word_ngrams": self.word_ngrams,
                "char_ngrams": self.char_ngrams, "buckets": self.buckets, "max_length": self.max_length,
                "pad_id": PAD_ID, "unk_id": UNK_ID, "vocab": self.vocab}


class HFTokenizer(TextTokenizer):
    """A local Hugging Face directory's own tokenizer (``hf:DIR``), loaded without network access."""

    kind = "hf"

    def __init__(self, directory: Path, max_length: int = 256):
        transformers = transformers_module()
        self.directory = Path(directory).expanduser().resolve()
        check_hf_dir(self.directory)
        try:
            with quiet_transformers(transformers):
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True)
                config = transformers.AutoConfig.from_pretrained(str(self.directory), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise KDError(f"cannot load the tokenizer of {self.directory} ({first_line(e)}); it needs the "
                          f"tokenizer files save_pretrained writes") from None
        limits = [int(max_length), int(getattr(config, "max_position_embeddings", 0) or 0),
                  int(min(self.tokenizer.model_max_length or 0, 10 ** 9))]
        self.max_length = min(v for v in limits if v > 0)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return list(self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"])

    def to_json(self) -> dict[str, Any]:
        return {"format": TOKENIZER_FORMAT, "kind": self.kind, "path": str(self.directory),
                "max_length": self.max_length, "pad_id": self.pad_id}


def read_tokenizer(path: str | Path) -> TextTokenizer:
    """A tokenizer from its JSON file (or a run directory holding ``tokenizer.json``); never runs code."""
    p = Path(path).expanduser()
    p = p / TOKENIZER_FILE if p.is_dir() else p
    if not p.is_file():
        raise KDError(f"tokenizer file {p} does not exist; give a tokenizer.json from a text run directory")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KDError(f"{p} is not a readable tokenizer file ({first_line(e)})") from None
    if not isinstance(data, dict) or data.get("format") != TOKENIZER_FORMAT:
        raise KDError(f"{p} is not a proxykd tokenizer file (format {TOKENIZER_FORMAT}); for a Hugging Face "
                      f"tokenizer give hf:DIR")
    try:
        if data["kind"] == "hf":
            return HFTokenizer(Path(data["path"]), int(data["max_length"]))
        if data["kind"] == "ngram":
            return NgramTokenizer(int(data["word_ngrams"]), int(data["char_ngrams"]), int(data["buckets"]),
                                  int(data["max_length"]), [str(f) for f in data["vocab"]])
    except (KeyError, TypeError, ValueError) as e:
        raise KDError(f"{p}: missing or malformed entry ({first_line(e)})") from None
    raise KDError(f"{p}: unknown tokenizer kind '{data.get('kind')}' (ngram or hf)")


def make_tokenizer(options: TextOptions, train_texts: Sequence[str]) -> TextTokenizer:
    """The tokenizer ``options`` name: hf:DIR, a tokenizer file, or one built from the training texts."""
    spec = options.tokenizer
    if spec is not None and hf_path(spec) is not None:
        return HFTokenizer(hf_path(spec), options.max_length)
    if spec is not None:
        return read_tokenizer(spec)
    return NgramTokenizer.fit(train_texts, options)


# ---------------------------------------------------------------------------------------
# The data set


class TextDataset(torch.utils.data.Dataset):
    """Token-id sequences and labels held in memory (one flat id tensor and offsets); items are (ids, label).

    ``collate`` batches items (with or without an index) into a padded B x L id tensor; ``ids``: each sample's
    position in the set it was taken from (a validation split keeps them, for per-sample sources).
    """

    loader_workers = 0  # tokenized in memory: batches cost one pad, worker processes would only add transfers

    def __init__(self, flat: torch.Tensor, offsets: torch.Tensor, targets: torch.Tensor, classes: list[str],
                 tokenizer: TextTokenizer, ids: torch.Tensor | None = None):
        self.flat, self.offsets, self.targets = flat, offsets, targets
        self.classes = list(classes)
        self.tokenizer = tokenizer
        self.pad_id, self.max_length = int(tokenizer.pad_id), int(tokenizer.max_length)
        self.ids = ids

    @classmethod
    def encode(cls, texts: Sequence[str], labels: Sequence[int], classes: list[str],
               tokenizer: TextTokenizer) -> "TextDataset":
        seqs = tokenizer.encode_many(texts)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        flat = torch.tensor([i for s in seqs for i in s], dtype=torch.long)
        return cls(flat, offsets, torch.tensor(list(labels), dtype=torch.long), classes, tokenizer)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.flat[self.offsets[i]: self.offsets[i + 1]], int(self.targets[i])

    def collate(self, items: list[tuple]) -> tuple[torch.Tensor, ...]:
        """(ids, label[, index]) items -> (B x L ids padded with ``pad_id`` to the batch's longest sequence,
        each cut at ``max_length``; labels; indices)."""
        seqs = [item[0][: self.max_length] for item in items]
        x = torch.full((len(seqs), max(len(s) for s in seqs)), self.pad_id, dtype=torch.long)
        for r, s in enumerate(seqs):
            x[r, : len(s)] = s
        rest = (torch.as_tensor([item[k] for item in items], dtype=torch.long) for k in range(1, len(items[0])))
        return (x, *rest)

    def subset(self, keep: torch.Tensor, ids: torch.Tensor | None = None) -> "TextDataset":
        """The samples at positions ``keep`` (their ``ids`` recorded), sharing the tokenizer and classes."""
        seqs = [self[int(i)][0] for i in keep]
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor([len(s) for s in seqs], dtype=torch.long).cumsum(0)
        flat = torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.long)
        return TextDataset(flat, offsets, self.targets[keep], self.classes, self.tokenizer, ids)


# ---------------------------------------------------------------------------------------
# Reading text:PATH


def find_text_files(path: Path) -> tuple[Path, Path]:
    """(training file, evaluation file) of a text folder: train.* and val.* (else test.*), one of each."""
    layout = ("put PATH/train.csv and PATH/test.csv (or .tsv, .jsonl, .json; val.* in place of test.*) with "
              "a text and a label column")
    if not path.is_dir():
        raise KDError(f"text folder {path} " + ("is not a folder" if path.exists() else "does not exist") + f"; {layout}")

    def one(stem: str) -> Path | None:
        found = sorted(path / (stem + s) for s in TEXT_SUFFIXES if (path / (stem + s)).is_file())
        if len(found) > 1:
            raise KDError(f"{path} holds {' and '.join(f.name for f in found)}; keep one {stem} file")
        return found[0] if found else None

    train = one("train")
    if train is None:
        raise KDError(f"{path} has no train file; {layout}")
    test = one("val") or one("test")
    if test is None:
        raise KDError(f"{path} has no val or test file; {layout}")
    return train, test


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _table(path: Path, text: str):
    """The file's table as pandas reads it (every CSV/TSV cell a string); parse errors are one line."""
    import pandas as pd

    buf = io.StringIO(text)
    try:
        if path.suffix == ".jsonl":
            return pd.read_json(buf, lines=True, dtype=False)
        if path.suffix == ".json":
            try:
                return pd.read_json(buf, dtype=False)
            except ValueError:  # a .json file of one record per line
                return pd.read_json(io.StringIO(text), lines=True, dtype=False)
        return pd.read_csv(buf, sep="\t" if path.suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise KDError(f"{path} is empty; it needs a header row and one row per sample") from None
    except (pd.errors.ParserError, ValueError) as e:
        raise KDError(f"{path} is not readable as {path.suffix[1:].upper()} ({first_line(e)})") from None


def _cell(v: Any) -> str:
    """A table cell as text: missing values empty, whole floats (JSON 3.0) as integers."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _not_utf8(path: Path, raw: bytes, e: UnicodeDecodeError) -> KDError:
    """The one line for a file that is not UTF-8: the row (1 = the first data row) holding the first bad byte."""
    where = f"line {raw[:e.start].count(NEWLINE) + 1}"
    mark = "\U0010fffd"  # a private-use character in place of the first bad byte, found again in the parsed table
    marked = raw[:e.start].decode("utf-8-sig") + mark + raw[e.end:].decode("utf-8", errors="replace")
    try:
        for r, row in enumerate(_table(path, marked).itertuples(index=False), 1):
            if any(isinstance(v, str) and mark in v for v in row):
                where = f"row {r}"
                break
    except KDError:  # the table does not parse either: the line is what can be told
        pass
    return KDError(f"{path} {where}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8")


def read_text_file(path: Path, options: TextOptions) -> tuple[list[str], list[str]]:
    """(texts, raw labels) of one file; a missing column, an empty text or label, or bytes that are not UTF-8
    are refused in one line naming the file and the row (rows count data rows from 1)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw, e) from None
    table = _table(path, text)
    for col, flag in ((options.text_column, "--text-column"), (options.label_column, "--label-column")):
        if col not in table.columns:
            have = ", ".join(map(str, table.columns)) or "none"
            raise KDError(f"{path} has no column '{col}' (its columns: {have}); name yours with {flag}")
    if len(table) == 0:
        raise KDError(f"{path} holds no rows; it needs one row per sample")
    texts = [_cell(v) for v in table[options.text_column].tolist()]
    labels = [_cell(v).strip() for v in table[options.label_column].tolist()]
    for r, (t, y) in enumerate(zip(texts, labels), 1):
        if not t.strip():
            raise KDError(f"{path} row {r}: empty text in column '{options.text_column}'; fill it or remove the row")
        if not y:
            raise KDError(f"{path} row {r}: empty label in column '{options.label_column}'; fill it or remove the row")
    return texts, labels


def label_classes(labels: Sequence[str]) -> list[str]:
    """The classes of the training labels, sorted: by value when every label is an integer (names: their
    decimal strings), else by name."""
    if all(INTEGER.fullmatch(y) for y in labels):
        return [str(v) for v in sorted({int(y) for y in labels})]
    return sorted(set(labels))


def _label_key(y: str, integers: bool) -> str:
    return str(int(y)) if integers and INTEGER.fullmatch(y) else y


def load_text_folder(path: Path, options: TextOptions | None = None) -> DataSplit:
    """A user's text in PATH/train.* and PATH/val.* (or test.*), encoded by the tokenizer ``options`` name."""
    options = (options or TextOptions()).check()
    path = path.expanduser().resolve()
    train_file, test_file = find_text_files(path)
    train_texts, train_labels = read_text_file(train_file, options)
    test_texts, test_labels = read_text_file(test_file, options)
    classes = label_classes(train_labels)
    if len(classes) < 2:
        raise KDError(f"{train_file} holds one class ('{classes[0]}'); a classifier needs at least two")
    integers = all(INTEGER.fullmatch(c) for c in classes) and all(INTEGER.fullmatch(y) for y in train_labels)
    index = {c: k for k, c in enumerate(classes)}
    y_train = [index[_label_key(y, integers)] for y in train_labels]
    y_test = []
    for r, y in enumerate(test_labels, 1):
        k = index.get(_label_key(y, integers))
        if k is None:
            raise KDError(f"{test_file} row {r}: label '{y}' does not occur in {train_file.name}; the evaluation "
                          f"file may use only the training labels")
        y_test.append(k)
    tokenizer = make_tokenizer(options, train_texts)
    train = TextDataset.encode(train_texts, y_train, classes, tokenizer)
    test = TextDataset.encode(test_texts, y_test, classes, tokenizer)
    info = DatasetInfo(TEXT_PREFIX + str(path), len(classes), tokenizer.vocab_size, tokenizer.max_length, (), (),
                       TEXT_MODELS[0], class_names=classes)
    return DataSplit(train, test, info)


def run_text_options(meta: dict[str, Any], run_dir: str | Path | None) -> TextOptions:
    """The text options that give a finished text run's data as it trained on it: its columns and its
    tokenizer file (``run_dir``/tokenizer.json)."""
    if run_dir is None:
        raise KDError(f"the run on {meta.get('dataset')} encoded its text with its own {TOKENIZER_FILE}: give its "
                      f"run directory to load its data")
    file = Path(run_dir) / meta.get("tokenizer", TOKENIZER_FILE)
    if not file.is_file():
        raise KDError(f"{run_dir} has no {file.name}; the run's token ids cannot be rebuilt without it")
    return TextOptions(meta.get("text_column") or "text", meta.get("label_column") or "label", str(file))


def text_meta(cfg: Any, split: DataSplit) -> dict[str, Any]:
    """What a text run records in summary.json beside the data set: its columns, tokenizer file and sizes."""
    tok = getattr(split.train, "tokenizer", None)
    if tok is None:
        return {}
    return {"modality": "text", "tokenizer": TOKENIZER_FILE, "tokenizer_kind": tok.kind,
            "text_column": getattr(cfg, "text_column", None) or "text",
            "label_column": getattr(cfg, "label_column", None) or "label",
            "vocab_size": tok.vocab_size, "max_length": tok.max_length}


def save_run_tokenizer(run_dir: Path, split: DataSplit) -> Path | None:
    """Keep a text split's tokenizer in the run directory (nothing for images)."""
    tok = getattr(split.train, "tokenizer", None)
    return tok.save(Path(run_dir) / TOKENIZER_FILE) if tok is not None else None


def check_teacher_tokenizer(spec: str, split: DataSplit, run_dir: Path) -> None:
    """A teacher network reads the student's token ids: they must come from the teacher run's tokenizer."""
    tok = getattr(split.train, "tokenizer", None)
    file = Path(run_dir) / TOKENIZER_FILE
    if tok is None or not file.is_file():
        return
    try:
        theirs = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KDError(f"{file} is not a readable tokenizer file ({first_line(e)})") from None
    if theirs != tok.to_json():
        raise KDError(f"teacher {spec} reads the token ids of its own tokenizer ({file}), and this student's text is "
                      f"encoded otherwise (--tokenizer, a tokenizer option or an hf:DIR student): drop those, or "
                      f"distill from its proxy: or cached: outputs, which read no inputs")


def check_model_fits(name: str, info: DatasetInfo) -> None:
    """A model that reads token ids for text, one that reads images for images: the other pairing is refused."""
    text = text_path(info.name) is not None
    if text and not is_text_model(name):
        raise KDError(f"model '{name}' reads images; text:PATH data sets take {', '.join(TEXT_MODELS)} or hf:DIR")
    if is_text_model(name) and not text:
        raise KDError(f"model '{name}' reads token ids; use it with a text:PATH data set")


# ---------------------------------------------------------------------------------------
# hf:DIR: a local Hugging Face directory (its tokenizer here, its model in kd.models)


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise KDError("hf:DIR needs the transformers package: pip install 'proxykd[hf]' "
                      "(or pip install 'transformers>=4.40')") from None
    return transformers


class quiet_transformers:
    """transformers' own logging at error level for the duration (its load report is not proxykd's output)."""

    def __init__(self, transformers):
        self.logging = transformers.utils.logging

    def __enter__(self):
        self.level = self.logging.get_verbosity()
        self.logging.set_verbosity_error()

    def __exit__(self, *exc):
        self.logging.set_verbosity(self.level)


def check_hf_dir(directory: Path) -> None:
    if not (directory / "config.json").is_file():
        raise KDError(f"hf:{directory}: " + ("no config.json in it" if directory.is_dir() else "no such folder")
                      + "; give a local Hugging Face model directory (save_pretrained's files)")
