"""The NLP experiment of "Training-free Heterogeneous Model Merging" (Xu et al., Table IV), as an
offline CPU analogue, plus the same comparison for a ViT pair on digits.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/nlp.py [--seeds 0 1 2] [--tasks area order next topic]
        [--cache /tmp/fxmerge_nlp_cache] [--out benchmarks/results] [--no-vit]

Protocol (the paper's, scaled down; see ``fxmerge.text`` for the data):

* MultiBERTs analogue: one small BERT (4 layers, hidden 128, 4 heads, intermediate 512) per
  seed, random init from the seed, pre-trained with masked-LM on the train documents.
* Depth-heterogeneous variant, as the paper builds it: before fine-tuning, layers 0 and 2 of the
  pre-trained encoder are repeated (4 -> 6 layers; the paper repeats the even-numbered layers,
  12 -> 17).
* Fine-tuning per task from every seed, shallow and deep, with a head (pooler + classifier) whose
  init is the same for every seed and depth.
* Pairs: seeds (0, 1), (1, 2), (2, 0). Vanilla averaging: ``method="average"`` of the two
  shallow models. Homogeneous merging: ``method="permute"`` / ``"zip"`` of the two shallow
  models. Heterogeneous merging: the first seed's shallow model with the second seed's deep
  model, ``depth="lma"``, permute / zip.
* Loss barrier (Frankle et al., the paper's supplement, eq. 3): L(lam) = the test cross-entropy of
  the model at weights (1 - lam, lam) for lam in linspace(0, 1, 21) -- ``MergeResult.interpolate``
  (the merge's matches, the models weighted; for "average" plain interpolation) -- and
  barrier = max_lam L(lam) - (L(0) + L(1)) / 2. Error: 1 - test accuracy of the merged model
  (lam = 0.5), next to the end points' errors.

Trained models are cached under --cache, keyed by every setting that shapes them, so a rerun
only merges. Writes nlp.md and nlp.json.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxmerge  # noqa: E402
from fxmerge import text  # noqa: E402
from homogeneous import machine_info, source_info  # noqa: E402

PAIRS = ((0, 1), (1, 2), (2, 0))
CALIBRATION_BATCHES = 4
DATA_NOTE = (
    "Real English text that ships with Python 3.11 itself, nothing downloaded (`fxmerge.text`): the 79 topics of "
    "Python's `help()` (`pydoc_data.topics`, the language reference), cut into sections at their headings, and the "
    "docstrings of {modules} standard-library modules (and of their public classes, functions and methods) in five areas "
    "(text, numbers, files, concurrency, data structures). Code, grammar rules, doctests and headings are dropped; "
    "prose is cut into sentences of 6-40 tokens, a repeated sentence is kept once. Each document (a help section or a "
    "docstring) is in exactly one split (70/15/15, seeded), and pre-training uses the train documents only, so no test "
    "sentence is seen before testing. Tasks, in GLUE's two shapes: `area` (single sentence, 5 classes: which stdlib "
    "area a docstring sentence comes from; SST-2-like), `order` (single sentence: as written, or its words shuffled; a "
    "CoLA-like acceptability task), `paraphrase` (sentence pair: is B a copy of A with a third of its words deleted, or "
    "another sentence of A's document shortened to the same length; MRPC/QQP-shaped), `next` (sentence pair: is B the "
    "sentence after A, or a sentence of the other source; QNLI/RTE-shaped). Two harder pair tasks were tried and "
    "dropped because models of this size stayed at chance (test error 0.46-0.49 after fine-tuning): next-sentence "
    "prediction against any other document (BERT's own task) and `topic` (two help sentences from the same section or "
    "not; still in `fxmerge.text`). Why a fair "
    "stand-in: natural-language single-sentence and pair classification with BERT's input format, solved by a "
    "masked-LM pre-trained encoder fine-tuned per task -- the setting of Table IV -- but 100-1000x smaller than GLUE, "
    "technical English and a word-level tokenizer, so absolute errors are not comparable with GLUE's; the comparison "
    "between merging methods is the point."
)
MODEL_NOTE = (
    "`BertForSequenceClassification` from `BertConfig(hidden 128, 4 layers, 4 heads, intermediate 512, 64 positions, "
    "dropout 0.1)`, word vocabulary. MultiBERTs analogue: seeds 0, 1, 2 each initialise a `BertForPreTraining` and "
    "pre-train it as BERT (masked-LM, 15% masked 80/10/10, + next-sentence prediction) for {args.pretrain_epochs} epochs "
    "on one sentence pair per train sentence (`text.next_sentence_pairs`; AdamW "
    "lr {args.pretrain_lr}, warm-up 10% then linear decay, batch {args.batch_size}). Fine-tuning per task: "
    "{args.finetune_epochs} epochs, AdamW lr {args.finetune_lr}, batch {args.batch_size}, the last epoch's model; the "
    "head (pooler + classifier) is drawn from one fixed seed, the same for every model (as the paper). Deep variant "
    "(the paper repeats the even-numbered layers of 12-layer MultiBERTs to 17 layers before fine-tuning): layers 0 and "
    "2 of the pre-trained 4-layer encoder are repeated right after themselves (6 layers: 0, 0', 1, 2, 2', 3; exact "
    "copies) before fine-tuning. Pairs: (0, 1), (1, 2), (2, 0); homogeneous = both 4-layer; heterogeneous = the first "
    "seed's 4-layer model with the second seed's 6-layer model, `depth=\"lma\"`. Calibration: the first "
    "{calibration} train batches of 64."
).replace("{calibration}", str(CALIBRATION_BATCHES))
DEEP_REPEAT = (0, 2)
LAMBDAS = np.linspace(0.0, 1.0, 21)


# --------------------------------------------------------------------------------------------
# Training (cached)
# --------------------------------------------------------------------------------------------


def _key(**settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(cache: Path, name: str, settings: dict[str, Any], build: Callable[[], nn.Module], model: nn.Module) -> tuple[nn.Module, float]:
    """Load ``model``'s state from cache (``name``-key.pt), or train it with ``build`` and store it.

    Returns (model, training seconds): measured now, or as recorded when the cached model was
    trained (``name``-key.json), so a rerun reports what the training cost.
    """
    path = cache / f"{name}-{_key(**settings)}.pt"
    record = path.with_suffix(".json")
    if path.exists() and record.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), float(json.loads(record.read_text())["seconds"])
    start = time.perf_counter()
    trained = build()
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(trained.state_dict(), path)
    record.write_text(json.dumps({"seconds": seconds}))
    return trained.eval(), seconds


def _schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` of the steps, then linear decay to 0 (BERT's schedule)."""
    warm = max(1, int(warmup * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warm, max(0.0, (total_steps - step) / max(1, total_steps - warm)))
    )


