"""The benchmark suite: train step, model FLOP/s against the measured matmul peak, the 3-view data pipeline,
evaluation against one feature-extraction pass, and the contrastive loss against global batch size.

Usage: python benchmarks/suite.py [--quick] [--sections train,data,loader,eval,loss,end_to_end] [--device cpu|cuda]
           [--out benchmarks/results]
Everything runs in one invocation on whatever device is present (fp32 on CPU, bf16 autocast on GPU). Each
measurement runs in a fresh child process, so that peak memory is that measurement's own (peak resident set
size on CPU, the CUDA allocator's peak on GPU). Writes suite.json and suite.md (with the command and the
machine) under --out.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

from captions import REAL_CAPTIONS  # benchmarks/captions.py, beside this script

OBJECTIVES = {"clip": "CLIPLoss", "simclr": "SimCLRLoss", "slip": "SLIPLoss"}


# ---------------------------------------------------------------- helpers run in the child processes


def _device(name: str):
    import torch

    return torch.device(name)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mib(device) -> float:
    from slip.app.monitor import peak_memory_mib

    return peak_memory_mib(device)


def _time_once(fn: Callable[[], Any], device) -> float:
    """Wall time of one call of fn(), the device's queued work included."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _timed(fn: Callable[[], Any], device, repeats: int) -> list[float]:
    """Wall times of `repeats` calls of fn(), after one warm-up call."""
    fn()
    return [_time_once(fn, device) for _ in range(repeats)]


def _matmul_operands(device, size: int):
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return (torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype))


def _matmul_tflops(a, b, device, repeats: int) -> float:
    """Best dense-matmul throughput of `repeats` products of the square operands a and b."""
    times = _timed(lambda: a @ b, device, repeats)
    return 2 * a.shape[0] ** 3 / min(times) / 1e12


def _sustained_matmul_tflops(a, b, device, seconds: float) -> float:
    """Dense-matmul throughput over back-to-back products of a and b for at least `seconds` (mean, not best)."""
    a @ b
    _synchronize(device)
    products, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or products == 0:
        a @ b
        products += 1
        _synchronize(device)
    return 2 * a.shape[0] ** 3 * products / elapsed / 1e12


def matmul_peak(device_name: str, size: int, repeats: int) -> dict[str, Any]:
    """Best dense-matmul throughput of this device: fp32 on CPU, bf16 on GPU."""
    device = _device(device_name)
    a, b = _matmul_operands(device, size)
    return {"size": size, "dtype": str(a.dtype).removeprefix("torch."),
            "tflops": _matmul_tflops(a, b, device, repeats)}


def _train_batch(inputs: tuple[str, ...], batch_size: int, image_size: int, context_length: int, device):
    import torch

    from slip.tokenizer import tokenize

    generator = torch.Generator().manual_seed(0)
    batch = {}
    for name in inputs:
        if name == "text":
            captions = [REAL_CAPTIONS[i % len(REAL_CAPTIONS)] for i in range(batch_size)]
            batch[name] = tokenize(captions, context_length)
        else:
            batch[name] = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    return {key: value.to(device) for key, value in batch.items()}


def training_task(device, model_name: str, loss: str, **model_overrides: Any) -> tuple[Any, Any]:
    """(task, optimizer) of the train-step measurements: seeded model + objective, the trainer's fused AdamW;
    freed host memory retained, as slip.train does. `model_overrides` go to the model builder."""
    import torch

    import slip.losses
    from slip.app.task import TrainTask
    from slip.host_memory import retain_freed_memory
    from slip.models import MODEL_BUILDERS
    from slip.app.optim import adamw, param_groups

    retain_freed_memory()  # trainer.retain_freed_memory; the measurements run in child processes of their own
    torch.manual_seed(0)
    objective = getattr(slip.losses, OBJECTIVES[loss])()
    model = MODEL_BUILDERS[model_name](inputs=objective.inputs, **model_overrides)
    task = TrainTask(model, objective).to(device)
    optimizer = adamw(param_groups(model, objective), lr=1e-4, weight_decay=0.1, fused=True)  # conf/optim/adamw
    return task, optimizer


def training_setup(device, model_name: str, loss: str, batch_size: int,
                   **model_overrides: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(task, optimizer, batch) of the train-step measurements (`training_task`), with a batch of random images
    and real-length captions."""
    task, optimizer = training_task(device, model_name, loss, **model_overrides)
    arch = task.model.arch
    return task, optimizer, _train_batch(task.objective.inputs, batch_size, arch["image_size"],
                                         arch["context_length"], device)


def model_flop_counter():
    """torch's FlopCounterMode with attention counted as model FLOPs on every device: its two products once
    forward and twice backward, like every other matmul (the causal text tower counted in full, as torch does).

    torch counts nothing for the CPU flash-attention kernels, and for the GPU ones it adds the backward pass's
    recomputation of the scores, which is work of the kernel rather than of the model (MFU counts the latter).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return 2 * sdpa_flop_count(query, key, value)

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        **{kernel: backward for kernel in (aten._scaled_dot_product_flash_attention_for_cpu_backward,
                                           aten._scaled_dot_product_flash_attention_backward,
                                           aten._scaled_dot_product_efficient_attention_backward,
                                           aten._scaled_dot_product_cudnn_attention_backward)}})


