"""python -m slip.export CHECKPOINT --to {open_clip,hf,safetensors} --out DIR: a model in another library's format.

CHECKPOINT is anything `slip.load_pretrained` reads. DIR must not exist or be empty; it gets the target's files
and a README.md model card (architecture, objective, training data and step, evaluation results found in the run
directory). A model the target cannot express exactly stops with one line naming the missing piece, and nothing
is written; parts the target has no place for (the SSL head) are left out and said so. SigLIP's learned logit
bias, which the objective holds, goes into the safetensors file (`objective.logit_bias`) and the open_clip model
(`logit_bias`); a transformers CLIPModel has no place for it, so that export warns on stderr, naming the value.
The model card states the bias wherever there is one.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from omegaconf import OmegaConf

from slip.checkpoint import CheckpointError, CheckpointInfo, find_logit_bias
from slip.interop.common import Converted, Exported, ExportError
from slip.models import ImageTextModel, ModelSpec
from slip.pretrained import build_converted, read_pretrained
from slip.app.report import read_run
from slip.app.run_layout import run_dir_of

__all__ = ["TARGETS", "export", "main", "model_card"]

SAFETENSORS_FILE = "model.safetensors"


def _leaving_out(exported: Exported, objective_state: Mapping[str, torch.Tensor], kept: set[str],
                 target: str) -> Exported:
    """`exported` with a warning for each objective tensor not in `kept`: scores computed without it differ."""
    warnings = [f"the objective's {key}={float(value)!r} has no place in {target} and was left out "
                f"(sigmoid scores need it; the model card states its value)" if value.numel() == 1 else
                f"the objective's {key} (shape {tuple(value.shape)}) has no place in {target} and was left out"
                for key, value in objective_state.items() if key not in kept]
    return Exported(exported.files, exported.notes, exported.warnings + warnings)


def _to_safetensors(model: ImageTextModel, out_dir: Path, converted: Converted) -> Exported:
    from slip.interop.safetensors_io import save_safetensors

    return Exported([save_safetensors(model, out_dir / SAFETENSORS_FILE, converted.info,
                                      converted.objective_state)])


def _to_open_clip(model: ImageTextModel, out_dir: Path, converted: Converted) -> Exported:
    from slip.interop.open_clip import export_open_clip

    bias = find_logit_bias(converted.objective_state)
    exported = export_open_clip(model, out_dir, None if bias is None else bias[1])
    return _leaving_out(exported, converted.objective_state, {bias[0]} if bias else set(), "an open_clip model")


def _to_hf(model: ImageTextModel, out_dir: Path, converted: Converted) -> Exported:
    from slip.interop.hf import export_hf

    return _leaving_out(export_hf(model, out_dir), converted.objective_state, set(),
                        "a transformers CLIPModel")


TARGETS: dict[str, Callable[[ImageTextModel, Path, Converted], Exported]] = {
    "safetensors": _to_safetensors,
    "open_clip": _to_open_clip,
    "hf": _to_hf,
}


def _architecture(spec: ModelSpec) -> str:
    """One line describing the towers and the joint space."""
    parts = [f"image tower: {spec.vision.describe(spec.preprocess.image_size)}"]
    if "text" in spec.inputs:
        text = spec.text
        parts.append(f"text tower: width {text.width}, {text.layers} layers, {text.heads} "
                     f"heads, context {text.context_length}, vocabulary {text.vocab_size}")
        parts.append(f"joint space: {spec.head.embed_dim}")
    parts.append(f"normalisation: mean {spec.preprocess.mean}, std {spec.preprocess.std}")
    return "; ".join(parts)


def _training_data(config_text: str | None) -> str | None:
    """The training data a run's config names: the source's or stream's builder and its paths."""
    if not config_text:
        return None
    data = OmegaConf.select(OmegaConf.create(config_text), "data", default=None)
    if data is None:
        return None
    node = data.get("source") or data.get("stream") or {}
    settings = ", ".join(f"{key}={value}" for key, value in node.items() if key != "_target_")
    return f"{node.get('_target_', '?')} ({settings})"


def model_card(checkpoint: Path, target: str, spec: ModelSpec, info: CheckpointInfo, exported: Exported) -> str:
    """The README.md written beside exported weights."""
    lines = [f"# {checkpoint.stem}: exported by slip to {target}", "",
             f"- Source: `{checkpoint}` ({info.format} format)",
             f"- Files: {', '.join(f'`{path.name}`' for path in exported.files)}",
             f"- Architecture: {_architecture(spec)}",
             f"- Objective: {info.objective or 'not recorded'}; steps trained: "
             f"{info.step if info.step is not None else 'not recorded'}"]
    if info.logit_bias is not None:
        lines.append(f"- Learned logit bias: {info.logit_bias!r} (the objective's; SigLIP's scores are "
                     "sigmoid(exp(logit_scale) * cosine + logit_bias))")
    data = _training_data(info.config)
    if data:
        lines.append(f"- Training data: {data}")
    lines += [f"- Left out: {note}" for note in [*exported.notes, *exported.warnings]]
    run_dir = run_dir_of(checkpoint)
    if run_dir is not None:
        metrics = read_run(run_dir, run_dir.parent, []).metrics
        if metrics:
            lines += ["", f"## Evaluation (from the run directory `{run_dir}`)", "", "| metric | value |",
                      "|---|---:|", *(f"| {name} | {value:.2f} |" for name, value in sorted(metrics.items()))]
    return "\n".join(lines) + "\n"


def export(checkpoint: str | Path, target: str, out_dir: str | Path) -> Exported:
    """Write the model at `checkpoint` to `out_dir` in `target`'s format, with its model card; all or nothing."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if target not in TARGETS:
        raise ExportError(f"--to: unknown target {target!r}; one of {', '.join(TARGETS)}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir}: exists and is not an empty directory; choose a new --out")
    converted = read_pretrained(checkpoint)
    model = build_converted(converted, checkpoint)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        written = TARGETS[target](model, staging, converted)
        card = model_card(checkpoint, target, converted.spec, converted.info, written)
        (staging / "README.md").write_text(card)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = [out_dir / path.name for path in written.files] + [out_dir / "README.md"]
    return Exported(files, written.notes, written.warnings)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; known errors end with one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(prog="slip.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint file or model directory slip reads")
    parser.add_argument("--to", required=True, choices=list(TARGETS), help="the target format")
    parser.add_argument("--out", required=True, type=Path, help="a new (or empty) directory for the files")
    args = parser.parse_args(argv)
    try:
        result = export(args.checkpoint, args.to, args.out)
    except (ExportError, CheckpointError, FileNotFoundError) as error:
        print(f"slip.export: error: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
        sys.exit(2)
    for note in result.notes:
        print(f"note: {note}")
    for warning in result.warnings:
        print(f"slip.export: warning: {warning}", file=sys.stderr)
    print(f"wrote {', '.join(str(path) for path in result.files)}")


if __name__ == "__main__":
    main()
