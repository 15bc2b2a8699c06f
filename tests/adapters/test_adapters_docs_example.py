"""The front-door example in docs/adapters.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"


def test_front_door_example_runs(tmp_path, monkeypatch) -> None:
    text = DOC.read_text()
    block = re.search(r"<!-- example: adapters-front-door -->\n```python\n(.*?)```", text, re.S)
    assert block, "docs/adapters.md lost its example block"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), str(DOC), "exec"), {"__name__": "docs_example"})
    assert (tmp_path / "my-adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "my-adapter-peft" / "adapter_model.safetensors").is_file()
