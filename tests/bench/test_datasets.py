"""Task data: splits disjoint, balanced, deterministic; manifests hash what they claim; sources parsed right."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

from taskmerge.bench.datasets import (
    MAIN_TASKS,
    MAIN_TASKS_8,
    SUITE_SIZES,
    TASKS,
    TOY_TASKS,
    UNSEEN_TASKS,
    TaskSourceMissing,
    load_task,
    resolve_tasks,
)
from taskmerge.bench.datasets import fortunes, wordnet
from taskmerge.bench.datasets.common import V2_TEST_TARGET, balanced_split, clean_groups, v2_caps

REAL_TASKS = [t for t in TASKS if t not in TOY_TASKS]
EXPECTED_CLASSES = {
    "fortune_topic_a": 8, "fortune_topic_b": 8, "fortune_language": 8, "wordnet_noun_supersense": 10,
    "wordnet_verb_supersense": 8, "wordnet_pos": 4, "wordnet_domain": 8, "vader_polarity": 2,
    "chatterbot_category": 6, "chatterbot_language": 8, "toy_letters": 2, "toy_length": 3,
    "bible_section": 8, "bible_gospel": 4, "mhcc_section": 6, "tdavid_section": 3, "gcide_field": 8,
    "gcide_field_b": 8, "gcide_author": 8, "gcide_author_b": 8, "gcide_pos": 5, "gcide_origin": 6,
    "foldoc_subject": 8, "dict_source": 4,
}


def _load(name: str, seed: int = 0, protocol: str = "v2"):
    try:
        return load_task(name, seed, protocol)
    except TaskSourceMissing as exc:  # pragma: no cover - CI installs every source
        pytest.skip(str(exc))


def _norm(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def _sha(examples) -> str:
    # independent restatement of the documented hash: JSON list of [text, label], UTF-8, no ASCII escaping
    return hashlib.sha256(json.dumps([[t, y] for t, y in examples], ensure_ascii=False).encode("utf-8")).hexdigest()


def test_suite_lists() -> None:
    assert len(MAIN_TASKS_8) == 8 and MAIN_TASKS[:8] == MAIN_TASKS_8 and len(set(MAIN_TASKS)) == len(MAIN_TASKS)
    assert len(MAIN_TASKS) <= max(SUITE_SIZES) == 20
    assert len(UNSEEN_TASKS) >= 2 and not set(UNSEEN_TASKS) & set(MAIN_TASKS)
    assert set(MAIN_TASKS) | set(UNSEEN_TASKS) <= set(TASKS)
    assert resolve_tasks(4) == list(MAIN_TASKS[:4])
    assert resolve_tasks("8") == list(MAIN_TASKS_8)
    for n in SUITE_SIZES:  # each setting is a prefix of the next
        if n <= len(MAIN_TASKS):
            assert resolve_tasks(n) == list(MAIN_TASKS[:n])
    with pytest.raises(ValueError):
        resolve_tasks(len(MAIN_TASKS) + 1)
    assert resolve_tasks("all") == list(MAIN_TASKS) + list(UNSEEN_TASKS)
    assert resolve_tasks("vader_polarity,wordnet_pos") == ["vader_polarity", "wordnet_pos"]
    with pytest.raises(KeyError):
        resolve_tasks(["no_such_task"])


@pytest.mark.parametrize("protocol", ["v1", "v2"])
@pytest.mark.parametrize("name", list(TASKS))
def test_splits_disjoint_balanced_and_hashed(name: str, protocol: str) -> None:
    d = _load(name, 0, protocol)
    assert len(d.labels) == EXPECTED_CLASSES[name] == len(set(d.labels))
    texts = {s: [t for t, _ in d.split(s)] for s in ("train", "val", "test")}
    for s, ts in texts.items():
        assert len(ts) == len(set(ts)), f"duplicate texts inside {s}"
        assert all(isinstance(t, str) and t == t.strip() and t for t in ts)
    assert not set(texts["train"]) & set(texts["val"])
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["val"]) & set(texts["test"])
    k = len(d.labels)
    for s in ("val", "test"):  # exactly balanced
        counts = [sum(1 for _, y in d.split(s) if y == i) for i in range(k)]
        assert len(set(counts)) == 1 and counts[0] > 0, (s, counts)
    train_counts = [sum(1 for _, y in d.train if y == i) for i in range(k)]
    assert min(train_counts) > 0
    assert all(0 <= y < k for s in ("train", "val", "test") for _, y in d.split(s))
    # suite budget: <= 1000 train, 200 val examples per task; test <= 400 (v1) or up to the v2 target
    assert len(d.train) <= 1000 and len(d.val) <= 200
    if protocol == "v1":
        assert len(d.test) <= 400 and "protocol" not in d.manifest
    else:
        v1 = _load(name, 0, "v1")
        assert d.manifest["protocol"] == "v2" and len(d.val) == len(v1.val) and len(d.test) >= len(v1.test)
        if name in REAL_TASKS and len(d.test) < V2_TEST_TARGET:
            # a source too small for the target: its smallest class keeps only the training floor (half of v1's)
            v1_train_cap = max(sum(1 for _, y in v1.train if y == i) for i in range(k))
            assert min(train_counts) == -(-v1_train_cap // 2), (train_counts, v1_train_cap)
        elif name in REAL_TASKS:
            assert len(d.test) - V2_TEST_TARGET < k
    m = d.manifest
    assert m["labels"] == d.labels
    for s in ("train", "val", "test"):
        assert m["counts"][s] == len(d.split(s))
        assert m["sha256"][s] == _sha(d.split(s))
        assert sum(m["per_class"][s].values()) == len(d.split(s))
    if name in REAL_TASKS:
        assert m["source"] and m["license"]
        assert d.info is not None and d.info.install


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_and_seed_dependent(name: str) -> None:
    a, b, c = _load(name, 0), _load(name, 0), _load(name, 1)
    assert a.train == b.train and a.val == b.val and a.test == b.test
    assert a.manifest_hash == b.manifest_hash
    assert a.test != c.test and a.manifest_hash != c.manifest_hash


def test_manifest_hashes_stable_across_processes() -> None:
    """Hashes do not depend on PYTHONHASHSEED or on what was loaded before (fresh interpreters)."""
    names = ["toy_letters", "vader_polarity", "wordnet_pos", "fortune_topic_a", "chatterbot_category"]
    code = (
        "import json,sys; from taskmerge.bench.datasets import load_task\n"
        "out={}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n]=load_task(n,0).manifest['sha256']\n"
        "    except Exception as e: out[n]=repr(type(e).__name__)\n"
        "print(json.dumps(out))\n"
    )
    runs = []
    for hashseed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        order = names if hashseed == "1" else names[::-1]
        res = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, env=env, check=True)
        runs.append(json.loads(res.stdout))
    assert runs[0] == runs[1]
    for n in names:
        if isinstance(runs[0][n], dict):
            assert runs[0][n] == _load(n).manifest["sha256"]


V1_MANIFEST_HASHES = {  # computed with the code before protocol v2 existed (commit 665f739), setup.sh's packages only
    "fortune_topic_a": "18e67d05d7d942df817fd416d6dc8c3998b60bb5fc3ee11560c1e0e2a22354d4",
    "fortune_topic_b": "6bbdf27d3f0d90931420e548381360ea35afc0ca9cc5951c63ec24692a3b9069",
    "fortune_language": "0baada9a6f525dfc85f4cada99c8a769c3e3410281cbfa4fb9c6e44a8ae3a883",
    "wordnet_noun_supersense": "2fda2f600c4174e2e2ca39a5144ddd92f8820acc5f60cef6c66c6833ea993313",
    "wordnet_verb_supersense": "0474929085a88c923e87fe94b3ed765edb2865c4825358e64d3ae0ed070a0a98",
    "wordnet_pos": "82495c6b85b2bb7363c3b2413f7e502e463bee1a277ae7eb7477d4daaad48c76",
    "wordnet_domain": "e471659bf280c02274094fed0cff2a0e6e12cb464fe66bd75a8260978071c8dc",
    "vader_polarity": "2e0e07711a47b564ae975894ea92825de99fbbf3c7cbe6470cf974f42e760e83",
    "chatterbot_category": "0a9dc2f22e4e2ee087bd110d5df007377e2dd36fe43d9539dd9df7ee502b07e8",
    "chatterbot_language": "03fb756cd981ee4c4c82c225961411c50e345255eb885f73b32857259e368269",
    "toy_letters": "1df115560046b0cddeb66b3d3dd445b9db17eccd7f714a6554df554f70d75cfa",
    "toy_length": "d937ba9b255997b7d07c6bed4751556f3c284f485c5ced05efe44b087883e3eb",
}


@pytest.mark.parametrize("name", list(V1_MANIFEST_HASHES))
def test_v1_manifests_unchanged(name: str) -> None:
    """Protocol v1 reproduces the first benchmark's data exactly, so its cached checkpoints stay valid."""
    assert _load(name, 0, "v1").manifest_hash == V1_MANIFEST_HASHES[name]


