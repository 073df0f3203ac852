"""Text classification: text:PATH data sets, the run's tokenizer, the text models, hf:DIR and Debian's fortunes."""
import json

import pandas as pd
import pytest
import torch

from benchmarks import fortunes_data
from kd.config import TrainConfig
from kd.data import load_dataset, load_dataset_of_run, validation_split
from kd.data import make_loader
from kd.engine import predict
from kd.errors import KDError
from kd.models import create_model
from kd.runs import load_safetensors, read_summary
from kd.data.text import FIRST_ID, PAD_ID, TEXT_MODELS, UNK_ID, NgramTokenizer, TextDataset, TextOptions
from teachers.network import load_teacher_network

FORTUNES = fortunes_data.FORTUNES
CATEGORIES = ["computers", "food", "love", "sports"]  # four distinct subjects, 40 quotations each
needs_fortunes = pytest.mark.skipif(not (FORTUNES / "food").is_file(),
                                    reason="Debian's fortunes package is not installed (.ci/run installs it)")
FAST = ["--batch-size", "16", "--optimizer", "adamw", "--weight-decay", "0", "--quiet"]


def write_folder(path, train_rows, test_rows, suffix=".csv", **kwargs):
    """A text:PATH folder: train and test tables written by pandas in the format the suffix names."""
    path.mkdir(parents=True, exist_ok=True)
    for stem, rows in (("train", train_rows), ("test", test_rows)):
        df = pd.DataFrame(rows, **kwargs)
        target = path / (stem + suffix)
        if suffix == ".jsonl":
            df.to_json(target, orient="records", lines=True)
        else:
            df.to_csv(target, sep="\t" if suffix == ".tsv" else ",", index=False)
    return path


TOPICS = {"ham": "bread cheese soup cook kitchen", "spam": "winner prize click offer money"}


def topic_rows(n):
    """n rows of two separable topics, alternating."""
    rows = []
    for i in range(n):
        label = "ham" if i % 2 else "spam"
        words = TOPICS[label].split()
        rows.append({"text": f"the {words[i % 5]} and {words[(i + 2) % 5]} of it", "label": label})
    return rows


@pytest.fixture
def small_text(tmp_path):
    return write_folder(tmp_path / "small", topic_rows(40), topic_rows(10))


# ---------------------------------------------------------------------------------------
# Reading and encoding


def test_integer_labels_sort_by_value_in_tsv_and_jsonl(tmp_path):
    rows = [{"text": f"word{i % 3} common", "label": [10, 2, 7][i % 3]} for i in range(12)]
    for suffix in (".tsv", ".jsonl"):
        split = load_dataset(f"text:{write_folder(tmp_path / suffix[1:], rows, rows[:6], suffix)}")
        assert split.info.class_names == ["2", "7", "10"]  # by value, not "10" < "2"
        assert split.train.targets.tolist() == [2, 0, 1] * 4
        assert split.info.default_model == "fasttext" and split.info.num_classes == 3


def test_vocabulary_hashing_and_the_collate_pad_and_cut(small_text):
    split = load_dataset(f"text:{small_text}", text=TextOptions(max_length=5))
    tok = split.train.tokenizer
    assert tok.vocab[:5] == ["w:and", "w:it", "w:of", "w:of it", "w:the"]  # in every row: by count, then by name
    ids = tok.encode("the cheese and zebra")   # zebra: unknown word; unseen bigrams are dropped
    assert ids[:4] == [tok.vocab.index("w:the") + FIRST_ID, tok.vocab.index("w:cheese") + FIRST_ID,
                       tok.vocab.index("w:and") + FIRST_ID, UNK_ID]
    hashed = NgramTokenizer.fit([], TextOptions(hash_buckets=16, char_ngrams=4))
    h = hashed.encode("Cheese, cheese")
    assert hashed.vocab_size == 18 and all(FIRST_ID <= i < 18 for i in h) and h[0] == h[2]  # lower-cased
    assert len(h) == 3 + 2 + (6 + 5) + 1 + (6 + 5)  # words cheese , cheese; 2 bigrams; 3- and 4-grams of <cheese>, <,>
    data = TextDataset(torch.arange(2, 12), torch.tensor([0, 2, 10]), torch.tensor([0, 1]), ["a", "b"], tok)
    x, y, idx = next(iter(make_loader(data, None, TrainConfig(batch_size=2, num_workers=3), train=False, device="cpu")))
    assert x.tolist() == [[2, 3, PAD_ID, PAD_ID, PAD_ID], [4, 5, 6, 7, 8]]  # padded to the longest, cut at 5
    assert y.tolist() == [0, 1] and idx.tolist() == [0, 1]
    val = validation_split(split, 0.2, 0)  # held-out share keeps each sample's position for per-sample sources
    _, _, held = next(iter(make_loader(val.test, None, TrainConfig(batch_size=64), train=False, device="cpu")))
    assert held.tolist() == val.test.ids.tolist() and held.tolist() != list(range(len(held)))


