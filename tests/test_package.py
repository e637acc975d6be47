"""The package surface: every public name resolves, and light entry points do not import torch."""
from __future__ import annotations

import subprocess
import sys

import slip
from train_helpers import subprocess_env


def test_every_public_name_resolves() -> None:
    for name in slip.__all__:
        assert getattr(slip, name) is not None, name


def test_importing_the_report_does_not_import_torch() -> None:
    code = "import sys, slip, slip.report; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                            check=True)
    assert result.stdout.strip() == "[]"