def test_v2_caps_rule() -> None:
    # big source: target split evenly (ceil), v1 val and train kept
    assert v2_caps([5000, 3000], {"train": 500, "val": 100, "test": 200}, 1000) == \
        {"train": 500, "val": 100, "test": 500}
    assert v2_caps([5000] * 6, {"train": 166, "val": 33, "test": 66}, 1000)["test"] == 167
    # fortune_topic_b's numbers: smallest class 197, v1 caps 125/25/50 -> 197 - 25 - ceil(125/2) = 109 test
    assert v2_caps([454, 197, 334], {"train": 125, "val": 25, "test": 50}, 1000)["test"] == 109
    # never below v1's test size
    assert v2_caps([60, 90], {"train": 60, "val": 10, "test": 30}, 1000)["test"] == 30
    # min_train_fraction=1 keeps the whole v1 training size
    assert v2_caps([197], {"train": 125, "val": 25, "test": 50}, 1000, min_train_fraction=1.0)["test"] == 50


@pytest.mark.parametrize("name", list(TASKS))
def test_zero_shot_prompts(name: str) -> None:
    d = _load(name)
    assert len(d.class_names) == len(d.labels) == len(set(d.class_names))
    assert all(n.strip() for n in d.class_names)
    assert (3 if name in TOY_TASKS else 4) <= len(d.templates) <= 8
    assert all(t.count("{}") == 1 for t in d.templates)
    assert d.info is not None and d.info.short_name