def test_a_tokenizer_file_decides_the_ids(small_text, tmp_path):
    file = tmp_path / "tokenizer.json"
    file.write_text(json.dumps({"format": "proxykd-text-tokenizer-v1", "kind": "ngram", "word_ngrams": 1,
                                "char_ngrams": 0, "buckets": 0, "max_length": 8, "vocab": ["w:cheese", "w:the"]}))
    split = load_dataset(f"text:{small_text}", text=TextOptions(tokenizer=str(file)))
    assert split.info.channels == 4 and split.info.image_size == 8
    first = pd.read_csv(small_text / "train.csv")["text"][0]  # "the winner and click of it"
    assert split.train[0][0].tolist() == [3, UNK_ID, UNK_ID, UNK_ID, UNK_ID, UNK_ID] and first.startswith("the ")
    meta = {"dataset": split.info.name, "tokenizer": "tokenizer.json"}
    assert load_dataset_of_run(meta, run_dir=tmp_path).train[0][0].tolist() == split.train[0][0].tolist()
    assert load_dataset(f"text:{small_text}").train[0][0].tolist() != split.train[0][0].tolist()


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_text_models_ignore_padding_and_are_built_from_vocabulary_and_length(name):
    torch.manual_seed(0)
    m = create_model(name, num_classes=3, in_channels=50, image_size=12).eval()  # 50 token ids, 12 positions
    seqs = [torch.tensor([5, 9, 2, 7]), torch.tensor([11, 3])]
    alone = torch.cat([m(s[None]) for s in seqs])
    batch = torch.full((2, 6), PAD_ID)  # padded beyond the longest, as a wider batch would be
    for r, s in enumerate(seqs):
        batch[r, :len(s)] = s
    with torch.no_grad():
        assert torch.allclose(m(batch), alone, atol=1e-5) and alone.shape == (2, 3)
        swapped = m(batch[:, [1, 0, 2, 3, 4, 5]])[0]  # the first two tokens swapped: a bag, or positions that count
        assert torch.allclose(swapped, alone[0], atol=1e-5) == (name == "fasttext")
    if name == "text-transformer":
        with pytest.raises(KDError, match="collate cuts"):
            m(torch.ones(1, 13, dtype=torch.long))


# ---------------------------------------------------------------------------------------
# Bad input: one line naming the file and the row


