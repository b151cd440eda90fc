"""fxmerge.text: the offline text tasks (Python's help topics and stdlib docstrings) and the
small-BERT builders of benchmarks/nlp.py.

Checks: the corpus and tasks are deterministic and seed-dependent, splits share no document and
no sentence, every split is balanced exactly, the tokenizer round-trips known words and maps
unknown ones to [UNK], batches are HF-style int64 dicts with the right segments, masked-LM
batches follow BERT's masking, and the deepened BERT's layers are exact copies of the source
layers with a head that does not depend on the pre-trained seed or the depth.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from fxmerge import text

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def corpus() -> text.Corpus:
    return text.build_corpus(0)


@pytest.fixture(scope="module")
def tokenizer(corpus: text.Corpus) -> text.Tokenizer:
    return text.build_tokenizer(corpus)


@pytest.fixture(scope="module")
def tasks(corpus: text.Corpus) -> dict[str, text.TextTask]:
    return text.build_tasks(corpus, seed=0)


def test_corpus_is_deterministic_and_seeded(corpus: text.Corpus) -> None:
    again = text.build_corpus(0)
    assert again.documents == corpus.documents
    other = text.build_corpus(1)
    assert [d.name for d in other.documents] == [d.name for d in corpus.documents]  # same text ...
    assert [d.split for d in other.documents] != [d.split for d in corpus.documents]  # ... other splits


def test_corpus_sources_and_split_fractions(corpus: text.Corpus) -> None:
    for source in ("help", "doc"):
        counts = Counter(d.split for d in corpus.documents if d.source == source)
        total = sum(counts.values())
        assert total > 150
        for split, fraction in zip(text.SPLITS, text.SPLIT_FRACTIONS):
            assert abs(counts[split] / total - fraction) < 0.03, (source, counts)
    assert {d.area for d in corpus.documents if d.source == "doc"} == set(text.AREAS)
    assert all(d.area is None for d in corpus.documents if d.source == "help")


def test_sentences_are_prose_of_bounded_length(corpus: text.Corpus) -> None:
    sentences = [s for d in corpus.documents for s in d.sentences]
    assert len(sentences) > 3000
    for sentence in sentences:
        assert text.MIN_TOKENS <= len(text.tokenize(sentence)) <= text.MAX_TOKENS
        assert ">>>" not in sentence and "::=" not in sentence
    # the first prose sentence of the "while" help topic is in the corpus, its grammar rule is not
    assert "The \"while\" statement is used for repeated execution as long as an expression is true:" in sentences
    assert not any("while_stmt" in s for s in sentences)


def test_splits_share_no_document_and_no_sentence(corpus: text.Corpus, tasks: dict[str, text.TextTask]) -> None:
    names = [d.name for d in corpus.documents]
    assert len(names) == len(set(names))
    keys = Counter(" ".join(text.tokenize(s)) for d in corpus.documents for s in d.sentences)
    assert max(keys.values()) == 1  # every sentence lives in exactly one document
    for task in tasks.values():
        texts = {}
        for split, data in task.splits.items():
            # paraphrase's B are shortened copies, which can coincide ("See X for details." and
            # "See Y for details." both give "See for details."): only its A are originals
            texts[split] = set(data.texts_a) | (set(data.texts_b or ()) if task.name != "paraphrase" else set())
        assert not texts["train"] & texts["test"], task.name
        assert not texts["train"] & texts["val"], task.name
        assert not texts["val"] & texts["test"], task.name


def test_tasks_are_balanced_and_deterministic(corpus: text.Corpus, tasks: dict[str, text.TextTask]) -> None:
    assert set(tasks) == {"area", "order", "paraphrase", "next"}
    alone = text.build_tasks(corpus, names=["topic", "order"])
    assert set(alone) == {"topic", "order"} and alone["order"] == tasks["order"]
    for task in tasks.values():
        for split, data in task.splits.items():
            counts = Counter(data.labels)
            assert sorted(counts) == list(range(task.num_labels)), (task.name, split)
            assert len(set(counts.values())) == 1, (task.name, split, counts)
            assert len(data) >= {"train": 1000, "val": 200, "test": 150}[split], (task.name, split, len(data))
            assert len(data) <= text.CAPS[split]
            assert (data.texts_b is not None) == (task.kind == "pair")
    again = text.build_tasks(corpus, seed=0)
    assert again == tasks
    assert text.build_tasks(corpus, seed=1)["order"].splits["train"] != tasks["order"].splits["train"]


def test_task_labels_mean_what_they_say(corpus: text.Corpus, tasks: dict[str, text.TextTask]) -> None:
    where = {s: d for d in corpus.documents for s in d.sentences}
    area = tasks["area"].splits["test"]
    for sentence, label in zip(area.texts_a, area.labels):
        assert where[sentence].area == list(text.AREAS)[label]
    nxt = tasks["next"].splits["test"]
    for a, b, label in zip(nxt.texts_a, nxt.texts_b, nxt.labels):
        document = where[a]
        if label == 1:
            assert where[b] is document and document.sentences.index(b) == document.sentences.index(a) + 1
        else:
            assert where[b].source != document.source and where[b].split == document.split
    para = tasks["paraphrase"].splits["test"]
    for a, b, label in zip(para.texts_a, para.texts_b, para.labels):
        words = b.split()
        assert 0 < len(words) < len(a.split()) or (label == 0 and len(words) == 1)
        sources = [s for s in where if where[s] is where[a] and s != a] or [s for s in where if where[s].split == "test" and s != a]
        def shortens(full: str) -> bool:  # b's words are a subsequence of full's
            rest = iter(full.split())
            return all(w in rest for w in words)
        assert shortens(a) if label == 1 else any(shortens(s) for s in sources)
    topic = text.build_tasks(corpus, names=["topic"])["topic"].splits["test"]
    for a, b, label in zip(topic.texts_a, topic.texts_b, topic.labels):
        assert where[a].source == where[b].source == "help"
        assert (where[a] is where[b]) == (label == 1)
    order = tasks["order"].splits["test"]
    bags = [sorted(s.split()) for s in where]
    for sentence, label in zip(order.texts_a, order.labels):
        assert (sentence in where) == (label == 1)
        if label == 0:  # shuffled: the same multiset of words
            assert sorted(sentence.split()) in bags


def test_tokenizer_round_trip_and_unknown_words(tokenizer: text.Tokenizer) -> None:
    assert tokenizer.vocab[:5] == text.SPECIAL_TOKENS
    assert len(set(tokenizer.vocab)) == len(tokenizer.vocab)
    batch = tokenizer.encode(["The statement is used for repeated execution."], max_length=12)
    assert tokenizer.decode(batch["input_ids"][0]) == "[CLS] the statement is used for repeated execution . [SEP]"
    ids = tokenizer.ids("the zzqxv statement")
    assert ids[1] == tokenizer.token_id(text.UNK) == 1
    assert ids[0] != 1 and ids[2] != 1
    assert text.build_tokenizer(text.build_corpus(0)) == tokenizer


def test_batches_are_hf_style_int64(tasks: dict[str, text.TextTask], tokenizer: text.Tokenizer) -> None:
    batches = text.encode_batches(tasks["next"], "test", tokenizer, batch_size=50)
    assert sum(len(labels) for _, labels in batches) == len(tasks["next"].splits["test"])
    inputs, labels = batches[0]
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.dtype == torch.int64 and v.shape == (50, inputs["input_ids"].shape[1]) for v in inputs.values())
    assert labels.dtype == torch.int64 and labels.tolist() == list(tasks["next"].splits["test"].labels[:50])
    assert inputs["input_ids"].shape[1] <= text.MAX_LENGTH
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
    cls, sep = tokenizer.token_id(text.CLS), tokenizer.token_id(text.SEP)
    for row in range(50):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any() and not ids[row, n:].any()
        seps = (ids[row] == sep).nonzero().flatten().tolist()
        assert ids[row, 0] == cls and len(seps) == 2 and seps[1] == n - 1
        assert types[row, : seps[0] + 1].eq(0).all() and types[row, seps[0] + 1 : n].eq(1).all() and not types[row, n:].any()
    again = text.encode_batches(tasks["next"], "test", tokenizer, batch_size=50)
    assert all(torch.equal(x[0][k], y[0][k]) for x, y in zip(batches, again) for k in x[0])
    single = text.encode_batches(tasks["area"], "test", tokenizer)[0][0]
    assert not single["token_type_ids"].any()
    # by_length: the same examples, each batch padded to its own longest one
    fixed = text.encode_batches(tasks["paraphrase"], "test", tokenizer, batch_size=64)
    tight = text.encode_batches(tasks["paraphrase"], "test", tokenizer, batch_size=64, by_length=True)
    lengths = [int(m.shape[1]) for m in (b[0]["attention_mask"] for b in tight)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1] == fixed[0][0]["input_ids"].shape[1]
    assert all(int(b[0]["attention_mask"].sum(dim=1).max()) == b[0]["attention_mask"].shape[1] for b in tight)

    def rows(batches: list[text.Batch]) -> Counter:
        return Counter(
            (tuple(ids[mask.bool()].tolist()), int(label))
            for inputs, labels in batches
            for ids, mask, label in zip(inputs["input_ids"], inputs["attention_mask"], labels)
        )

    assert rows(tight) == rows(fixed)


def test_mlm_batches_mask_like_bert(corpus: text.Corpus, tokenizer: text.Tokenizer) -> None:
    pairs = text.next_sentence_pairs(corpus, "train", seed=0)[:512]
    texts_a, texts_b, _ = zip(*pairs)
    batches = list(text.mlm_batches(texts_a, texts_b, tokenizer, batch_size=64, seed=3))
    assert len(batches) == 8
    seen = torch.cat([rows for _, _, rows in batches])
    assert sorted(seen.tolist()) == list(range(512)) and seen.tolist() != list(range(512))  # a shuffled epoch
    predicted = changed = masked = words = 0
    for inputs, labels, rows in batches:
        original = tokenizer.encode([texts_a[i] for i in rows], [texts_b[i] for i in rows], inputs["input_ids"].shape[1])
        ids = inputs["input_ids"]
        chosen = labels != -100
        assert torch.equal(labels[chosen], original["input_ids"][chosen])
        assert (labels[chosen] >= len(text.SPECIAL_TOKENS)).all()  # only known words are predicted
        assert torch.equal(ids[~chosen], original["input_ids"][~chosen])  # the rest is untouched
        assert torch.equal(inputs["attention_mask"], original["attention_mask"])
        assert torch.equal(inputs["token_type_ids"], original["token_type_ids"])
        assert chosen.any(dim=1).all()  # at least one prediction per example
        predicted += int(chosen.sum())
        masked += int((ids[chosen] == tokenizer.token_id(text.MASK)).sum())
        changed += int((ids[chosen] != labels[chosen]).sum())
        words += int((original["input_ids"] >= len(text.SPECIAL_TOKENS)).sum())
    assert 0.75 < masked / predicted < 0.85
    assert 0.84 < changed / predicted < 0.95
    assert 0.13 < predicted / words < 0.2
    again = list(text.mlm_batches(texts_a, texts_b, tokenizer, batch_size=64, seed=3))
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0]["input_ids"], b[0]["input_ids"]) for a, b in zip(batches, again))


def test_next_sentence_pairs_are_berts(corpus: text.Corpus) -> None:
    pairs = text.next_sentence_pairs(corpus, "train", seed=0)
    where = {s: d for d in corpus.documents for s in d.sentences}
    assert len(pairs) == len(corpus.sentences("train"))
    assert [a for a, _, _ in pairs] == corpus.sentences("train")
    for a, b, label in pairs:
        assert where[b].split == "train"
        if label == 0:
            assert where[a] is where[b] and where[a].sentences.index(b) == where[a].sentences.index(a) + 1
        else:
            assert where[a] is not where[b]
    with_successor = sum(len(d.sentences) - 1 for d in corpus.split("train"))
    assert abs(sum(label == 0 for *_, label in pairs) - with_successor / 2) < 3 * (with_successor / 4) ** 0.5


def _tiny_pretrained(seed: int, layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.BertForPreTraining(text.bert_config(50, layers=layers, hidden=16, heads=2, intermediate=32, max_positions=16)).eval()


def test_deep_classifier_copies_the_repeated_layers() -> None:
    source = _tiny_pretrained(0)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    deep = text.bert_classifier(source, 3, repeat=(0, 2), head_seed=5)
    assert deep.config.num_hidden_layers == 6 and source.config.num_hidden_layers == 4
    layers = deep.bert.encoder.layer
    for position, origin in enumerate((0, 0, 1, 2, 2, 3)):
        got = layers[position].state_dict()
        want = source.bert.encoder.layer[origin].state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), (position, origin)
    assert not torch.equal(layers[0].attention.self.query.weight, layers[2].attention.self.query.weight)
    embeddings = source.bert.embeddings.state_dict()
    assert all(torch.equal(v, embeddings[k]) for k, v in deep.bert.embeddings.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())  # source untouched
    assert not torch.equal(deep.bert.pooler.dense.weight, source.bert.pooler.dense.weight)  # the head is new
    # the copies are separate tensors: training the deep model never writes the source
    assert layers[0].attention.self.query.weight.data_ptr() != layers[1].attention.self.query.weight.data_ptr()


def test_classifier_head_is_the_same_for_every_seed_and_depth() -> None:
    heads = []
    for seed, repeat in ((0, ()), (1, ()), (1, (0, 2))):
        model = text.bert_classifier(_tiny_pretrained(seed), 3, repeat=repeat, head_seed=7)
        heads.append([model.bert.pooler.dense.weight, model.bert.pooler.dense.bias, model.classifier.weight, model.classifier.bias])
    for other in heads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(heads[0], other))
    assert heads[0][2].std() > 0.01  # drawn, not zero
    shallow = text.bert_classifier(_tiny_pretrained(0), 3, head_seed=7)
    assert not torch.equal(shallow.bert.pooler.dense.weight, text.bert_classifier(_tiny_pretrained(0), 3, head_seed=8).bert.pooler.dense.weight)
    inputs = {"input_ids": torch.tensor([[2, 9, 10, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.int64)}
    assert shallow(**inputs).logits.shape == (1, 3)
    with pytest.raises(ValueError, match="repeat"):
        text.bert_classifier(_tiny_pretrained(0), 3, repeat=(4,))
