"""The README's Python API example runs as written."""
from __future__ import annotations

import re

from train_helpers import REPO_ROOT


def test_the_readme_api_example_runs(capsys) -> None:
    text = (REPO_ROOT / "README.md").read_text()
    example = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert example is not None, "README.md lost its api-example block"
    exec(compile(example.group(1), "README.md api-example", "exec"), {})
    printed = capsys.readouterr().out
    assert "tensor([[" in printed and ("'red circle'" in printed or "'blue square'" in printed)
