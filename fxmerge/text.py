"""Offline text classification tasks (a GLUE stand-in) and small BERTs for them.

Nothing is downloaded. The text is real English that ships with Python itself:

* **help topics**: ``pydoc_data.topics.topics``, the 79 topics of Python's interactive ``help()``
  (the language reference: statements, expressions, data model, ...; ~465k characters). One
  section of a topic (cut at its headings) is one document.
* **docstrings**: the docstrings (``__doc__``) of a fixed list of standard-library modules, of
  their public classes and functions, and of those classes' public methods, grouped into five
  areas (``AREAS``: text processing, numbers, files, concurrency, data structures). One
  docstring is one document.

Prose is kept, code is dropped: paragraphs are split on blank lines, paragraphs with indented
lines (grammar rules, examples), doctest lines and headings are removed, and the rest is split
into sentences of 6..40 tokens. Every document is assigned once to train/val/test (70/15/15,
seeded, per source and area), and every task draws its examples from the documents of the
split, so no sentence (and no document) is shared between splits. The pre-training corpus
(masked-LM + next-sentence prediction, as BERT and MultiBERTs) is the train documents only, so
no test sentence is seen at any stage.

Tasks (``build_tasks``), each balanced exactly over its labels in every split:

* ``area`` (single sentence, 5 classes; the SST-2/CoLA shape): which stdlib area does this
  docstring sentence come from?
* ``order`` (single sentence, 2 classes; a CoLA-like acceptability task): is the sentence as
  written, or are its words shuffled?
* ``next`` (sentence pair, 2 classes; the QNLI/RTE shape): is B the sentence right after A in
  the same document, or a sentence of the OTHER source (a docstring sentence after a help
  sentence, or the reverse)? Negatives from any other document, BERT's own next-sentence
  task, left models of this size at chance (measured: 0.46 test error); the other source makes
  it learnable while still needing both sentences (either source can be A).
* ``paraphrase`` (sentence pair, 2 classes; the MRPC/QQP shape): is B a shortened copy of A
  (a third of its words deleted), or another sentence of A's document shortened to the same
  length?
* ``topic`` (sentence pair, 2 classes): do two help sentences (never adjacent) come from the
  same section of a help topic? Not in the benchmark: models of this size stay at chance
  (measured: 0.49 test error).

Why a fair stand-in: like GLUE these are single-sentence and sentence-pair classification
tasks on natural English, solved by a pre-trained encoder fine-tuned per task with the same
input format ([CLS] A [SEP] B [SEP], token types, attention mask). They are much smaller (a
few thousand examples each), the language is technical, and the tokenizer is a lower-cased
word vocabulary (no word pieces), so absolute errors are not comparable with GLUE's; what the
experiment compares -- barriers and errors of merging methods across tasks -- is.

The corpus depends only on the Python version (here the stdlib of the running interpreter) and
the seed; building it takes well under a second.
"""

from __future__ import annotations

import importlib
import inspect
import re
import textwrap
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # transformers is a test extra; imported where a model is built
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification

__all__ = [
    "AREAS",
    "SPECIAL_TOKENS",
    "Batch",
    "Corpus",
    "Document",
    "TextTask",
    "Tokenizer",
    "bert_classifier",
    "bert_config",
    "build_corpus",
    "build_tasks",
    "build_tokenizer",
    "encode_batches",
    "mlm_batches",
    "next_sentence_pairs",
]

SplitName = Literal["train", "val", "test"]
SPLITS: tuple[SplitName, ...] = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)

# Area -> stdlib modules whose docstrings make up the area. Pure-Python modules with real prose;
# none of them has side effects on import.
AREAS: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "codecs", "html.parser", "email.message", "csv", "json", "gettext", "locale"),
    "numbers": ("statistics", "fractions", "_pydecimal", "random", "numbers", "cmath", "math", "operator"),
    "files": ("os", "shutil", "pathlib", "glob", "tempfile", "filecmp", "fnmatch", "zipfile", "tarfile", "_pyio", "gzip"),
    "concurrency": ("threading", "asyncio.tasks", "asyncio.events", "asyncio.streams", "subprocess", "queue", "multiprocessing.pool", "concurrent.futures", "socket", "selectors", "sched"),
    "data": ("collections", "itertools", "functools", "heapq", "bisect", "copy", "dataclasses", "enum", "typing", "abc", "contextlib", "weakref"),
}

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # ids 0..4; BERT's pad_token_id is 0