def pretrain(seed: int, tokenizer: text.Tokenizer, pairs: Sequence[tuple[str, str, int]], args: argparse.Namespace) -> tuple[nn.Module, float]:
    """A BertForPreTraining initialised from ``seed`` and trained with masked-LM + next-sentence
    prediction (BERT's and MultiBERTs' objectives) on ``pairs`` (``text.next_sentence_pairs``)."""
    from transformers import BertForPreTraining

    config = text.bert_config(len(tokenizer))
    torch.manual_seed(seed)
    model = BertForPreTraining(config)
    settings = {"vocab": tokenizer.vocab, "seed": seed, "epochs": args.pretrain_epochs, "lr": args.pretrain_lr, "config": config.to_dict(), "pairs": pairs}

    def build() -> nn.Module:
        torch.manual_seed(seed)  # dropout
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.01)
        steps = args.pretrain_epochs * -(-len(pairs) // args.batch_size)
        schedule = _schedule(optimizer, steps)
        texts_a, texts_b, is_random = zip(*pairs)
        next_labels = torch.tensor(is_random, dtype=torch.int64)
        model.train()
        for epoch in range(args.pretrain_epochs):
            for inputs, labels, rows in text.mlm_batches(texts_a, texts_b, tokenizer, batch_size=args.batch_size, seed=seed * 1000 + epoch):
                loss = model(**inputs, labels=labels, next_sentence_label=next_labels[rows]).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        return model.eval()

    return _cached(args.cache, f"pretrain-s{seed}", settings, build, model)


def finetune(
    pretrained: nn.Module, seed: int, task: text.TextTask, train: list[text.Batch], deep: bool, args: argparse.Namespace, mlm_key: str
) -> tuple[nn.Module, float]:
    """``text.bert_classifier`` of ``pretrained`` (deepened when ``deep``) fine-tuned on ``train``."""
    repeat = DEEP_REPEAT if deep else ()
    model = text.bert_classifier(pretrained, task.num_labels, repeat=repeat, head_seed=0)
    settings = {"mlm": mlm_key, "task": task.name, "repeat": repeat, "epochs": args.finetune_epochs, "lr": args.finetune_lr, "n": len(train), "first": train[0][0]["input_ids"][0].tolist()}

    def build() -> nn.Module:
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.finetune_lr, weight_decay=0.01)
        schedule = _schedule(optimizer, args.finetune_epochs * len(train))
        order = np.random.default_rng(seed)
        model.train()
        for _ in range(args.finetune_epochs):
            for index in order.permutation(len(train)):
                inputs, labels = train[index]
                loss = F.cross_entropy(model(**inputs).logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        return model.eval()

    return _cached(args.cache, f"ft-{task.name}-s{seed}-{'deep' if deep else 'shallow'}", settings, build, model)


# --------------------------------------------------------------------------------------------
# Evaluation and merging
# --------------------------------------------------------------------------------------------


def _logits(output: Any) -> torch.Tensor:
    """The logits of an HF ModelOutput, a dict with "logits", a tuple (first item) or a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "logits"):
        return output["logits"]
    return output[0]


def _call(model: nn.Module, inputs: Any) -> torch.Tensor:
    return _logits(model(**inputs) if isinstance(inputs, dict) else model(inputs))


def evaluate(model: nn.Module, batches: Sequence[tuple[Any, torch.Tensor]]) -> tuple[float, float]:
    """(mean cross-entropy, error = 1 - accuracy) of ``model`` over ``batches`` (``fxmerge.evaluation.evaluate``)."""
    result = fxmerge.evaluation.evaluate(model, batches)
    return result.loss, 1.0 - result.joint


def _barrier(losses: Sequence[float]) -> float:
    return float(max(losses) - (losses[0] + losses[-1]) / 2.0)


def merge_curve(models: Sequence[nn.Module], calibration: list[Any], test: list[tuple[Any, torch.Tensor]], method: str, depth: str | None) -> dict[str, Any]:
    """Merge ``models`` once, then evaluate ``interpolate((1 - lam, lam))`` on the 21 lambdas."""
    options: dict[str, Any] = {"method": method}
    if depth is not None:
        options["depth"] = depth
    start = time.perf_counter()
    result = fxmerge.merge(list(models), calibration, **options)
    merge_seconds = time.perf_counter() - start
    losses, errors = [], []
    for lam in LAMBDAS:
        module = result.interpolate((1.0 - float(lam), float(lam)))
        module = getattr(module, "module", module)
        loss, error = evaluate(module, test)
        losses.append(loss)
        errors.append(error)
    return {
        "losses": losses,
        "errors": errors,
        "barrier": _barrier(losses),
        "error": errors[len(LAMBDAS) // 2],
        "error_ends": (errors[0], errors[-1]),
        "merge_seconds": merge_seconds,
        "seconds": time.perf_counter() - start,
    }


class _Keywords(nn.Module):
    """``model(**batch).logits`` as a one-argument module (``metrics.loss_curve`` calls model(inputs))."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return _call(self.model, inputs)


def plain_curve(model_a: nn.Module, model_b: nn.Module, test: list[tuple[Any, torch.Tensor]]) -> dict[str, Any]:
    """Vanilla averaging without fxmerge: ``metrics.loss_curve`` on the raw weights (a cross-check
    of ``merge(method="average").interpolate``; both must give the same curve)."""
    from fxmerge.metrics import loss_curve

    start = time.perf_counter()
    _, losses = loss_curve(_Keywords(model_a), _Keywords(model_b), test, F.cross_entropy, steps=len(LAMBDAS))
    state_b = model_b.state_dict()
    middle = copy.deepcopy(model_a)
    middle.load_state_dict({k: (v + state_b[k]) / 2 if v.is_floating_point() else v for k, v in model_a.state_dict().items()})
    return {"losses": [float(x) for x in losses], "barrier": _barrier(losses), "error": evaluate(middle, test)[1], "seconds": time.perf_counter() - start}


def has_interpolate() -> bool:
    """Whether this fxmerge has ``MergeResult.interpolate`` (the lead's export front end)."""
    return hasattr(fxmerge.MergeResult, "interpolate")


def run_curve(models: Sequence[nn.Module], calibration: list[Any], test: list[Any], method: str, depth: str | None) -> dict[str, Any]:
    """``merge_curve``, or {"failed": reason} -- a method that fails is reported, not hidden."""
    if not has_interpolate():
        return {"failed": "fxmerge.MergeResult.interpolate is missing (export front end not merged)"}
    try:
        return merge_curve(models, calibration, test, method, depth)
    except Exception as error:  # noqa: BLE001 -- reported in the table
        return {"failed": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}


METHODS: tuple[tuple[str, str, str | None, bool], ...] = (
    # (row, method, depth, heterogeneous pair)
    ("Vanilla averaging", "average", None, False),
    ("Homo merging: permute", "permute", None, False),
    ("Homo merging: zip", "zip", None, False),
    ("Hetero merging: permute + LMA", "permute", "lma", True),
    ("Hetero merging: zip + LMA", "zip", "lma", True),
)


def task_counts(task: text.TextTask) -> dict[str, Any]:
    return {split: {"examples": len(data), "labels": {task.label_names[k]: v for k, v in sorted(Counter(data.labels).items())}} for split, data in task.splits.items()}


def run_task(task: text.TextTask, tokenizer: text.Tokenizer, mlm: dict[int, tuple[nn.Module, str]], args: argparse.Namespace) -> dict[str, Any]:
    # Batches of similar length, each padded to its own longest example: the same losses as
    # one fixed length, for about half the compute.
    train = text.encode_batches(task, "train", tokenizer, batch_size=args.batch_size, by_length=True)
    val = text.encode_batches(task, "val", tokenizer, batch_size=150, by_length=True)
    test = text.encode_batches(task, "test", tokenizer, batch_size=150, by_length=True)
    calibration = [inputs for inputs, _ in text.encode_batches(task, "train", tokenizer, batch_size=64)[:CALIBRATION_BATCHES]]
    out: dict[str, Any] = {"kind": task.kind, "counts": task_counts(task), "max_length": max(int(inputs["input_ids"].shape[1]) for inputs, _ in test), "singles": {}, "pairs": {}, "seconds": {}}
    models: dict[tuple[int, bool], nn.Module] = {}
    train_seconds = 0.0
    for seed in args.seeds:
        for deep in (False, True):
            model, seconds = finetune(mlm[seed][0], seed, task, train, deep, args, mlm[seed][1])
            train_seconds += seconds
            models[(seed, deep)] = model
            test_loss, test_error = evaluate(model, test)
            out["singles"][f"s{seed}-{'deep' if deep else 'shallow'}"] = {"test_loss": test_loss, "test_error": test_error, "val_error": evaluate(model, val)[1], "train_seconds": seconds}
    out["seconds"]["finetune"] = train_seconds
    start = time.perf_counter()
    for seed_a, seed_b in [p for p in PAIRS if p[0] in args.seeds and p[1] in args.seeds]:
        pair: dict[str, Any] = {}
        for row, method, depth, hetero in METHODS:
            pair_models = [models[(seed_a, False)], models[(seed_b, hetero)]]
            pair[row] = run_curve(pair_models, calibration, test, method, depth)
        if not out["pairs"]:  # the cross-check of "average" on the first pair (it costs a curve)
            pair[PLAIN] = plain_curve(models[(seed_a, False)], models[(seed_b, False)], test)
        out["pairs"][f"{seed_a}-{seed_b}"] = pair
        print(f"  {task.name} pair {seed_a}-{seed_b}: " + ", ".join(f"{k}: {v.get('barrier', v.get('failed'))}" for k, v in pair.items()), flush=True)
    out["seconds"]["merge_and_curves"] = time.perf_counter() - start
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(text.TASK_NAMES))
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fxmerge_nlp_cache"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default="nlp")
    parser.add_argument("--vit-epochs", type=int, default=40)
    parser.add_argument("--no-vit", action="store_true", help="skip the ViT-on-digits pair")
    parser.add_argument("--report-only", action="store_true", help="rewrite NAME.md from NAME.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        report = json.loads((args.out / f"{args.name}.json").read_text())
        (args.out / f"{args.name}.md").write_text(format_report(report))
        return 0
    torch.set_num_threads(1)
    start = time.perf_counter()
    corpus = text.build_corpus(args.data_seed)
    tokenizer = text.build_tokenizer(corpus)
    tasks = text.build_tasks(corpus, seed=args.data_seed, names=args.tasks)
    data_seconds = time.perf_counter() - start
    pairs = text.next_sentence_pairs(corpus, "train", seed=args.data_seed)
    report: dict[str, Any] = {"command": "OMP_NUM_THREADS=1 python benchmarks/nlp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                              "machine": machine_info(), "source": source_info(), "args": {k: str(v) for k, v in vars(args).items()},
                              "corpus": {"documents": {s: {src: len(corpus.split(s, src)) for src in ("help", "doc")} for s in text.SPLITS},
                                         "sentences": {s: len(corpus.sentences(s)) for s in text.SPLITS}, "vocab": len(tokenizer)},
                              "versions": {"transformers": __import__("transformers").__version__},
                              "data_note": DATA_NOTE.format(modules=sum(len(m) for m in text.AREAS.values())), "model_note": MODEL_NOTE.format(args=args),
                              "interpolate_available": has_interpolate(), "seconds": {"data": data_seconds}, "tasks": {}, "pretrain": {}}
    mlm: dict[int, tuple[nn.Module, str]] = {}
    for seed in args.seeds:
        model, seconds = pretrain(seed, tokenizer, pairs, args)
        mlm[seed] = (model, hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.state_dict().values())).hexdigest()[:16])
        report["pretrain"][seed] = {"seconds": seconds}
        print(f"pretrained seed {seed} ({seconds:.0f} s)", flush=True)
    for name, task in tasks.items():
        print(f"task {name}: {task}", flush=True)
        report["tasks"][name] = run_task(task, tokenizer, mlm, args)
    if not args.no_vit:
        report["vit"] = run_vit(args)
    report["seconds"]["total"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (args.out / f"{args.name}.md").write_text(format_report(report))
    print(f"total {report['seconds']['total']:.0f} s", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# ViT on digits
# --------------------------------------------------------------------------------------------


VIT_SEEDS = (0, 1)


def vit_config() -> Any:
    from transformers import ViTConfig

    return ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_labels=10)


def train_vit(seed: int, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, float]:
    """A ViTForImageClassification (random init from ``seed``) trained on all 10 digit classes."""
    from transformers import ViTForImageClassification

    torch.manual_seed(seed)
    model = ViTForImageClassification(vit_config())
    settings = {"seed": seed, "epochs": args.vit_epochs, "config": model.config.to_dict(), "n": len(y), "sum": float(x.sum())}

    def build() -> nn.Module:
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        batches = -(-len(y) // 64)
        schedule = _schedule(optimizer, args.vit_epochs * batches)
        order = np.random.default_rng(seed)
        model.train()
        for _ in range(args.vit_epochs):
            permutation = torch.from_numpy(order.permutation(len(y)))
            for index in torch.split(permutation, 64):
                loss = F.cross_entropy(model(pixel_values=x[index]).logits, y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        return model.eval()

    return _cached(args.cache, f"vit-s{seed}", settings, build, model)


def run_vit(args: argparse.Namespace) -> dict[str, Any]:
    """Two ViTs from different seeds on the digits train split; average / permute / zip curves."""
    from fxmerge.data import digits_tasks

    split = digits_tasks(seed=0)
    start = time.perf_counter()
    models = [train_vit(seed, split.x_train, split.y_train, args) for seed in VIT_SEEDS]
    out: dict[str, Any] = {"train_seconds": [s for _, s in models], "counts": {"train": len(split.y_train), "test": len(split.y_test)}}
    test = [({"pixel_values": x}, y) for x, y in zip(torch.split(split.x_test, 150), torch.split(split.y_test, 150))]
    calibration = [{"pixel_values": x} for x in torch.split(split.x_train, 64)[:CALIBRATION_BATCHES]]
    out["singles"] = {f"s{seed}": dict(zip(("test_loss", "test_error"), evaluate(model, test))) for seed, (model, _) in zip(VIT_SEEDS, models)}
    pair = [model for model, _ in models]
    out["methods"] = {row: run_curve(pair, calibration, test, method, None) for row, method, _, hetero in METHODS if not hetero}
    out["methods"][PLAIN] = plain_curve(pair[0], pair[1], test)
    out["seconds"] = time.perf_counter() - start
    print("  vit: " + ", ".join(f"{k}: {v.get('barrier', v.get('failed'))}" for k, v in out["methods"].items()), flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


PLAIN = "plain interpolation (metrics.loss_curve)"
TIE = 1e-4  # barriers/errors closer than this count as equal (average and permute share end points)
ROWS = [row for row, *_ in METHODS] + [PLAIN]


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std; 0 for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _pm(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "—"
    mean, std = _stats(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _entries(report: dict[str, Any], column: str, row: str) -> list[dict[str, Any]]:
    """The per-pair results of ``row`` in ``column`` (a task name or "vit")."""
    if column == "vit":
        entry = report.get("vit", {}).get("methods", {}).get(row)
        return [entry] if entry is not None else []
    return [pair[row] for pair in report["tasks"][column]["pairs"].values() if row in pair]


def cell(report: dict[str, Any], column: str, row: str, key: str) -> list[float]:
    return [e[key] for e in _entries(report, column, row) if key in e]


def _failures(report: dict[str, Any], column: str, row: str) -> list[str]:
    return sorted({e["failed"] for e in _entries(report, column, row) if "failed" in e})


def claims(report: dict[str, Any]) -> list[str]:
    """The paper's statements about Table IV, each with what the figures here say."""
    tasks = list(report["tasks"])
    mean = {(t, r): _stats(cell(report, t, r, "barrier"))[0] if cell(report, t, r, "barrier") else None for t in tasks for r in ROWS}
    err = {(t, r): _stats(cell(report, t, r, "error"))[0] if cell(report, t, r, "error") else None for t in tasks for r in ROWS}
    vanilla = ROWS[0]
    lines: list[str] = []

    def compare(row: str, reference: str, table: dict, what: str) -> str:
        measured = [t for t in tasks if table[(t, row)] is not None and table[(t, reference)] is not None]
        if not measured:
            return f"not measured here ({'; '.join(f for t in tasks for f in _failures(report, t, row)) or 'no figures'})"
        tied = [t for t in measured if abs(table[(t, row)] - table[(t, reference)]) < TIE]
        lower = [t for t in measured if t not in tied and table[(t, row)] < table[(t, reference)]]
        detail = ", ".join(f"{t} {table[(t, row)]:.3f} vs {table[(t, reference)]:.3f}" for t in measured)
        return f"lower {what} on {len(lower)} of {len(measured)} tasks, tied (within {TIE:g}) on {len(tied)} ({detail})"

    lines.append(
        "**\"Compared to vanilla averaging, lower loss barriers can be observed for homogeneous model merging "
        "and heterogeneous model merging.\"** (In the paper's own Table IV this holds on 6 of 8 tasks: vanilla "
        "averaging has the lowest barrier on MNLI-mm, 0.59 vs 0.65/0.67, and QNLI, 0.67 vs 0.76/0.71.) Here:"
    )
    for row in ROWS[1:5]:
        lines.append(f"  - {row}: {compare(row, vanilla, mean, 'barrier')}.")
    lines.append(
        "**Heterogeneous merging is about as good as homogeneous merging** (the paper's barriers differ by "
        "at most 0.07, hetero lower on 4 of 8 tasks). Here, hetero vs homo with the same matcher:"
    )
    for hetero, homo in ((ROWS[3], ROWS[1]), (ROWS[4], ROWS[2])):
        measured = [t for t in tasks if mean[(t, hetero)] is not None and mean[(t, homo)] is not None]
        if measured:
            detail = ", ".join(f"{t} {mean[(t, hetero)]:.3f} vs {mean[(t, homo)]:.3f}" for t in measured)
            lower = sum(mean[(t, hetero)] < mean[(t, homo)] - TIE for t in measured)
            tied = sum(abs(mean[(t, hetero)] - mean[(t, homo)]) < TIE for t in measured)
            lines.append(f"  - {hetero} vs {homo}: hetero lower on {lower} of {len(measured)} tasks, tied on {tied} ({detail}).")
        else:
            lines.append(f"  - {hetero} vs {homo}: not measured here.")
    chance = {t: 1.0 - 1.0 / len(report["tasks"][t]["counts"]["test"]["labels"]) for t in tasks}
    single = {t: float(np.mean([v["test_error"] for v in report["tasks"][t]["singles"].values()])) for t in tasks}
    weak = [t for t in tasks if single[t] > 0.8 * chance[t]]
    if weak:
        lines.append(
            f"*Caveat*: on {', '.join(weak)} the fine-tuned models themselves are close to chance (mean test error "
            + ", ".join(f"{single[t]:.3f} vs chance {chance[t]:.3f}" for t in weak)
            + "), so a low barrier there says little: the loss is flat because the models know little."
        )
    at_end = [(t, r) for t in tasks for r in ROWS[:5] for e in _entries(report, t, r) if "losses" in e and max(e["losses"]) <= max(e["losses"][0], e["losses"][-1])]
    total = sum(1 for t in tasks for r in ROWS[:5] for e in _entries(report, t, r) if "losses" in e)
    lines.append(
        f"*How to read the barriers*: in {len(at_end)} of {total} BERT curves no interior point is worse than the worse end "
        "point, and then the barrier is just |L(0) - L(1)| / 2 -- the same for every method with the same end points "
        "(vanilla averaging and permute share them, which is why their barriers often agree to 1e-7 even though their "
        "curves and merged errors differ). The barrier then measures how unequal the two models are, not the path."
    )
    lines.append(
        "**Errors** (not claimed in the text; in the paper's table vanilla averaging has the lowest error on 5 "
        "of 8 tasks, e.g. SST-2 0.02 vs 0.08/0.10). Here, error of the merged model (lam = 0.5) vs vanilla averaging:"
    )
    for row in ROWS[1:5]:
        lines.append(f"  - {row}: {compare(row, vanilla, err, 'error')}.")
    lines.append("Merged models against the fine-tuned models they come from (mean test error of the single models):")
    for row in ROWS[:5]:
        measured = [t for t in tasks if err[(t, row)] is not None]
        if measured:
            lines.append(f"  - {row}: " + ", ".join(f"{t} {err[(t, row)]:.3f} vs {single[t]:.3f}" for t in measured) + ".")
    return lines


# The paper's Table IV (barrier, error), for reference: task -> (vanilla, homo, hetero).
PAPER_TABLE_IV = {
    "MNLI-mm": ((0.59, 0.06), (0.65, 0.09), (0.67, 0.07)),
    "QQP": ((1.38, 0.07), (1.11, 0.08), (1.16, 0.08)),
    "QNLI": ((0.67, 0.04), (0.76, 0.05), (0.71, 0.06)),
    "SST-2": ((0.52, 0.02), (0.38, 0.08), (0.42, 0.10)),
    "CoLA": ((1.31, 0.16), (1.11, 0.11), (1.05, 0.14)),
    "STS-B": ((5.04, 0.39), (4.32, 0.32), (4.24, 0.28)),
    "MRPC": ((2.81, 0.07), (1.87, 0.12), (1.88, 0.12)),
    "RTE": ((0.54, 0.03), (0.44, 0.03), (0.46, 0.06)),
}


def format_report(report: dict[str, Any]) -> str:
    tasks = list(report["tasks"])
    columns = tasks + (["vit"] if "vit" in report else [])
    title = {t: t for t in tasks} | {"vit": "ViT on digits"}
    out = [
        "# The paper's Table IV (merging BERTs, loss barrier and error) as an offline CPU analogue",
        "",
        "Generated by `benchmarks/nlp.py`; every figure below is read from `nlp.json` of the same run.",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['platform']}, Python {report['machine']['python']}, torch {report['machine']['torch']}, "
        f"transformers {report['versions']['transformers']}, torch threads {report['machine']['torch_threads']}  ",
        f"Source: {report['source']}  ",
        *([f"Note: {report['note']}  "] if report.get("note") else []),
        f"Seconds: total {report['seconds']['total']:.0f} (data {report['seconds']['data']:.1f}, pre-training "
        f"{sum(v['seconds'] for v in report['pretrain'].values()):.0f}, fine-tuning "
        f"{sum(t['seconds']['finetune'] for t in report['tasks'].values()):.0f}, merging + curves "
        f"{sum(t['seconds']['merge_and_curves'] for t in report['tasks'].values()):.0f}"
        + (f", ViT {report['vit']['seconds']:.0f}" if "vit" in report else "")
        + "; training seconds as measured when each model was trained, a rerun loads them from the cache)",
        "",
        "## Table: loss barrier / error (mean ± std over the seed pairs)",
        "",
        "Barrier: max over lam in linspace(0, 1, 21) of the test cross-entropy of the model at weights "
        "(1 - lam, lam), minus the mean of the two end points (Frankle et al.; the paper's supplement, eq. 3). "
        "Error: 1 - test accuracy of the merged model (lam = 0.5). BERT columns: 3 seed pairs (0-1, 1-2, 2-0); "
        "ViT: one pair (seeds 0, 1). With `permute` (and `average`) lam = 0 and 1 are the two fine-tuned models "
        "themselves; with `zip` they are not (zip also merges features inside one model), so a zip barrier is "
        "measured from its own end points, whose errors are listed under the table.",
        "",
        "| Method | " + " | ".join(title[c] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in ROWS:
        cells = []
        for column in columns:
            barrier, error = cell(report, column, row, "barrier"), cell(report, column, row, "error")
            failed = _failures(report, column, row)
            cells.append(f"{_pm(barrier)} / {_pm(error)}" if barrier else ("failed (see below)" if failed else "—"))
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    for label, deep in (("Fine-tuned models, 4 layers (error)", "shallow"), ("Fine-tuned models, 6 layers (error)", "deep")):
        cells = []
        for column in columns:
            if column == "vit":
                cells.append(_pm([v["test_error"] for v in report["vit"]["singles"].values()]) if deep == "shallow" else "—")
            else:
                cells.append(_pm([v["test_error"] for k, v in report["tasks"][column]["singles"].items() if k.endswith(deep)]))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "End points' errors of the merged models (lam = 0 and lam = 1, mean over pairs): "]
    for row in ROWS[:5]:
        parts = []
        for column in columns:
            ends = [e["error_ends"] for e in _entries(report, column, row) if "error_ends" in e]
            if ends:
                parts.append(f"{title[column]} {np.mean([a for a, _ in ends]):.3f} / {np.mean([b for _, b in ends]):.3f}")
        out.append(f"- {row}: " + ("; ".join(parts) if parts else "—"))
    failures = [(c, r, f) for c in columns for r in ROWS for f in _failures(report, c, r)]
    if failures:
        out += ["", "Failed or not run:"] + [f"- {title[c]}, {r}: {f}" for c, r, f in failures]
    out += ["", "## The paper's Table IV claims, checked", ""] + claims(report)
    out += ["", "The paper's Table IV (barrier / error; 12-layer MultiBERTs on GLUE, the 17-layer variant for hetero):", "",
            "| Task | Vanilla averaging | Homo merging | Hetero merging |", "|---|---|---|---|"]
    out += [f"| {task} | " + " | ".join(f"{b:.2f} / {e:.2f}" for b, e in cells) + " |" for task, cells in PAPER_TABLE_IV.items()]
    out += ["", "## Data", "", report["data_note"], "",
            f"Corpus: documents per split {report['corpus']['documents']}, sentences per split {report['corpus']['sentences']}, "
            f"vocabulary {report['corpus']['vocab']} tokens (train documents, count >= 2).", "",
            "| Task | kind | labels | train | val | test | tokens per example (at most) |", "|---|---|---|---|---|---|---|"]
    for name in tasks:
        counts = report["tasks"][name]["counts"]
        labels = ", ".join(f"{k}: {v}" for k, v in counts["test"]["labels"].items())
        out.append(f"| {name} | {report['tasks'][name]['kind']} | test: {labels} | {counts['train']['examples']} | "
                   f"{counts['val']['examples']} | {counts['test']['examples']} | {report['tasks'][name]['max_length']} |")
    out += ["", "Every split is balanced exactly (each label the same count; `tests/test_text.py` checks it)."]
    if "vit" in report:
        out += ["", f"ViT: `ViTForImageClassification` (image 8, patch 2, 1 channel, hidden 64, 4 layers, 4 heads, MLP 128), "
                f"trained {report['args']['vit_epochs']} epochs on the {report['vit']['counts']['train']} train digits, "
                f"tested on {report['vit']['counts']['test']}."]
    out += ["", "## Models and training", "", report["model_note"], ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
