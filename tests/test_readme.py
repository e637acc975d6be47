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


def test_the_experiments_downstream_table_follows_slips_order_and_the_catalogs_metrics() -> None:
    from omegaconf import OmegaConf

    from slip.eval.metric_names import SLIP_TABLE_ORDER

    text = (REPO_ROOT / "experiments" / "README.md").read_text()
    section = text[text.index("## 4. SLIP's downstream table"):]
    rows = re.findall(r"^\| [^|]+ \| `(\w+)` \| ([^|]+) \|", section, re.M)
    assert tuple(key for key, _ in rows) == SLIP_TABLE_ORDER
    catalog = OmegaConf.load(REPO_ROOT / "conf" / "catalog" / "default.yaml")
    shown = {"top1": "top-1", "mean_per_class": "mean per-class", "mean_top1_top5": "(top-1 + top-5) / 2",
             "roc_auc": "ROC AUC"}
    for key, metric in rows:
        assert metric.strip() == shown[catalog[key].get("metric") or "top1"], key


def test_the_layout_section_names_every_module_under_its_folder() -> None:
    """Every module of slip/ and slip/app/ (sources/ excepted: named as a folder) is in the README's Layout section,
    under the bullet list of its floor (library or app)."""
    text = (REPO_ROOT / "README.md").read_text()
    layout = text[text.index("**Layout.**"):text.index("`.ci/run` installs everything")]
    library, app = layout.split("The app, `slip/app/`:")
    slip_dir = REPO_ROOT / "slip"
    missing = []
    for path in sorted(slip_dir.rglob("*.py")):
        relative = path.relative_to(slip_dir)
        if path.name == "__init__.py" and relative.parent.name != "models" or "sources" in relative.parts:
            continue
        section = app if relative.parts[0] == "app" else library
        if f"`{path.name}`" not in section and f"`{relative.as_posix()}`" not in section \
                and f"`slip/{relative.as_posix()}`" not in section:
            missing.append(str(relative))
    assert missing == []
