"""The user's own models and data from the command line: ``pkg.module:factory`` callables and local Hugging Face
model directories (loaded offline), with calibration batches from ``pkg.module:batches`` or, for a Hugging Face
model, built-in sentences run through the model's own tokenizer."""

from __future__ import annotations

import ast
import difflib
import importlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

SPEC_HELP = "a local Hugging Face model directory, or pkg.module:factory (a callable returning an nn.Module)"
# Standard-library modules whose docstrings serve as built-in calibration text: every Python install carries them.
TEXT_MODULES = ("json", "csv", "argparse", "pathlib", "textwrap", "statistics", "fractions", "calendar")


def load_object(spec: str, what: str = "--model") -> Any:
    """The object named by ``"pkg.module:attribute"`` (attribute may be dotted); errors name the flag."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what} expects pkg.module:name (e.g. mypkg.models:make_model), got {spec!r}")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: a module beside the user's shell is importable
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"{what}: cannot import module {module_name!r} ({err})") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{what}: {module_name!r} has no attribute {attribute!r}{hint}")
        obj = getattr(obj, part)
    return obj


def is_hf_directory(spec: str) -> bool:
    return (Path(spec) / "config.json").is_file()


@dataclass
class UserModel:
    """A model from the command line: ``source`` is what the user named; ``hf_dir`` is set for Hugging Face
    directories (the exported model keeps their config and tokenizer)."""

    model: nn.Module
    source: str
    hf_dir: Path | None = None


def load_model(spec: str) -> UserModel:
    """``spec``: a local Hugging Face directory (loaded offline with the class its config names) or
    ``pkg.module:factory``."""
    if is_hf_directory(spec):
        return UserModel(load_hf_model(Path(spec)), spec, Path(spec))
    if Path(spec).exists():
        raise ValueError(f"--model {spec!r} is a path without a config.json: not a Hugging Face model directory")
    factory = load_object(spec)
    if not callable(factory):
        raise ValueError(f"--model {spec!r} names a {type(factory).__name__}, not a callable returning an nn.Module")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return UserModel(model, spec)


def load_hf_model(path: Path) -> nn.Module:
    """The model class the directory's config names (falling back to ``AutoModel``), offline, in eval mode."""
    import transformers

    config = json.loads((path / "config.json").read_text())
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    cls = cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModel
    return cls.from_pretrained(str(path), local_files_only=True).eval()


def load_batches(spec: str) -> list[Any]:
    """Calibration batches from ``pkg.module:batches``: a list/iterable of batches or a callable returning one."""
    obj = load_object(spec, "--calibration")
    batches = obj() if callable(obj) else obj
    if not isinstance(batches, Iterable) or isinstance(batches, str | bytes):
        raise ValueError(f"--calibration {spec!r} must give an iterable of batches, got {type(batches).__name__}")
    out = list(batches)
    if not out:
        raise ValueError(f"--calibration {spec!r} gave no batches")
    return out


def builtin_sentences(count: int) -> list[str]:
    """``count`` sentences from the first lines of standard-library docstrings, in a fixed order."""
    import inspect

    texts: list[str] = []
    for name in TEXT_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and (doc := ast.get_docstring(node)):
                line = doc.strip().splitlines()[0].strip()
                if len(line.split()) >= 4 and line not in texts:
                    texts.append(line)
                if len(texts) == count:
                    return texts
    return texts


def hf_text_batches(hf_dir: Path, batches: int, batch_size: int = 16) -> list[dict[str, Any]]:
    """Tokenized built-in sentences for a Hugging Face model directory (its own tokenizer, offline)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    texts = builtin_sentences(batches * batch_size)
    return [
        dict(tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        for i in range(0, len(texts), batch_size)
    ]


def calibration_for(user: UserModel, spec: str | None, batches: int) -> tuple[list[Any], str]:
    """Calibration batches and a line saying where they came from."""
    if spec is not None:
        return load_batches(spec), f"batches from {spec}"
    if user.hf_dir is not None:
        return hf_text_batches(user.hf_dir, batches), f"{batches} batches of built-in sentences (model's tokenizer)"
    return [], "none (pass --calibration pkg.module:batches for calibrated methods)"