MIN_TOKENS, MAX_TOKENS = 6, 40
MAX_LENGTH = 64  # tokens per example, specials included (a pair of two long sentences is cut)
_TOKEN = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z])")
_HEADING_RULE = re.compile(r"^[*=\-~^]{3,}$")


def tokenize(text: str) -> list[str]:
    """Lower-cased word, number and punctuation tokens of ``text``."""
    return _TOKEN.findall(text.lower())


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One help topic or one docstring: its sentences in order, and the split it belongs to."""

    name: str  # "help:while", "doc:textwrap.wrap"
    source: Literal["help", "doc"]
    area: str | None  # AREAS key for docstrings, None for help topics
    split: SplitName
    sentences: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Document({self.name!r}, {self.split}, {len(self.sentences)} sentences)"


@dataclass(frozen=True)
class Corpus:
    """All documents of both sources, each assigned to one split."""

    documents: tuple[Document, ...]
    seed: int

    def split(self, split: SplitName, source: str | None = None) -> list[Document]:
        return [d for d in self.documents if d.split == split and (source is None or d.source == source)]

    def sentences(self, split: SplitName) -> list[str]:
        return [s for d in self.split(split) for s in d.sentences]

    def __repr__(self) -> str:
        counts = {s: len(self.split(s)) for s in SPLITS}
        return f"Corpus(seed={self.seed}, documents={counts}, sentences={sum(len(d.sentences) for d in self.documents)})"


def _is_prose(lines: Sequence[str]) -> bool:
    """A paragraph (dedented lines) is prose: flush left, no grammar rule or doctest, ending like a
    sentence, and mostly words (code, tables and grammar fail one of these)."""
    if any(line.startswith((" ", "\t")) for line in lines):
        return False  # a nested block: code or a grammar continuation
    if any(line.startswith((">>>", "...")) or "::=" in line for line in lines):
        return False
    tokens = tokenize(" ".join(lines))
    words = sum(token.isalpha() for token in tokens)
    return lines[-1].rstrip()[-1:] in ".!?:" and words >= 0.6 * len(tokens)


def prose_sentences(text: str) -> list[str]:
    """The prose sentences of a help text or docstring (code, headings and doctests dropped).

    Paragraphs are split on blank lines and dedented (help texts indent the description under
    each definition), then kept when ``_is_prose``; sentences of MIN_TOKENS..MAX_TOKENS tokens.
    """
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        lines = [line for line in textwrap.dedent(paragraph).splitlines() if line.strip()]
        if not lines or (len(lines) >= 2 and _HEADING_RULE.match(lines[-1].strip())):
            continue  # empty, or a heading underlined with ***, ===, ---
        if not _is_prose(lines):
            continue
        joined = " ".join(line.strip() for line in lines)
        for sentence in _SENTENCE_END.split(joined):
            sentence = sentence.strip()
            if sentence[-1:] in ".!?:" and MIN_TOKENS <= len(tokenize(sentence)) <= MAX_TOKENS:
                sentences.append(sentence)
    return sentences


def help_sections(key: str, text: str) -> list[tuple[str, str]]:
    """A help topic cut at its headings (a line underlined with ***, ===, ---): (name, text) pairs.

    The first section is named ``key``, the others ``key/heading``. Big topics (the data model,
    ``specialnames``, has ~8.5k words) thus become many documents of a size like the others'.
    """
    lines = text.splitlines()
    sections: list[tuple[str, list[str]]] = [(key, [])]
    for i, line in enumerate(lines):
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.strip() and _HEADING_RULE.match(following) and abs(len(following) - len(line.strip())) <= 2:
            sections.append((f"{key}/{line.strip()}", []))
        sections[-1][1].append(line)
    return [(name, "\n".join(body)) for name, body in sections]


def _own_doc(obj: object) -> str | None:
    """``obj``'s own docstring (a class's inherited docstring is not its own)."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else None