def test_toy_golden_hashes() -> None:
    """Golden values pin the split algorithm itself (the toy data has no external source): a change to
    cleaning, seeding, ordering or hashing shows up here."""
    d = load_task("toy_letters", 0, "v1")
    assert d.manifest["counts"] == {"train": 200, "val": 60, "test": 120}
    assert d.manifest["per_class"]["test"] == {"first_half": 60, "second_half": 60}
    assert d.manifest["sha256"] == {
        "train": "2df1b6f810a067ffe6adcd0a688a97a3cfe5a8612c5ac90e2784f21bd22c1a1b",
        "val": "38fd13016c2c1c1fd4f338320542d535811c2edb034c8d2acaa880c19d066027",
        "test": "a3c04362cb4be011c25832a31c2fa996e5219c5c86faf95ac840c6938bda1ca3",
    }


def test_balanced_split_rule() -> None:
    groups = {"a": [f"a{i}" for i in range(20)], "b": [f"b{i}" for i in range(7)]}
    caps = {"train": 10, "val": 2, "test": 3}
    s = balanced_split(groups, ["a", "b"], caps, seed=3, task="t")
    assert sum(1 for _, y in s["test"] if y == 1) == 3 and sum(1 for _, y in s["val"] if y == 1) == 2
    assert sum(1 for _, y in s["train"] if y == 1) == 2  # only 7 - 5 left
    assert sum(1 for _, y in s["train"] if y == 0) == 10
    used = [t for split in s.values() for t, _ in split]
    assert len(used) == len(set(used))
    with pytest.raises(ValueError):
        balanced_split({"a": ["x"] * 3, "b": ["y", "z"]}, ["a", "b"], caps, 0, "t")


def test_clean_groups_drops_ambiguous_and_duplicates() -> None:
    out = clean_groups({"a": ["x  y", "x y", "shared", "ok"], "b": ["shared", "fine\n"]})
    assert out == {"a": ["ok", "x y"], "b": ["fine"]}


# --------------------------------------------------------------------------- source parsers vs the raw files


def test_fortune_parser() -> None:
    text = "first\nline\n%\n#7thguard\nsecond\n%\n%\nthird\n"
    assert fortunes.parse_fortune_file(text) == ["first\nline", "second", "third"]


def test_fortune_topic_examples_come_from_their_files() -> None:
    d = _load("fortune_topic_a")
    assert set(fortunes.TOPICS_A).isdisjoint(fortunes.TOPICS_B)
    by_label = {}
    for label in d.labels:
        raw = (fortunes.FORTUNE_DIR / label).read_text(encoding="utf-8", errors="replace")
        by_label[label] = {_norm(e) for e in raw.split("\n%\n")}
    for text, y in d.test[:100] + d.train[:100]:
        assert text in by_label[d.labels[y]]


def test_fortune_language_examples_come_from_their_language() -> None:
    d = _load("fortune_language")
    root = fortunes.FORTUNE_DIR
    sources = {"pt": [root / "brasil"], "en": [root / t for t in fortunes.TOPICS_A + fortunes.TOPICS_B]}
    for code in ("de", "es", "it", "pl", "cs", "ru"):
        sources[code] = [p for p in (root / code).iterdir() if p.is_file() and p.suffix not in (".dat", ".u8")]
    blobs = {c: _norm(" ".join(p.read_text(encoding="utf-8", errors="replace") for p in ps))
             for c, ps in sources.items()}
    checked = 0
    for text, y in d.test:
        code = d.labels[y]
        if code == "en":  # English comes from all topic files; check only those that are in the ones listed
            continue
        assert text[:60] in blobs[code], (code, text[:60])
        checked += 1
    assert checked > 300