def train_step(device_name: str, model_name: str, loss: str, batch_size: int, repeats: int,
               matmul_size: int, probe_s: float, compiled: bool = False,
               model_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """img/s, model FLOP/s and peak memory of full training steps (fwd, bwd, AdamW) on real-length captions.

    Around every timed step the dense-matmul rate is measured again in this process, sustained over
    `probe_s` seconds before and after (averaged), so that the step's share of it does not depend on how fast
    a shared machine ran when the suite started, nor compare a multi-second step with a lucky burst.
    `compiled`: time torch.compile(task) as trainer.compile=true does (FLOPs are counted on the eager step;
    compilation is untimed). `model_overrides` go to the model builder (e.g. patch_dropout).
    """
    import torch

    device = _device(device_name)
    task, optimizer, batch = training_setup(device, model_name, loss, batch_size, **(model_overrides or {}))
    dtype = torch.bfloat16 if device.type == "cuda" else None
    a, b = _matmul_operands(device, matmul_size)

    runner = task

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            result = runner(batch)
        result["loss"].backward()
        optimizer.step()

    with model_flop_counter() as counter:
        step()
    flops = counter.get_total_flops()
    if compiled:
        runner = torch.compile(task)
        step()  # compiles: untimed
    times, fractions = [], []
    for _ in range(repeats):
        before = _sustained_matmul_tflops(a, b, device, probe_s)
        seconds = _time_once(step, device)  # the counted step above was the warm-up
        after = _sustained_matmul_tflops(a, b, device, probe_s)
        times.append(seconds)
        fractions.append(flops / seconds / 1e12 / ((before + after) / 2))
    seconds = statistics.median(times)
    return {"model": model_name, "objective": loss, "batch_size": batch_size, "compiled": compiled, "step_s": seconds,
            "images_per_s": batch_size / seconds, "model_tflops_per_step": flops / 1e12,
            "achieved_tflops": flops / seconds / 1e12, "fraction_of_adjacent_matmul": statistics.median(fractions),
            "fraction_of_adjacent_matmul_range": [min(fractions), max(fractions)], "repeats": repeats,
            "peak_memory_mib": _peak_memory_mib(device),
            "parameters_m": sum(p.numel() for p in task.parameters()) / 1e6}


def photo_jpeg(width: int = 640, height: int = 430, seed: int = 0) -> bytes:
    """JPEG bytes (quality 90) of a photo-like image of a typical web size."""
    from slip.data.synthetic import photo_like

    buffer = io.BytesIO()
    photo_like(width, height, seed).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def original_slip_views() -> Callable[[Any, str], dict[str, Any]]:
    """The SLIP repository's own training views, as its main.py and datasets.py compose them (the baseline).

    torchvision v1 transforms on PIL images: the CLIP view is RandomResizedCrop(224, scale=(0.5, 1)); each SSL
    view is RandomResizedCrop(224, scale=(0.08, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale with
    p 0.2, PIL's Gaussian blur with a radius drawn from [0.1, 2] with p 0.5, a flip; then ToTensor and
    Normalize. Captions go through the CLIP tokenizer.
    """
    import random

    from PIL import ImageFilter
    from torchvision import transforms as v1

    from slip.models import IMAGENET_MEAN, IMAGENET_STD
    from slip.tokenizer import tokenize

    def blur(image: Any) -> Any:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    normalize = v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    clip_view = v1.Compose([v1.RandomResizedCrop(224, scale=(0.5, 1.0)), v1.ToTensor(), normalize])
    ssl_view = v1.Compose([
        v1.RandomResizedCrop(224, scale=(0.08, 1.0)),
        v1.RandomApply([v1.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v1.RandomGrayscale(p=0.2),
        v1.RandomApply([v1.Lambda(blur)], p=0.5),
        v1.RandomHorizontalFlip(),
        v1.ToTensor(),
        normalize,
    ])
    return lambda image, caption: {"image": clip_view(image), "aug1": ssl_view(image), "aug2": ssl_view(image),
                                   "text": tokenize(caption, 77)[0]}


def timed_in_rounds(runs: dict[str, Callable[[Any], Any]], inputs: list[Any], samples: int,
                    rounds: int) -> tuple[dict[str, float], int]:
    """(seconds each run took, samples each ran) over `samples` inputs (cycled), the runs taking turns
    `samples / rounds` inputs at a time after one warm-up call each, so that drift in the machine's speed hits
    them alike."""
    seconds = dict.fromkeys(runs, 0.0)
    for run in runs.values():
        run(inputs[0])
    per_round = max(samples // rounds, 1)
    for round_index in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for index in range(round_index * per_round, (round_index + 1) * per_round):
                run(inputs[index % len(inputs)])
            seconds[name] += time.perf_counter() - start
    return seconds, per_round * rounds


def results_header(title: str, command: str, machine: dict[str, Any]) -> list[str]:
    """The opening lines of a results page: its title, the command that produced it and the machine."""
    return [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {json.dumps(machine)}", ""]


def error_row(leading: list[Any], error: str, columns: int) -> str:
    """The Markdown table row of a measurement that failed: its identifying cells, the error, then empty cells up to
    `columns`."""
    cells = [*map(str, leading), f"error: {error}"]
    return "| " + " | ".join(cells) + " |" + " |" * (columns - len(cells))


def write_results(out: Path, stem: str, payload: dict[str, Any], text: str) -> None:
    """`stem`.json (the payload) and `stem`.md (the text) under `out`, each written atomically."""
    from slip.checkpoint import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{stem}.json", lambda handle: handle.write(json.dumps(payload, indent=2).encode()))
    atomic_write(out / f"{stem}.md", lambda handle: handle.write(text.encode()))


def data_pipeline(device_name: str, samples: int,
                  backends: tuple[str, ...] = ("tensor", "device", "pil", "slip_original"),
                  rounds: int = 10) -> list[dict[str, Any]]:
    """Samples/s on one core of the 3-view SLIP pipeline (CLIP view + 2 SSL views + tokenizer) from JPEG bytes.

    Backends: this toolkit's "tensor", "device" (the workers' part only: crops and draws; `view_finishing`
    times the rest) and "pil" views, and "slip_original", the SLIP repository's recipe (the issue's baseline).
    They (and decoding alone) take turns, `samples / rounds` samples at a time, so that a machine whose speed
    drifts slows them alike.
    """
    import torch

    from slip.data.decode import decode_image
    from slip.data.transforms import build_multiview
    from slip.models import IMAGENET_MEAN, IMAGENET_STD

    torch.set_num_threads(1)
    jpegs = [photo_jpeg(seed=seed) for seed in range(8)]
    caption = REAL_CAPTIONS[0]
    transforms = {backend: original_slip_views() if backend == "slip_original" else build_multiview(
        ("image", "text", "aug1", "aug2"), 224, IMAGENET_MEAN, IMAGENET_STD, backend=backend) for backend in backends}
    runs: dict[str, Callable[[bytes], Any]] = {"decode": lambda jpeg: decode_image(jpeg, "bench")}
    for backend, transform in transforms.items():
        runs[backend] = lambda jpeg, transform=transform: transform(decode_image(jpeg, "bench"), caption)
    seconds, count = timed_in_rounds(runs, jpegs, samples, rounds)
    return [{"pipeline": "slip 3-view (image, aug1, aug2) + text", "backend": backend, "source": "640x430 JPEG q90",
             "samples": count, "rounds": rounds, "samples_per_s_per_core": count / seconds[backend],
             "ms_per_sample": 1000 * seconds[backend] / count, "decode_ms": 1000 * seconds["decode"] / count,
             "jpeg_kib": statistics.mean(len(j) for j in jpegs) / 1024} for backend in backends]


def _deferred_batch(batch_size: int) -> tuple[Any, dict[str, Any]]:
    """The "device" backend's SLIP MultiView and one collated batch of its deferred views of 640x430 photos."""
    from slip.data.decode import decode_image
    from slip.data.loader import collate
    from slip.data.transforms import build_multiview
    from slip.models import IMAGENET_MEAN, IMAGENET_STD

    transform = build_multiview(("image", "text", "aug1", "aug2"), 224, IMAGENET_MEAN, IMAGENET_STD, backend="device")
    jpegs = [photo_jpeg(seed=seed) for seed in range(8)]
    return transform, collate([transform(decode_image(jpegs[index % len(jpegs)], "bench"), REAL_CAPTIONS[0])
                               for index in range(batch_size)])


def view_finishing(device_name: str, batch_size: int, repeats: int) -> dict[str, Any]:
    """Samples/s of finishing the "device" backend's deferred views on the device (`MultiView.to_device`: copy,
    jitter, grayscale, blur, flip, normalise for a batch of 3-view SLIP samples); the median of `repeats`."""
    import torch

    device = _device(device_name)
    transform, batch = _deferred_batch(batch_size)
    if device.type == "cuda":  # as the loader pins them for slip.train (operations rows stay on the host anyway)
        batch = {key: type(value)(*(field.pin_memory() for field in value)) if isinstance(value, tuple)
                 else value.pin_memory() for key, value in batch.items()}
    times = _timed(lambda: transform.to_device(batch, device), device, repeats)
    median = statistics.median(times)
    return {"device": str(device), "batch_size": batch_size, "repeats": repeats, "batch_ms": 1000 * median,
            "samples_per_s": batch_size / median, "threads": torch.get_num_threads()}


def write_jpeg_csv(root: Path, count: int) -> Path:
    """`count` photo-like 640x430 JPEG files under `root`, listed with real captions in root/train.csv."""
    with open(root / "train.csv", "w", newline="") as listing:
        writer = csv.writer(listing)
        writer.writerow(["filepath", "title"])
        for index in range(count):
            (root / f"{index}.jpg").write_bytes(photo_jpeg(seed=index))
            writer.writerow([f"{index}.jpg", REAL_CAPTIONS[index % len(REAL_CAPTIONS)]])
    return root / "train.csv"


def end_to_end(device_name: str, model_name: str, loss: str, batch_size: int, steps: int,
               workers: int) -> dict[str, Any]:
    """img/s and data-wait fraction of the whole `slip.train` loop (loader workers + step) on JPEG files in a CSV,
    read back from the run's TensorBoard scalars; the first step (worker start-up, warm-up) is left out."""
    import tempfile

    from hydra import compose, initialize_config_dir
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from slip.app.train import train

    conf = Path(__file__).resolve().parent.parent / "conf"
    with tempfile.TemporaryDirectory() as root:
        listing = write_jpeg_csv(Path(root), max(64, batch_size * 2))
        overrides = [f"model={model_name}", f"loss={loss}", "data=csv", f"data.source.path={listing}",
                     f"data.batch_size={batch_size}", f"data.num_workers={workers}", f"trainer.max_steps={steps}",
                     "trainer.log_every=1", "trainer.save_every=0", "trainer.log_images=false", "val=none",
                     f"trainer.device={device_name}", "run_name=end_to_end"]
        with initialize_config_dir(str(conf), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        run_dir = Path(root) / "run"
        train(cfg, run_dir)
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        series = {tag: [event.value for event in events.Scalars(f"train/{tag}") if event.step > 1]
                  for tag in ("images_per_second", "data_wait_fraction")}
    return {"model": model_name, "objective": loss, "batch_size": batch_size, "workers": workers, "steps": steps,
            "images_per_s": statistics.median(series["images_per_second"]),
            "data_wait_fraction": statistics.median(series["data_wait_fraction"])}


def training_loader(device_name: str, samples: int, batch_size: int, workers: int,
                    backend: str = "tensor") -> dict[str, Any]:
    """Samples/s of the training loader on all cores: JPEG files listed in a CSV, 3-view SLIP, `workers` workers.

    The same objects slip.train builds (CsvSource, ImageTextDataset, build_train_loader, pinned batches on a
    GPU), so this is what feeds the device: compare it with the train step's img/s. With the "device" backend
    each batch is also finished on the device in the timed loop, as slip.train does. The first batch (worker
    start-up) is not timed.
    """
    import tempfile

    import torch

    from slip.data.dataset import ImageTextDataset
    from slip.data.sources import CsvSource
    from slip.data.loader import build_train_loader
    from slip.data.transforms import build_multiview
    from slip.distributed import WorldInfo
    from slip.host_memory import retain_freed_memory
    from slip.models import IMAGENET_MEAN, IMAGENET_STD

    retain_freed_memory()  # as slip.train does; forked workers inherit it
    torch.set_num_threads(1)
    device = _device(device_name)
    transform = build_multiview(("image", "text", "aug1", "aug2"), 224, IMAGENET_MEAN, IMAGENET_STD, backend=backend)
    with tempfile.TemporaryDirectory() as root:
        records = CsvSource(str(write_jpeg_csv(Path(root), 64)))
        dataset = ImageTextDataset(records, transform)
        # Enough epochs of the 64 files for `samples` samples plus the untimed first batch.
        repeat = torch.utils.data.ConcatDataset([dataset] * (1 + (samples + batch_size) // len(dataset)))
        loader = build_train_loader(repeat, batch_size, WorldInfo(), num_workers=workers, seed=0,
                                    persistent_workers=False, pin_memory=device.type == "cuda")
        batches = iter(loader)
        transform.to_device(next(batches), device)
        _synchronize(device)
        count, start = 0, time.perf_counter()
        while count < samples:
            count += transform.to_device(next(batches), device)["image"].shape[0]
        _synchronize(device)
        seconds = time.perf_counter() - start
    return {"pipeline": "slip 3-view (image, aug1, aug2) + text", "backend": backend, "device": str(device),
            "workers": workers, "batch_size": batch_size, "samples": count, "samples_per_s": count / seconds,
            "samples_per_s_per_worker": count / seconds / workers}


def evaluation(device_name: str, model_name: str, num_train: int, num_test: int, batch_size: int) -> dict[str, Any]:
    """Zero-shot and linear-probe wall time against one feature-extraction pass over the same images."""
    import torch

    from slip.data.synthetic import SyntheticClassification
    from slip.eval.features import extract_features
    from slip.eval.linear_probe import linear_probe
    from slip.eval.zeroshot import ZeroShotEvaluator
    from slip.models import MODEL_BUILDERS

    device = _device(device_name)
    torch.manual_seed(0)
    model = MODEL_BUILDERS[model_name](inputs=("image", "text")).to(device).eval()
    train = SyntheticClassification(num_samples=num_train, image_size=64, seed=2)
    test = SyntheticClassification(num_samples=num_test, image_size=64, seed=1)

    def clock(fn: Callable[[], Any]) -> tuple[Any, float]:
        _synchronize(device)
        start = time.perf_counter()
        result = fn()
        _synchronize(device)
        return result, time.perf_counter() - start

    (test_x, test_y), test_extraction_s = clock(lambda: extract_features(model, test, batch_size=batch_size))
    (train_x, train_y), train_extraction_s = clock(lambda: extract_features(model, train, batch_size=batch_size))
    _, zero_shot_s = clock(lambda: ZeroShotEvaluator(test, batch_size)(model))
    _, probe_s = clock(lambda: linear_probe(train_x.to(device), train_y.to(device), test_x.to(device),
                                            test_y.to(device), len(train.classes)))
    return {"model": model_name, "num_train": num_train, "num_test": num_test,
            "extraction_s": train_extraction_s + test_extraction_s, "test_extraction_s": test_extraction_s,
            "zero_shot_s": zero_shot_s, "zero_shot_x_test_extraction": zero_shot_s / test_extraction_s,
            "linear_probe_s": probe_s, "linear_probe_x_extraction": probe_s / (train_extraction_s + test_extraction_s)}


def contrastive_loss(device_name: str, batch_size: int, embed_dim: int, repeats: int) -> dict[str, Any]:
    """Time and peak memory of CLIPLoss forward + backward at one global batch size."""
    import torch

    from slip.losses import CLIPLoss

    device = _device(device_name)
    torch.manual_seed(0)
    image = torch.randn(batch_size, embed_dim, device=device, requires_grad=True)
    text = torch.randn(batch_size, embed_dim, device=device, requires_grad=True)
    scale = torch.tensor(1 / 0.07, device=device)
    objective = CLIPLoss()

    def step() -> None:
        objective({"image_embed": image, "text_embed": text, "logit_scale": scale})["loss"].backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = statistics.median(_timed(step, device, repeats))
    return {"global_batch": batch_size, "embed_dim": embed_dim, "fwd_bwd_ms": 1000 * seconds,
            "peak_memory_mib": _peak_memory_mib(device)}


# ---------------------------------------------------------------- the parent


def _child(queue, fn: Callable[..., Any], args: tuple) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except Exception as error:  # reported in the table, so one failing measurement does not end the suite
        queue.put(("error", f"{type(error).__name__}: {error}"))


def isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a fresh process (its own peak memory); an error comes back as {"error": ...}, and so does a
    process that died without answering (e.g. killed for memory)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, fn, args))
    process.start()
    while True:
        try:
            status, value = queue.get(timeout=1.0)
            break
        except Empty:
            if not process.is_alive() and queue.empty():
                status, value = "error", f"the measuring process died (exit code {process.exitcode})"
                break
    process.join()
    return value if status == "ok" else {"error": value}


def plan(quick: bool, device_type: str) -> dict[str, Any]:
    """What each section measures; --quick shrinks everything to a smoke test of the suite itself."""
    on_gpu = device_type == "cuda"
    return {
        "matmul": {"size": 8192 if on_gpu else (1024 if quick else 2048), "repeats": 3 if quick else 10},
        "train": {"models": ["vit_ti16"] if quick else ["vit_ti16", "vit_s16", "vit_b16"],
                  "batch_size": 2 if quick else (128 if on_gpu else 8), "repeats": 1 if quick else 5,
                  "probe_s": 0.1 if quick else (0.5 if on_gpu else 1.0)},
        "data": {"samples": 20 if quick else 200, "finish_batch": 4 if quick else (256 if on_gpu else 64),
                 "finish_repeats": 2 if quick else 10},
        "loader": {"samples": 32 if quick else (4096 if on_gpu else 768), "batch_size": 16 if quick else 64,
                   "workers": 1 if quick else multiprocessing.cpu_count()},
        "eval": {"model": "vit_ti16" if quick else "vit_s16", "num_train": 48 if quick else (20000 if on_gpu else 600),
                 "num_test": 24 if quick else (5000 if on_gpu else 300), "batch_size": 16 if quick else 64},
        "loss": {"batches": [64, 256] if quick else [256, 1024, 4096, 8192] + ([32768] if on_gpu else []),
                 "embed_dim": 512, "repeats": 2 if quick else 5},
        "end_to_end": {"model": "vit_ti16" if quick else "vit_s16", "loss": "slip",
                       "batch_size": 2 if quick else (128 if on_gpu else 16), "steps": 3 if quick else 6,
                       "workers": 1 if quick else 2},
    }


def run(sections: list[str], device_name: str, quick: bool, compiled: bool = False,
        models: list[str] | None = None, objectives: list[str] | None = None,
        after_section: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the chosen sections (train steps of `models` x `objectives`, default all); returns every result.

    `after_section(results)` is called with the results so far after each section (results["sections_done"]
    lists them), so that a run cut short by a time limit still leaves what it measured."""
    settings = plan(quick, device_name.split(":")[0])
    if models:
        settings["train"]["models"] = models
    results: dict[str, Any] = {"sections_done": []}

    def finished(section: str) -> None:
        results["sections_done"].append(section)
        if after_section is not None:
            after_section(results)

    peak = isolated(matmul_peak, device_name, settings["matmul"]["size"], settings["matmul"]["repeats"])
    results["matmul_peak"] = peak
    print(f"matmul peak: {peak}", flush=True)
    if "train" in sections:
        rows = []
        for model_name in settings["train"]["models"]:
            for loss in objectives or OBJECTIVES:
                row = isolated(train_step, device_name, model_name, loss, settings["train"]["batch_size"],
                               settings["train"]["repeats"], settings["matmul"]["size"], settings["train"]["probe_s"],
                               compiled)
                row = {"model": model_name, "objective": loss, **row}
                if "achieved_tflops" in row and "tflops" in peak:
                    row["fraction_of_peak"] = row["achieved_tflops"] / peak["tflops"]
                rows.append(row)
                print(f"train step: {row}", flush=True)
        results["train_step"], results["train_probe_s"] = rows, settings["train"]["probe_s"]
        finished("train")
    if "data" in sections:
        data = settings["data"]
        results["data_pipeline"] = isolated(data_pipeline, device_name, data["samples"])
        results["view_finishing"] = isolated(view_finishing, device_name, data["finish_batch"], data["finish_repeats"])
        print(f"data pipeline: {results['data_pipeline']}\nview finishing: {results['view_finishing']}", flush=True)
        finished("data")
    if "loader" in sections:
        loader = settings["loader"]
        results["training_loader"] = [isolated(training_loader, device_name, loader["samples"], loader["batch_size"],
                                               loader["workers"], backend) for backend in ("tensor", "device")]
        print(f"training loader: {results['training_loader']}", flush=True)
        finished("loader")
    if "eval" in sections:
        e = settings["eval"]
        results["evaluation"] = isolated(evaluation, device_name, e["model"], e["num_train"], e["num_test"],
                                         e["batch_size"])
        print(f"evaluation: {results['evaluation']}", flush=True)
        finished("eval")
    if "loss" in sections:
        results["contrastive_loss"] = [
            isolated(contrastive_loss, device_name, batch, settings["loss"]["embed_dim"], settings["loss"]["repeats"])
            for batch in settings["loss"]["batches"]]
        print(f"contrastive loss: {results['contrastive_loss']}", flush=True)
        finished("loss")
    if "end_to_end" in sections:
        e2e = settings["end_to_end"]
        whole = isolated(end_to_end, device_name, e2e["model"], e2e["loss"], e2e["batch_size"], e2e["steps"],
                         e2e["workers"])
        bare = isolated(train_step, device_name, e2e["model"], e2e["loss"], e2e["batch_size"], 3,
                        settings["matmul"]["size"], settings["train"]["probe_s"])
        results["end_to_end"] = {"loop": whole, "bare_step": bare}
        print(f"end to end: {results['end_to_end']}", flush=True)
        finished("end_to_end")
    return results


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _percent_range(row: dict[str, Any]) -> str:
    """"(low–high%)" of a train row's per-step fractions, or nothing for rows measured before they were kept."""
    low_high = row.get("fraction_of_adjacent_matmul_range")
    return f"({100 * low_high[0]:.0f}–{100 * low_high[1]:.0f}%)" if low_high else ""


def _loader_markdown(loaders: list[dict[str, Any]] | dict[str, Any],
                     train_rows: list[dict[str, Any]]) -> list[str]:
    """The training-loader section: its throughput per views backend, and how many of each SLIP train step it
    keeps fed."""
    loaders = loaders if isinstance(loaders, list) else [loaders]  # a dict: one backend, or the child's error
    lines = ["## Training loader (all cores)\n"]
    measured = [loader for loader in loaders if "error" not in loader]
    lines += [f"error: {loader['error']}\n" for loader in loaders if "error" in loader]
    if not measured:
        return lines
    first = measured[0]
    lines += [f"slip.train's own loader (CsvSource of 64 640x430 JPEG files, ImageTextDataset, build_train_loader) "
              f"with {first['workers']} workers, batch {first['batch_size']}, {first['samples']} samples, to "
              f"batches ready on {first.get('device', 'cpu')} (the device backend finishes its views there, in the "
              "timed loop).\n", "| views backend | samples/s | per worker |", "|---|---:|---:|"]
    lines += [f"| {loader.get('backend', 'tensor')} | **{_fmt(loader['samples_per_s'])}** | "
              f"{_fmt(loader['samples_per_s_per_worker'])} |" for loader in measured]
    lines.append("")
    slip_rows = [row for row in train_rows if row.get("objective") == "slip" and "images_per_s" in row]
    if slip_rows:
        backends = [loader.get("backend", "tensor") for loader in measured]
        lines += ["| SLIP train step | img/s | " + " | ".join(f"loader ({b}) / step" for b in backends) + " |",
                  "|---|---:|" + "---:|" * len(backends)]
        lines += [f"| {row['model']} | {_fmt(row['images_per_s'])} | " + " | ".join(
            f"{_fmt(loader['samples_per_s'] / row['images_per_s'])}x" for loader in measured) + " |"
            for row in slip_rows]
        lines.append("")
    return lines


def _finishing_markdown(finishing: dict[str, Any]) -> str:
    """One line: the device backend's finishing step, timed on the device."""
    if "error" in finishing:
        return f"Finishing deferred views: error: {finishing['error']}\n"
    return (f"The device backend's workers do only the crops and the draws; finishing its views on "
            f"{finishing['device']} ({finishing['threads']} threads), a batch of {finishing['batch_size']} 3-view "
            f"samples at a time (`MultiView.to_device`: copy, jitter, grayscale, blur, flip, normalise), takes "
            f"{_fmt(finishing['batch_ms'])} ms: **{_fmt(finishing['samples_per_s'])} samples/s**.\n")


def markdown(results: dict[str, Any], command: str, machine: dict[str, Any],
             sections: list[str] | None = None) -> str:
    """The results as Markdown tables; a run whose `sections` are not all in results["sections_done"] says so."""
    peak = results["matmul_peak"]
    lines = ["# Benchmark suite\n", f"Command: `{command}`  ", f"Machine: {machine}\n"]
    missing = [section for section in sections or [] if section not in results.get("sections_done", sections)]
    if missing:
        done = ", ".join(results["sections_done"]) or "the matmul peak"
        lines.append(f"**Partial results**: written after {done}; not (yet) measured: {', '.join(missing)}.\n")
    lines.append(f"Dense matmul peak ({peak.get('dtype')}, {peak.get('size')}²): "
                 f"**{_fmt(peak.get('tflops', 0) * 1000)} GFLOP/s**, the reference for the fractions below.\n")
    if "train_step" in results:
        compiled = any(row.get("compiled") for row in results["train_step"])
        lines += [f"## Train step (fwd + bwd + fused AdamW{', torch.compile' if compiled else ''}, real-length captions, "
                  "freed host memory retained)\n",
                  "*of peak*: achieved FLOP/s over the peak above (a best-of burst at the start of the run). *of "
                  "adjacent matmul*: over the dense-matmul rate sustained for "
                  f"{results.get('train_probe_s', '–')} s just before and just after each timed step, in the same "
                  "process (the median over steps, the lowest and highest step in brackets); on a shared machine "
                  "whose speed drifts, this is the fair ratio. Step times are medians.\n",
                  "| model | objective | batch | img/s | step s | model GFLOP/step | achieved GFLOP/s | of peak | "
                  "of adjacent matmul | peak MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in results["train_step"]:
            if "error" in row:
                lines.append(error_row([row["model"], row["objective"], "–"], row["error"], 10))
                continue
            lines.append(f"| {row['model']} | {row['objective']} | {row['batch_size']} | {_fmt(row['images_per_s'])} | "
                         f"{_fmt(row['step_s'])} | {_fmt(row['model_tflops_per_step'] * 1000)} | "
                         f"{_fmt(row['achieved_tflops'] * 1000)} | {100 * row.get('fraction_of_peak', 0):.0f}% | "
                         f"{100 * row.get('fraction_of_adjacent_matmul', 0):.0f}% {_percent_range(row)} | "
                         f"{row['peak_memory_mib']:.0f} |")
        lines.append("")
    if "data_pipeline" in results:
        pipelines = results["data_pipeline"]
        pipelines = pipelines if isinstance(pipelines, list) else [pipelines]  # a dict: the child's error
        lines += ["## Data pipeline (one core)\n", "slip 3-view (image, aug1, aug2) + text, from 640x430 JPEG q90; "
                  "decode alone is the JPEG decode into an RGB PIL image, part of every sample. The backends and the "
                  f"decode-only loop take turns in {pipelines[0].get('rounds', '–')} rounds, so that drift in the "
                  "machine's speed hits them alike.\n",
                  "*x original*: speed against `slip_original`, the SLIP repository's own recipe (torchvision v1 "
                  "transforms on PIL images), timed in the same rounds.\n",
                  "| views backend | samples/s per core | x original | ms/sample | of which decode ms |",
                  "|---|---:|---:|---:|---:|"]
        original = next((d for d in pipelines if d.get("backend") == "slip_original"), {})
        for d in pipelines:
            relative = (_fmt(d["samples_per_s_per_core"] / original["samples_per_s_per_core"])
                        if "samples_per_s_per_core" in original and "error" not in d else "–")
            lines.append(f"| {d.get('backend', '–')} | {_fmt(d.get('samples_per_s_per_core', 0))} | {relative} | "
                         f"{_fmt(d.get('ms_per_sample', 0))} | {_fmt(d.get('decode_ms', 0))} |"
                         if "error" not in d else f"| error: {d['error']} | | | | |")
        lines.append("")
        if "view_finishing" in results:
            lines.append(_finishing_markdown(results["view_finishing"]))
    if "training_loader" in results:
        lines += _loader_markdown(results["training_loader"], results.get("train_step", []))
    if "evaluation" in results:
        e = results["evaluation"]
        lines += ["## Evaluation against one feature-extraction pass\n",
                  f"{e.get('model')}, {e.get('num_train')} train / {e.get('num_test')} test images: extraction "
                  f"{_fmt(e.get('extraction_s', 0))} s; zero-shot {_fmt(e.get('zero_shot_s', 0))} s = "
                  f"{_fmt(e.get('zero_shot_x_test_extraction', 0))}x the test-set extraction; linear probe (L-BFGS "
                  f"with its l2 sweep) {_fmt(e.get('linear_probe_s', 0))} s = "
                  f"{_fmt(e.get('linear_probe_x_extraction', 0))}x the extraction. {e.get('error', '')}\n"]
    if "end_to_end" in results:
        lines += _end_to_end_markdown(results["end_to_end"])
    if "contrastive_loss" in results:
        lines += ["## Contrastive loss (CLIPLoss fwd + bwd, embed dim 512)\n", "| global batch | ms | peak MiB |",
                  "|---:|---:|---:|"]
        for row in results["contrastive_loss"]:
            lines.append(f"| {row.get('global_batch', '–')} | {_fmt(row.get('fwd_bwd_ms', 0))} | "
                         f"{row.get('peak_memory_mib', 0):.0f} |" if "error" not in row else f"| error: {row['error']} | | |")
        lines.append("")
    return "\n".join(lines)


def _end_to_end_markdown(e2e: dict[str, Any]) -> list[str]:
    """The whole slip.train loop against the bare step, and where the difference goes."""
    loop, bare = e2e["loop"], e2e["bare_step"]
    if "error" in loop or "error" in bare:
        return ["## The whole slip.train loop\n", f"error: {loop.get('error') or bare.get('error')}\n"]
    share = loop["images_per_s"] / bare["images_per_s"]  # = bare step time / the loop's time per step
    waiting = loop["data_wait_fraction"]
    slower = max(0.0, 1 - waiting - share)
    return ["## The whole slip.train loop against the bare step\n",
            f"`slip.train` on {loop['model']} {loop['objective']}, batch {loop['batch_size']}, JPEG files in a CSV, "
            f"{loop['workers']} loader workers, median over steps 2-{loop['steps']} (TensorBoard `train/`): "
            f"**{loop['images_per_s']:.2f} img/s**, against {bare['images_per_s']:.2f} img/s for the bare step "
            f"(fwd + bwd + AdamW on a ready batch), {100 * share:.0f}% of it. Of the loop's time per step: "
            f"{100 * share:.0f}% is the bare step's work, {100 * waiting:.0f}% waiting for the next batch, and "
            f"{100 * slower:.0f}% the step running slower than alone while the workers decode and augment on the "
            "same cores (and host-side batch handling).\n"]


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The CPU's vendor, model name and widest float32 vector extension, where Linux tells them.

    The extension is what the CPU offers; the matmul library may use less (MKL runs its AVX2 kernels on AMD
    CPUs that have AVX-512), which the measured matmul peak shows."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    vector = next((name for name in ("avx512f", "avx2", "avx") if name in flags), "none")
    return {"cpu_vendor": fields.get("vendor_id", "unknown"), "cpu_model": fields.get("model name", "unknown"),
            "fp32_simd": vector}


def machine_record(device_name: str = "cpu") -> dict[str, Any]:
    """What a benchmark result was measured on: platform, CPU, cores, torch and its threads, and the device."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            **cpu_description(), "cpus": multiprocessing.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if device_name.startswith("cuda") else "cpu"}


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the suite, write suite.json and suite.md."""
    import torch

    from slip.checkpoint import atomic_write

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="train,data,loader,eval,loss,end_to_end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite runs, numbers mean nothing")
    parser.add_argument("--compile", action="store_true", help="train steps through torch.compile (trainer.compile)")
    parser.add_argument("--models", default="", help="train-step models, comma-separated (default: the plan's)")
    parser.add_argument("--objectives", default="", help=f"train-step objectives out of {','.join(OBJECTIVES)}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    models = [m for m in args.models.split(",") if m]
    objectives = [o for o in args.objectives.split(",") if o]
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        parser.error(f"--objectives: unknown {unknown}, choose from {list(OBJECTIVES)}")
    machine = machine_record(args.device)
    command = ("python benchmarks/suite.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("suite_quick" if args.quick else "suite") + ("_compiled" if args.compile else "")

    def write(results: dict[str, Any]) -> None:
        # Atomically: a run killed mid-write leaves the previous file whole.
        results["wall_s"] = time.perf_counter() - started
        record = json.dumps({"command": command, "machine": machine, **results}, indent=2) + "\n"
        atomic_write(args.out / f"{stem}.json", lambda handle: handle.write(record.encode()), remove_stale=True)
        text = markdown(results, command, machine, sections)
        atomic_write(args.out / f"{stem}.md", lambda handle: handle.write(text.encode()), remove_stale=True)

    results = run(sections, args.device, args.quick, args.compile, models, objectives, after_section=write)
    write(results)
    print(f"wrote {args.out / (stem + '.md')} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