BAD = {
    "missing column": ([{"sentence": "a b", "label": "x"}] * 4, None, "train.csv has no column 'text'"),
    "empty text": ([{"text": "a b", "label": "x"}, {"text": "b c", "label": "y"}, {"text": "  ", "label": "x"}],
                   None, "train.csv row 3: empty text"),
    "unknown label": ([{"text": "a b", "label": "x"}, {"text": "b c", "label": "y"}],
                      [{"text": "a", "label": "x"}, {"text": "b", "label": "zzz"}], "test.csv row 2: label 'zzz'"),
    "not utf-8": ([{"text": "a b", "label": "x"}, {"text": "caf\u00e9", "label": "y"}], None, "train.csv row 2: not UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_text_input_is_one_line_naming_file_and_row(case, tmp_path, kd_main):
    train, test, needle = BAD[case]
    folder = write_folder(tmp_path / "bad", train, test or train)
    if case == "not utf-8":
        (folder / "train.csv").write_bytes((folder / "train.csv").read_text().encode("latin-1"))
    code, _, err = kd_main("train-teacher", "--dataset", f"text:{folder}", "--epochs", "1", "--out", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1 and needle in err and str(folder) in err, err


def test_text_flags_and_models_are_refused_where_they_do_not_apply(small_text, tmp_path, kd_main):
    code, _, err = kd_main("train-teacher", "--dataset", "digits", "--text-column", "body", "--out", tmp_path / "a")
    assert code == 2 and "--text-column applies to text:PATH" in err
    code, _, err = kd_main("train-teacher", "--dataset", f"text:{small_text}", "--model", "lenet", "--out", tmp_path / "b")
    assert code == 2 and "reads images" in err
    code, _, err = kd_main("train-teacher", "--dataset", f"text:{small_text}", "--mixup", "0.2", "--out", tmp_path / "c")
    assert code == 2 and "--mixup" in err


# ---------------------------------------------------------------------------------------
# Debian's fortunes, end to end


def test_fortunes_command_drops_small_offensive_and_ambiguous_and_splits_stratified(tmp_path, capsys):
    src = tmp_path / "fortunes"
    (src / "off").mkdir(parents=True)
    quotes = lambda name, n: "\n%\n".join(f"  {name} saying number {i}\n\tsecond line  \n" for i in range(n))
    (src / "alpha").write_text(quotes("alpha", 8) + "\n%\nshared quotation\n%\n")
    (src / "beta").write_text(quotes("beta", 8) + "\n%\nshared quotation")
    (src / "tiny").write_text(quotes("tiny", 2))
    (src / "alpha.dat").write_bytes(b"\x00\x02\xff")
    (src / "off" / "rude").write_text(quotes("rude", 8))
    (src / "sneaky").symlink_to(src / "off" / "rude")
    argv = ["--source", str(src), "--min-quotes", "4", "--test-fraction", "0.25", "--seed", "3"]
    assert fortunes_data.main(["--out", str(tmp_path / "a"), *argv]) == 0
    out = capsys.readouterr().out
    assert "tiny (2)" in out and "1 quotations found in more than one category" in out
    train, test = (pd.read_csv(tmp_path / "a" / f) for f in ("train.csv", "test.csv"))
    both = pd.concat([train, test])
    assert set(both["label"]) == {"alpha", "beta"} and not both["text"].str.contains("rude|shared|%").any()
    assert both["text"].iloc[0] == both["text"].iloc[0].strip() and "\n\tsecond line" in both["text"].iloc[0]
    assert test["label"].value_counts().to_dict() == {"alpha": 2, "beta": 2}  # stratified: a quarter of each
    assert fortunes_data.main(["--out", str(tmp_path / "b"), *argv]) == 0  # seeded: the same split again
    assert (tmp_path / "a" / "test.csv").read_text() == (tmp_path / "b" / "test.csv").read_text()


@pytest.fixture(scope="module")
def fortunes_teacher(tmp_path_factory):
    """An LS++ fastText teacher on four fortune categories (40 quotations each), its vocabulary capped at 600."""
    from kd.app.cli import main

    root = tmp_path_factory.mktemp("fortunes")
    fortunes_data.write_fortunes(root / "data", categories=CATEGORIES, max_per_category=40, min_quotes=30, log=None)
    run = root / "teacher"
    assert main(["train-teacher", "--dataset", f"text:{root / 'data'}", "--method", "lspp", "--max-vocab", "600",
                 "--epochs", "6", "--lr", "0.05", "--c-lr-scale", "10", *FAST, "--out", str(run)]) == 0
    return root, run


@needs_fortunes
def test_fortunes_teacher_learns_and_its_students_read_its_vocabulary(fortunes_teacher, kd_main):
    root, run = fortunes_teacher
    s = read_summary(run)
    assert s["class_names"] == CATEGORIES and s["model"] == "fasttext" and s["test_acc"] > 0.4  # chance: 0.25
    assert s["in_channels"] == s["vocab_size"] == 602 and (run / "c_matrix.safetensors").is_file()
    default = load_dataset(s["dataset"])  # what a student building its own vocabulary would get
    assert default.info.channels > 602
    for spec, student in (("proxy", "fasttext"), ("network", "text-transformer")):
        code, out, err = kd_main("distill", "--teacher", f"{spec}:{run}", "--student", student, "--epochs", "2",
                                 *FAST, "--out", root / spec)
        assert code == 0, err
        assert (root / spec / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
        st = read_summary(root / spec)
        assert st["in_channels"] == 602 and st["class_names"] == CATEGORIES and st["dataset"] == s["dataset"]
        ids = load_dataset_of_run(st, run_dir=root / spec).train
        assert torch.equal(ids.flat, load_dataset_of_run(s, run_dir=run).train.flat)
        assert not torch.equal(ids.flat[:len(default.train.flat)], default.train.flat[:len(ids.flat)])


@needs_fortunes
def test_fortunes_cache_follows_the_teacher_tokenizer_and_a_cached_student_trains(fortunes_teacher, kd_main):
    root, run = fortunes_teacher
    cache = root / "cache.safetensors"
    code, _, err = kd_main("teacher", "cache", run, "--out", cache)
    assert code == 0, err
    model, meta = load_teacher_network(run)
    split = load_dataset_of_run(meta, run_dir=run)
    logits, _ = predict(model, split.train, split.info)
    assert torch.allclose(load_safetensors(cache)["logits"], logits, atol=1e-5)
    code, _, err = kd_main("distill", "--teacher", f"cached:{cache}", "--no-augment", "--epochs", "2", *FAST,
                           "--out", root / "cached")
    assert code == 0, err
    assert (root / "cached" / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    assert read_summary(root / "cached")["test_acc"] > 0.25


@needs_fortunes
def test_fortunes_report_draws_c_with_the_category_names(fortunes_teacher, kd_main):
    root, run = fortunes_teacher
    code, _, err = kd_main("report", run, "--out", root / "report", "--tsne-points", "20", "--quiet")
    assert code == 0, err
    c = pd.read_csv(root / "report" / "c_matrix_teacher.csv", index_col=0)
    assert list(c.columns) == CATEGORIES and list(c.index) == CATEGORIES
    assert (root / "report" / "c_matrix.png").is_file() and (root / "report" / "reliability.png").is_file()


# ---------------------------------------------------------------------------------------
# A local Hugging Face model: hf:DIR


def save_tiny_bert(folder, words):
    """A randomly initialised 2-layer BERT (hidden 32) and a WordPiece tokenizer over ``words``, saved to folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tk = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=5)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return vocab


def test_hf_dir_trains_an_epoch_on_its_own_tokenizer(small_text, tmp_path, kd_main):
    vocab = save_tiny_bert(tmp_path / "bert", sorted({w for t in TOPICS.values() for w in t.split()} | {"the", "of"}))
    run = tmp_path / "run"
    code, _, err = kd_main("train-teacher", "--dataset", f"text:{small_text}", "--model", f"hf:{tmp_path / 'bert'}",
                           "--method", "onehot", "--epochs", "1", "--lr", "0.001", *FAST, "--out", run)
    assert code == 0, err
    s = read_summary(run)
    assert s["tokenizer_kind"] == "hf" and s["in_channels"] == len(vocab) and s["max_length"] == 32
    assert json.loads((run / "tokenizer.json").read_text())["path"] == str((tmp_path / "bert").resolve())
    ids = load_dataset_of_run(s, run_dir=run).train[0][0].tolist()  # "the winner and click of it"
    assert ids[0] == 2 and ids[-1] == 3 and ids[1] == vocab.index("the") and UNK_ID in ids  # [CLS] .. [SEP]
    model, _ = load_teacher_network(run)  # rebuilt from summary.json: the directory's network, the run's weights
    x = torch.tensor([ids])
    assert model(x).shape == (1, 2)
    trained = load_safetensors(run / "model.safetensors")
    assert torch.equal(model.state_dict()["model.classifier.weight"], trained["model.classifier.weight"])
