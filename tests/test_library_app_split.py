"""The library (`slip`) apart from the app (`slip.app`): what another project uses never imports Hydra or OmegaConf,
and no library module imports the app."""
from __future__ import annotations

import ast
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from train_helpers import REPO_ROOT, compose_config, subprocess_env

SLIP = REPO_ROOT / "slip"
APP = SLIP / "app"
CONFIG_LIBRARIES = ("hydra", "omegaconf")

# Each snippet runs in a fresh interpreter and prints which config libraries it left in sys.modules.
LIBRARY_USES = {
    "import slip": "import slip",
    "create_model_and_transforms": """
        import slip, torch
        model, train_transform, eval_transform = slip.create_model_and_transforms("tiny")
        from PIL import Image
        image = eval_transform(Image.new("RGB", (40, 36), "red"))
        model.encode_image(image[None])
    """,
    "load_pretrained": """
        import slip, torch
        model = slip.create_model("tiny")
        slip.save_model(model, WORK / "model.pt")
        loaded = slip.load_pretrained(WORK / "model.pt")
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    """,
    "losses, tokenizer and view transforms": """
        import torch, slip
        from PIL import Image
        from slip.data.transforms import build_multiview, clip_view, eval_view
        tokens = slip.tokenize(["a photo of a cat"], context_length=32)
        assert slip.decode(tokens[0].tolist()).startswith("a photo of a cat")
        model = slip.create_model("tiny")
        views = build_multiview(inputs=["image", "text", "aug1", "aug2"], image_size=32, mean=(0.5, 0.5, 0.5),
                                std=(0.5, 0.5, 0.5), context_length=32)
        samples = [views(Image.new("RGB", (40, 36), colour), "a photo") for colour in ("red", "blue", "green")]
        batch = {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}
        for objective in (slip.CLIPLoss(), slip.SimCLRLoss(), slip.SLIPLoss(), slip.SigLIPLoss()):
            objective(model(batch))["loss"].backward()
    """,
    "eval metrics and probes": """
        import torch
        from slip.eval.knn import KnnVote, knn_accuracy
        from slip.eval.l2_sweep import L2Sweep
        from slip.eval.linear_probe import linear_probe
        from slip.eval.metrics import topk_accuracy
        generator = torch.Generator().manual_seed(0)
        train, test = torch.randn(60, 8, generator=generator), torch.randn(30, 8, generator=generator)
        train_labels, test_labels = torch.arange(60) % 3, torch.arange(30) % 3
        linear_probe(train, train_labels, test, test_labels, 3, L2Sweep(l2_grid=(1e-2,)))
        knn_accuracy(train, train_labels, test, test_labels, 3, KnnVote(k=3))
        topk_accuracy(torch.randn(30, 3, generator=generator), test_labels, (1,))
    """,
    "the fine-tuning classifier, its optimiser groups, transforms and evaluation": """
        import torch, slip
        from slip.classifier import classifier_from_model, layer_decay_groups
        from slip.data.classification import eval_transform, train_transform
        from slip.data.synthetic import SyntheticClassification
        from slip.eval.classification import ClassifierEvaluator
        classifier = classifier_from_model(slip.create_model("tiny"), 24)
        torch.optim.AdamW(layer_decay_groups(classifier, 0.05, 0.65))
        test, preprocess = SyntheticClassification(num_samples=8, image_size=32), classifier.spec.preprocess
        train_transform(32, preprocess.mean, preprocess.std)(test[0][0])
        view = eval_transform(32, preprocess.mean, preprocess.std, preprocess.interpolation)
        assert set(ClassifierEvaluator(test, view, batch_size=4)(classifier)) == {"top1", "top5"}
    """,
    "a DataLoader worker of the training data": """
        import pickle
        dataset, collate = pickle.loads((WORK / "worker.pkl").read_bytes())
        batch = collate([dataset[index] for index in range(4)])
        assert set(batch) >= {"image", "text"}
    """,
}


def _run_fresh(uses: dict[str, str], work: Path) -> dict[str, list[str]]:
    """For each use in turn, in one fresh interpreter: the config libraries in sys.modules after it ran (WORK: a
    scratch directory). One interpreter for all keeps the test cheap; the first use that imports one is named."""
    lines = ["import sys, json", "from pathlib import Path", f"WORK = Path({str(work)!r})", "seen = {}"]
    for name, code in uses.items():
        lines += [textwrap.dedent(code).strip(),
                  f"seen[{name!r}] = sorted(m for m in {CONFIG_LIBRARIES!r} if m in sys.modules)"]
    lines.append("print(json.dumps(seen))")
    result = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True,
                            env=subprocess_env(), cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _pickle_a_worker_of_the_training_data(work: Path) -> None:
    """What a spawned DataLoader worker of the default training run receives: its dataset and collate function,
    built by the app from the shipped config."""
    from slip.app.config import build
    from slip.app.train import build_run
    from slip.distributed import WorldInfo

    cfg = compose_config("experiment=debug", "loss=slip")
    parts = build_run(cfg, WorldInfo(), build(cfg.trainer, "trainer"))
    loader = parts.data.loader(epoch=0)
    (work / "worker.pkl").write_bytes(pickle.dumps((loader.dataset, loader.collate_fn)))


# The check's own test: importing the app after the library uses, in the same interpreter, must be seen.
APP_USE = {"the app": "import slip.app.train"}


@pytest.fixture(scope="module")
def seen_in_a_fresh_interpreter(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """`_run_fresh` of every library use, then of the app (one interpreter start for both tests below)."""
    work = tmp_path_factory.mktemp("fresh")
    _pickle_a_worker_of_the_training_data(work)
    return _run_fresh({**LIBRARY_USES, **APP_USE}, work)


def test_the_library_runs_without_hydra_or_omegaconf(seen_in_a_fresh_interpreter: dict[str, list[str]]) -> None:
    seen = {use: seen_in_a_fresh_interpreter[use] for use in LIBRARY_USES}
    assert list(seen_in_a_fresh_interpreter) == [*LIBRARY_USES, *APP_USE]
    assert {use: libraries for use, libraries in seen.items() if libraries} == {}


def test_the_check_sees_a_config_library_when_one_is_imported(
        seen_in_a_fresh_interpreter: dict[str, list[str]]) -> None:
    assert {use: seen_in_a_fresh_interpreter[use] for use in APP_USE} == {"the app": ["hydra", "omegaconf"]}


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, absolute (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], base]).strip(".")
            names.add(base)
    return names


def _defines_code(path: Path) -> bool:
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               for node in ast.walk(ast.parse(path.read_text())))


LIBRARY_FILES = sorted(path for path in SLIP.rglob("*.py") if APP not in path.parents)


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_no_library_module_imports_the_app_or_a_config_library(path: Path) -> None:
    imported = _imported_modules(path)
    config_libraries = sorted(name for name in imported if name.split(".")[0] in CONFIG_LIBRARIES)
    assert not config_libraries, f"{path.name} imports {config_libraries}"
    if any(name == "slip.app" or name.startswith("slip.app.") for name in imported):
        # Only the entry points users type (python -m slip.train, ...) reach into the app, and they hold no code.
        assert not _defines_code(path), f"{path.name} imports slip.app and defines functions or classes"


def test_the_launchers_are_the_commands_users_type() -> None:
    launchers = sorted(str(path.relative_to(SLIP)) for path in LIBRARY_FILES
                       if any(name.startswith("slip.app") for name in _imported_modules(path)))
    assert launchers == ["eval/__main__.py", "export.py", "finetune.py", "report.py", "train.py"]