def test_wordnet_parser_on_known_lines() -> None:
    line = ("00002325 29 v 01 respire 1 005 $ 00001740 v 0000 @ 02108395 v 0000 + 03110323 a 0101 "
            "+ 00831191 n 0103 + 00830811 n 0101 01 + 02 00 | undergo the biomedical and metabolic processes "
            "of respiration by taking up oxygen and producing carbon monoxide  \n")
    s = wordnet.parse_data_line(line)
    assert s is not None and s.lex_filenum == 29 and wordnet.LEXNAMES[29] == "verb.body"
    assert s.words == ("respire",) and s.ss_type == "v" and len(s.pointers) == 5
    assert s.definition.startswith("undergo the biomedical") and s.definition.endswith("carbon monoxide")
    assert wordnet.parse_data_line("  1 This software and database is being provided\n") is None


def test_wordnet_supersense_labels_match_known_words() -> None:
    try:
        syn = wordnet.synsets()
    except TaskSourceMissing as exc:  # pragma: no cover
        pytest.skip(str(exc))
    path = wordnet.WORDNET_DIR / "data.noun"
    n_lines = sum(1 for line in path.open(encoding="utf-8", errors="replace") if not line.startswith("  "))
    assert len(syn["noun"]) == n_lines == 82115
    lex = {("dog", "n"): "noun.animal", ("oak", "n"): "noun.plant", ("bread", "n"): "noun.food",
           ("run", "v"): "verb.motion"}
    index = {}
    for pos, key in (("noun", "n"), ("verb", "v")):
        for s in syn[pos]:
            for w in s.words:
                index.setdefault((w, key), set()).add(wordnet.LEXNAMES[s.lex_filenum])
    for k, v in lex.items():
        assert v in index[k], (k, index[k])
    d = _load("wordnet_noun_supersense")
    defs = {}
    for s in syn["noun"]:
        defs.setdefault(s.definition, set()).add(wordnet.LEXNAMES[s.lex_filenum])
    for text, y in d.test:
        assert defs[text] == {d.labels[y]}


def test_wordnet_pos_labels() -> None:
    d = _load("wordnet_pos")
    raw = {}
    for pos, label in (("noun", "noun"), ("verb", "verb"), ("adj", "adjective"), ("adv", "adverb")):
        for line in (wordnet.WORDNET_DIR / f"data.{pos}").open(encoding="utf-8", errors="replace"):
            if line.startswith("  "):
                continue
            gloss = line.split(" | ", 1)[1]
            raw.setdefault(_norm(gloss.split('; "')[0]).rstrip(";").strip(), set()).add(label)
    for text, y in d.test:
        assert raw[text] == {d.labels[y]}


def test_wordnet_domain_has_no_leaked_tag() -> None:
    d = _load("wordnet_domain")
    assert not any(t.startswith("(") and t.split(")")[0][1:] in d.labels for t, _ in d.train + d.val + d.test)


def test_vader_labels_agree_with_lexicon() -> None:
    d = _load("vader_polarity")
    from taskmerge.bench.datasets import vader

    with open(vader.lexicon_path(), encoding="utf-8", newline="") as fh:
        means = {row[0]: float(row[1]) for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if row}
    for text, y in d.train + d.val + d.test:
        assert (means[text] >= 0.5) if d.labels[y] == "positive" else (means[text] <= -0.5)


def test_chatterbot_category_lines_come_from_their_file() -> None:
    d = _load("chatterbot_category")
    from taskmerge.bench.datasets import chatterbot

    root = Path(chatterbot.corpus_dir()) / "english"
    lines = {}
    for label in d.labels:
        data = yaml.safe_load((root / f"{label}.yml").read_text(encoding="utf-8"))
        lines[label] = {_norm(s) for conv in data["conversations"] for s in conv if isinstance(s, str)}
    for text, y in d.train + d.test:
        assert text in lines[d.labels[y]]
        assert all(text not in lines[other] for other in d.labels if other != d.labels[y])


def test_fortune_language_ignores_other_packages_files(tmp_path: Path) -> None:
    """A fortune file another package drops into the folder (e.g. fortunes-mario, Portuguese) is not English."""
    from taskmerge.bench.datasets import fortunes

    for name in ("computers", "brasil", "mario.geral"):
        (tmp_path / name).write_text(f"a {name} saying\n%\nanother {name} saying\n%\n", encoding="utf-8")
    topics = fortunes.english_topics(str(tmp_path))
    assert set(topics) == {"computers"}