def _module_docstrings(module_name: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of a module, its public classes/functions and their methods."""
    module = importlib.import_module(module_name)
    found: list[tuple[str, str]] = []
    if module.__doc__:
        found.append((module_name, module.__doc__))
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private, or re-exported from another module (counted there or not at all)
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        doc = _own_doc(obj)
        if doc:
            found.append((f"{module_name}.{name}", doc))
        if inspect.isclass(obj):
            for method_name, method in sorted(vars(obj).items()):
                function = getattr(method, "__func__", method)
                if method_name.startswith("_") or not (inspect.isfunction(function) or inspect.isbuiltin(function)):
                    continue
                if function.__doc__:
                    found.append((f"{module_name}.{name}.{method_name}", function.__doc__))
    return found


def _assign_splits(names: Sequence[str], rng: np.random.Generator) -> list[SplitName]:
    """A split per name: a seeded shuffle cut at 70/15/15 (at least one test and val when n >= 3)."""
    order = rng.permutation(len(names))
    n_val = max(1, round(SPLIT_FRACTIONS[1] * len(names))) if len(names) >= 3 else 0
    n_test = max(1, round(SPLIT_FRACTIONS[2] * len(names))) if len(names) >= 3 else 0
    splits: list[SplitName] = ["train"] * len(names)
    for rank, index in enumerate(order):
        splits[index] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits


def build_corpus(seed: int = 0) -> Corpus:
    """Help topics and stdlib docstrings as documents, each assigned to one split by ``seed``.

    Documents are split per source (and per area for docstrings), so each area has the same
    train/val/test proportions. A sentence that occurs again (same tokens) is dropped after its
    first occurrence (help topics first, then areas and modules in ``AREAS`` order, members
    sorted by name); documents left without a sentence are dropped.
    """
    from pydoc_data.topics import topics

    rng = np.random.default_rng(seed)
    groups: list[tuple[Literal["help", "doc"], str | None, list[tuple[str, tuple[str, ...]]]]] = []
    help_docs = [(f"help:{name}", tuple(prose_sentences(body))) for key in sorted(topics) for name, body in help_sections(key, topics[key])]
    groups.append(("help", None, help_docs))
    for area, module_names in AREAS.items():
        docs = [(f"doc:{name}", tuple(prose_sentences(body))) for module_name in module_names for name, body in _module_docstrings(module_name)]
        groups.append(("doc", area, docs))
    # Each sentence is kept in its first document only ("Return self." and aliases' docstrings
    # recur), so no sentence can be in two splits.
    seen: set[str] = set()
    for index, (source, area, docs) in enumerate(groups):
        kept = []
        for name, sentences in docs:
            fresh = []
            for sentence in sentences:
                key = " ".join(tokenize(sentence))
                if key not in seen:
                    seen.add(key)
                    fresh.append(sentence)
            if fresh:
                kept.append((name, tuple(fresh)))
        groups[index] = (source, area, kept)
    documents: list[Document] = []
    for source, area, docs in groups:
        for (name, sentences), split in zip(docs, _assign_splits([n for n, _ in docs], rng)):
            documents.append(Document(name, source, area, split, sentences))
    return Corpus(tuple(documents), seed)


# --------------------------------------------------------------------------------------------
# Tokenizer and batches
# --------------------------------------------------------------------------------------------


Batch = tuple[dict[str, Tensor], Tensor]  # ({"input_ids", "attention_mask", "token_type_ids"}, labels)


@dataclass(frozen=True)
class Tokenizer:
    """A lower-cased word vocabulary: ``SPECIAL_TOKENS`` (ids 0..4), then words by frequency."""

    vocab: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", {token: i for i, token in enumerate(self.vocab)})

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"Tokenizer({len(self.vocab)} tokens)"

    def token_id(self, token: str) -> int:
        return self._ids.get(token, self._ids[UNK])  # type: ignore[attr-defined]

    def ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens; unknown words are [UNK] (1)."""
        return [self.token_id(t) for t in tokenize(text)]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """The tokens of ``ids`` joined by spaces, [PAD] dropped."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return " ".join(self.vocab[i] for i in values if i != 0)

    def encode(self, texts_a: Sequence[str], texts_b: Sequence[str] | None = None, max_length: int = 64) -> dict[str, Tensor]:
        """HF-style batch: ``input_ids``, ``attention_mask``, ``token_type_ids``, each (N, max_length) int64.

        ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` (token type 1 for b and its [SEP]), padded
        with [PAD] (0) to ``max_length``; a pair too long is truncated longest-first.
        """
        if texts_b is not None and len(texts_b) != len(texts_a):
            raise ValueError(f"Tokenizer.encode: {len(texts_a)} first sentences but {len(texts_b)} second ones")
        cls_id, sep_id = self.token_id(CLS), self.token_id(SEP)
        input_ids = torch.zeros(len(texts_a), max_length, dtype=torch.int64)
        token_types = torch.zeros_like(input_ids)
        mask = torch.zeros_like(input_ids)
        for row, text_a in enumerate(texts_a):
            a = self.ids(text_a)
            b = self.ids(texts_b[row]) if texts_b is not None else None
            budget = max_length - (3 if b is not None else 2)
            while len(a) + (len(b) if b is not None else 0) > budget:
                if b is not None and len(b) > len(a):
                    b.pop()
                else:
                    a.pop()
            ids = [cls_id, *a, sep_id]
            types = [0] * len(ids)
            if b is not None:
                ids += [*b, sep_id]
                types += [1] * (len(b) + 1)
            input_ids[row, : len(ids)] = torch.tensor(ids)
            token_types[row, : len(ids)] = torch.tensor(types)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types}


def build_tokenizer(corpus: Corpus, min_count: int = 2, max_size: int = 4000) -> Tokenizer:
    """Vocabulary of the TRAIN documents: tokens seen >= ``min_count`` times, most frequent first
    (ties alphabetical), at most ``max_size`` entries including the special tokens."""
    counts = Counter(t for s in corpus.sentences("train") for t in tokenize(s))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return Tokenizer(SPECIAL_TOKENS + tuple(words[: max_size - len(SPECIAL_TOKENS)]))


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSplit:
    """The examples of one split: first sentences, second sentences (pair tasks) and labels (N,)."""

    texts_a: tuple[str, ...]
    texts_b: tuple[str, ...] | None
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"TaskSplit({len(self)} examples, labels {dict(sorted(Counter(self.labels).items()))})"


@dataclass(frozen=True)
class TextTask:
    """One classification task: its name, kind, label names and the three splits."""

    name: str
    kind: Literal["single", "pair"]
    label_names: tuple[str, ...]
    splits: Mapping[str, TaskSplit]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __repr__(self) -> str:
        sizes = {s: len(self.splits[s]) for s in SPLITS}
        return f"TextTask({self.name!r}, {self.kind}, {self.num_labels} labels, {sizes})"


def _balanced(examples: Sequence[tuple[str, str | None, int]], num_labels: int, cap: int | None, rng: np.random.Generator) -> TaskSplit:
    """Exactly as many examples of every label (the rarest label's count, at most cap/num_labels),
    drawn without replacement, in a seeded random order."""
    by_label = [[e for e in examples if e[2] == label] for label in range(num_labels)]
    per_label = min(len(group) for group in by_label)
    if cap is not None:
        per_label = min(per_label, cap // num_labels)
    chosen = [group[i] for group in by_label for i in sorted(rng.choice(len(group), per_label, replace=False))]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    pair = any(e[1] is not None for e in chosen)
    return TaskSplit(
        tuple(e[0] for e in chosen),
        tuple(e[1] for e in chosen) if pair else None,  # type: ignore[misc]
        tuple(e[2] for e in chosen),
    )


def _area_examples(corpus: Corpus, split: SplitName, _rng: np.random.Generator) -> list[tuple[str, str | None, int]]:
    names = list(AREAS)
    return [(s, None, names.index(d.area)) for d in corpus.split(split, "doc") for s in d.sentences]  # type: ignore[arg-type]


def _order_examples(corpus: Corpus, split: SplitName, rng: np.random.Generator) -> list[tuple[str, str | None, int]]:
    # Each sentence appears once, as written (1) or with its words shuffled (0), by a seeded coin.
    examples: list[tuple[str, str | None, int]] = []
    for sentence in corpus.sentences(split):
        if rng.random() < 0.5:
            examples.append((sentence, None, 1))
        else:
            words = sentence.split()
            shuffled = " ".join(words[i] for i in rng.permutation(len(words)))
            if shuffled != sentence:
                examples.append((shuffled, None, 0))
    return examples


def _next_examples(corpus: Corpus, split: SplitName, rng: np.random.Generator) -> list[tuple[str, str | None, int]]:
    # One example per sentence with a successor: (s_i, s_{i+1}) -> 1, or (s_i, a sentence of a
    # document of the OTHER source, same split) -> 0.
    examples: list[tuple[str, str | None, int]] = []
    for source, other_source in (("help", "doc"), ("doc", "help")):
        others = corpus.split(split, other_source)
        for document in corpus.split(split, source):
            for i in range(len(document.sentences) - 1):
                if rng.random() < 0.5:
                    examples.append((document.sentences[i], document.sentences[i + 1], 1))
                else:
                    other = others[int(rng.integers(len(others)))]
                    examples.append((document.sentences[i], other.sentences[int(rng.integers(len(other.sentences)))], 0))
    return examples


def _drop_words(sentence: str, rng: np.random.Generator, keep: int | None = None) -> str:
    """``sentence`` shortened to ``keep`` words (default: a third, at least one, deleted), in order."""
    words = sentence.split()
    keep = len(words) - max(1, round(len(words) / 3)) if keep is None else max(1, min(keep, len(words) - 1))
    kept = sorted(rng.choice(len(words), keep, replace=False).tolist())
    return " ".join(words[i] for i in kept)


def _paraphrase_examples(corpus: Corpus, split: SplitName, rng: np.random.Generator) -> list[tuple[str, str | None, int]]:
    # One example per sentence: (s, s with a third of its words deleted) -> 1, or (s, another
    # sentence of the same document -- of the split when the document has one sentence --
    # shortened to the same length) -> 0.
    examples: list[tuple[str, str | None, int]] = []
    documents = corpus.split(split)
    for index, document in enumerate(documents):
        for i, sentence in enumerate(document.sentences):
            if rng.random() < 0.5:
                examples.append((sentence, _drop_words(sentence, rng), 1))
                continue
            if len(document.sentences) > 1:
                other = document.sentences[(i + 1 + int(rng.integers(len(document.sentences) - 1))) % len(document.sentences)]
            else:
                neighbour = documents[(index + 1 + int(rng.integers(len(documents) - 1))) % len(documents)]
                other = neighbour.sentences[int(rng.integers(len(neighbour.sentences)))]
            # as long as the positive's B would be, so the length of B does not give the label away
            examples.append((sentence, _drop_words(other, rng, keep=len(_drop_words(sentence, rng).split())), 0))
    return examples


def _topic_examples(corpus: Corpus, split: SplitName, rng: np.random.Generator) -> list[tuple[str, str | None, int]]:
    # One example per help sentence: a non-adjacent sentence of the same section -> 1, or a
    # sentence of another section of the same split -> 0.
    documents = [d for d in corpus.split(split, "help")]
    examples: list[tuple[str, str | None, int]] = []
    for index, document in enumerate(documents):
        others = [d for k, d in enumerate(documents) if k != index]
        for i, sentence in enumerate(document.sentences):
            same = [j for j in range(len(document.sentences)) if abs(j - i) >= 2]
            if rng.random() < 0.5 and same:
                examples.append((sentence, document.sentences[int(rng.choice(same))], 1))
            elif others:
                other = others[int(rng.integers(len(others)))]
                examples.append((sentence, other.sentences[int(rng.integers(len(other.sentences)))], 0))
    return examples


_TASKS = {
    "area": ("single", tuple(AREAS), _area_examples),
    "order": ("single", ("shuffled", "original"), _order_examples),
    "next": ("pair", ("not next", "next"), _next_examples),
    "topic": ("pair", ("other section", "same section"), _topic_examples),
    "paraphrase": ("pair", ("other sentence", "shortened copy"), _paraphrase_examples),
}
TASK_NAMES = ("area", "order", "paraphrase", "next")  # the benchmark's; "topic" on request
CAPS = {"train": 1200, "val": 240, "test": 300}  # examples per split, at most


def build_tasks(
    corpus: Corpus, seed: int = 0, caps: Mapping[str, int | None] | None = None, names: Sequence[str] = TASK_NAMES
) -> dict[str, TextTask]:
    """The tasks ``names`` over ``corpus``, every split balanced over its labels.

    caps: split -> the most examples kept (default ``CAPS``), so that a benchmark's cost does
    not grow with the corpus. Deterministic in (corpus, seed).
    """
    caps = CAPS if caps is None else caps
    tasks: dict[str, TextTask] = {}
    for name in names:
        if name not in _TASKS:
            raise ValueError(f"build_tasks: unknown task {name!r}; known: {list(_TASKS)}")
        kind, label_names, make = _TASKS[name]
        splits = {}
        for split_index, split in enumerate(SPLITS):
            # keyed by the task's name: a task's examples do not depend on which others are built
            rng = np.random.default_rng([seed, zlib.crc32(name.encode()), split_index])
            splits[split] = _balanced(make(corpus, split, rng), len(label_names), caps.get(split), rng)
        tasks[name] = TextTask(name, kind, label_names, splits)  # type: ignore[arg-type]
    return tasks


def encode_batches(
    task: TextTask, split: SplitName, tokenizer: Tokenizer, batch_size: int = 64, max_length: int | None = None, *, by_length: bool = False
) -> list[Batch]:
    """The split cut into HF-style batches (dict of (n, L) int64, labels (n,) int64).

    Default: in order, L = ``max_length`` or the longest example of the WHOLE task plus its
    special tokens, at most ``MAX_LENGTH`` (longer pairs are truncated longest-first), so every
    batch of a task has the same shape. ``by_length``: the examples sorted by length (stable),
    each batch padded only to its own longest example (same truncation) -- the same examples
    and losses for a fraction of the compute.
    """
    data = task.splits[split]
    lengths = [len(tokenize(a)) + (len(tokenize(b)) + 1 if b is not None else 0) + 2 for a, b in zip(data.texts_a, data.texts_b or [None] * len(data))]
    if max_length is None:
        longest = max(
            len(tokenize(a)) + (len(tokenize(b)) + 1 if b is not None else 0)
            for s in task.splits.values()
            for a, b in zip(s.texts_a, s.texts_b or [None] * len(s))
        )
        max_length = min(longest + 2, MAX_LENGTH)
    order = sorted(range(len(data)), key=lambda i: lengths[i]) if by_length else list(range(len(data)))
    batches: list[Batch] = []
    for start in range(0, len(data), batch_size):
        rows = order[start : start + batch_size]
        length = min(max(lengths[i] for i in rows), max_length) if by_length else max_length
        texts_b = [data.texts_b[i] for i in rows] if data.texts_b is not None else None
        inputs = tokenizer.encode([data.texts_a[i] for i in rows], texts_b, length)
        batches.append((inputs, torch.tensor([data.labels[i] for i in rows], dtype=torch.int64)))
    return batches


def next_sentence_pairs(corpus: Corpus, split: SplitName = "train", seed: int = 0) -> list[tuple[str, str, int]]:
    """BERT's pre-training pairs: every sentence once as A, with B its successor (label 0) or,
    by a seeded coin or when A is a document's last sentence, a sentence of another document of
    the split (label 1; HF's ``next_sentence_label`` convention)."""
    rng = np.random.default_rng(seed)
    documents = corpus.split(split)
    pairs: list[tuple[str, str, int]] = []
    for index, document in enumerate(documents):
        for i, sentence in enumerate(document.sentences):
            if i + 1 < len(document.sentences) and rng.random() < 0.5:
                pairs.append((sentence, document.sentences[i + 1], 0))
            else:
                other = documents[(index + 1 + int(rng.integers(len(documents) - 1))) % len(documents)]
                pairs.append((sentence, other.sentences[int(rng.integers(len(other.sentences)))], 1))
    return pairs


def mlm_batches(
    texts_a: Sequence[str], texts_b: Sequence[str] | None, tokenizer: Tokenizer, *, batch_size: int = 64, seed: int = 0, mask_fraction: float = 0.15
) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor]]:
    """One epoch of masked-LM batches over the examples (single sentences or pairs), seeded order.

    Yields (inputs, labels (n, L) int64, rows (n,) int64 -- the examples' indices): BERT's
    masking -- ``mask_fraction`` of the known words (at least one per example that has one) are
    predicted; of those 80% become [MASK], 10% a random word, 10% stay; labels are -100
    elsewhere. L is the batch's longest example + its special tokens, at most ``MAX_LENGTH``.
    """
    rng = np.random.default_rng(seed)
    first_word = len(SPECIAL_TOKENS)
    mask_id = tokenizer.token_id(MASK)
    extra = 3 if texts_b is not None else 2
    lengths = [len(tokenize(a)) + (len(tokenize(texts_b[i])) if texts_b is not None else 0) + extra for i, a in enumerate(texts_a)]
    order = rng.permutation(len(texts_a))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        length = min(max(lengths[i] for i in rows), MAX_LENGTH)
        inputs = tokenizer.encode([texts_a[i] for i in rows], [texts_b[i] for i in rows] if texts_b is not None else None, length)
        ids = inputs["input_ids"]
        real = ids >= first_word  # words only: never a special token or [UNK]
        draw = torch.from_numpy(rng.random(ids.shape))
        chosen = real & (draw < mask_fraction)
        # At least one prediction per example: its first known word when the draw chose none.
        none = ~chosen.any(dim=1) & real.any(dim=1)
        chosen[none, real[none].to(torch.int8).argmax(dim=1)] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        kind = torch.from_numpy(rng.random(ids.shape))
        random_words = torch.from_numpy(rng.integers(first_word, len(tokenizer), ids.shape)).to(torch.int64)
        masked = ids.clone()
        masked[chosen & (kind < 0.8)] = mask_id
        swap = chosen & (kind >= 0.8) & (kind < 0.9)
        masked[swap] = random_words[swap]
        inputs["input_ids"] = masked
        yield inputs, labels, torch.as_tensor(rows, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def bert_config(vocab_size: int, *, layers: int = 4, hidden: int = 128, heads: int = 4, intermediate: int = 512, max_positions: int = MAX_LENGTH, num_labels: int = 2) -> "BertConfig":
    """A small BERT configuration (dropout as BERT's defaults, 0.1)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
        pad_token_id=0,
    )


def bert_classifier(
    pretrained: "BertForPreTraining | BertForMaskedLM", num_labels: int, *, repeat: Sequence[int] = (), head_seed: int = 0
) -> "BertForSequenceClassification":
    """A sequence classifier whose embeddings and encoder are copies of ``pretrained``'s.

    repeat: encoder layers to repeat, each right after itself, as the heterogeneous-merging
    paper deepens MultiBERTs before fine-tuning (it repeats the even-numbered layers: 12 -> 17).
    With ``repeat=(0, 2)`` a 4-layer encoder becomes 6 layers: 0, 0, 1, 2, 2, 3 -- the copies
    have the same weights as their source. The head (pooler and classifier) is initialised from
    ``head_seed`` alone, as BERT initialises it (N(0, initializer_range) weights, zero biases),
    so it is the same for every pre-training seed and every depth. ``pretrained`` is not modified.
    """
    import copy

    from transformers import BertForSequenceClassification

    layers = pretrained.config.num_hidden_layers
    if any(not 0 <= k < layers for k in repeat) or len(set(repeat)) != len(repeat):
        raise ValueError(f"bert_classifier: repeat must name distinct layers in 0..{layers - 1}, got {tuple(repeat)}")
    order = [k for layer in range(layers) for k in ([layer, layer] if layer in repeat else [layer])]
    config = copy.deepcopy(pretrained.config)
    config.num_hidden_layers = len(order)
    config.num_labels = num_labels
    model = BertForSequenceClassification(config)
    source = pretrained.bert.state_dict()
    state = {}
    for key, value in source.items():
        if key.startswith("pooler."):
            continue  # part of the head: drawn from head_seed below
        match = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
        if match is None:
            state[key] = value.clone()
        else:
            for position, layer in enumerate(order):
                if layer == int(match.group(1)):
                    state[f"encoder.layer.{position}.{match.group(2)}"] = value.clone()
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"bert_classifier: state mismatch, missing {missing}, unexpected {unexpected}")
    generator = torch.Generator().manual_seed(head_seed)
    std = config.initializer_range
    with torch.no_grad():
        for linear in (model.bert.pooler.dense, model.classifier):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)
            linear.bias.zero_()
    return model.eval()
