import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "localtrain.md"


def test_train_without_backprop_example_from_the_docs():
    """The example of docs/localtrain.md, run as written there."""
    block = re.search(r"<!-- example: train-without-backprop -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None, "docs/localtrain.md lost its example"
    scope: dict = {}
    exec(compile(block.group(1), str(DOC), "exec"), scope)
    assert scope["trainer"].predictor is scope["model"]
    assert scope["scores"].shape == (256, 4)
    assert scope["loss"] > 0
