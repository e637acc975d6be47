"""Time and peak memory of one optimizer step: exact accumulation against independent accumulation and the true
big batch, for a model and objective at several global batch sizes.

Usage: python benchmarks/accumulation.py [--model vit_s16] [--loss slip] [--micro 16] [--globals 32,64,128,256,512]
           [--big-max 512] [--after-heads 128] [--image-size N] [--inputs float|deferred] [--out benchmarks/results]
           [--render JSON]
Every measurement runs in a fresh process (`suite.isolated`), so its peak memory is its own (peak resident set
size on CPU, the CUDA allocator's peak on GPU): the model, AdamW's state, one warm-up micro-batch step, then the
timed optimizer step. Modes:
- `independent`: update_freq micro-batches one after the other, each loss / update_freq back-propagated (the
  engine's trainer.accumulation=independent; each micro-batch is made when it is needed, as a loader would);
- `exact`: `slip.app.accumulation.exact_backward` split at the tower features (the engine's default);
- `exact_after_heads`: the same, split after the heads (GradCache's split; not exact with the SSL head's
  BatchNorm, timed only to show what the split costs);
- `big`: one plain step on the whole global batch, where the micro step's memory scaled to it fits in the
  memory available (and up to --big-max);
- `micro`: one plain step on one micro-batch, the memory reference for the exact path.
Every micro-batch holds the same seeded random images and real-length captions (the work does not depend on the
values); with `--inputs deferred` they are the device backend's uint8 crops and drawn operations, finished on the
device each time a step uses them. Writes accumulation.json and accumulation.md (accumulation-deferred.* for
deferred inputs) under --out; `--render JSON` summarises an earlier run's measurements again.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

from captions import REAL_CAPTIONS  # benchmarks/captions.py, beside this script
from suite import (OBJECTIVES, _peak_memory_mib, _synchronize, _train_batch, error_row, isolated, machine_record,
                   results_header, training_task)

MODES = ("independent", "exact", "exact_after_heads", "big", "micro")
INPUT_KINDS = {"float": "fp32 views", "deferred": "uint8 crops of the device backend"}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class HeapSampler(threading.Thread):
    """The peak of the bytes glibc's malloc has handed out and not had back (mallinfo2: uordblks + hblkhd),
    sampled every `interval` seconds: live allocations, whatever the heap keeps or how fragmented it is.

    Peaks shorter than the interval can be missed; a step's activations stand for far longer. `peak_mib` is None
    where the C library is not glibc.
    """

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak_mib = interval, None
        self._stop_event = threading.Event()
        try:
            self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
            self._mallinfo2.restype = _Mallinfo2
        except (OSError, AttributeError):
            self._mallinfo2 = None

    def in_use_mib(self) -> float | None:
        """Bytes allocated and not freed now, in MiB."""
        if self._mallinfo2 is None:
            return None
        info = self._mallinfo2()
        return (info.uordblks + info.hblkhd) / 2**20

    def run(self) -> None:
        while not self._stop_event.is_set():
            now = self.in_use_mib()
            if now is None:
                return
            self.peak_mib = now if self.peak_mib is None else max(self.peak_mib, now)
            self._stop_event.wait(self.interval)

    def __enter__(self) -> "HeapSampler":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join()
        now = self.in_use_mib()
        if now is not None:
            self.peak_mib = now if self.peak_mib is None else max(self.peak_mib, now)


def cached_bytes(task, rows: int) -> int:
    """Bytes of the tower features that exact accumulation caches for `rows` samples (fp32)."""
    model = task.model
    widths = {"image": model.visual.num_features, "aug1": model.visual.num_features,
              "aug2": model.visual.num_features, "text": model.text.num_features if model.text is not None else 0}
    return rows * 4 * sum(widths[key] for key in task.objective.inputs)


def deferred_batches(inputs: tuple[str, ...], micro: int, image_size: int, context_length: int):
    """(make, prepare): `make(rows)` gives a loader batch of the device backend (uint8 crops and drawn operations,
    int64 tokens, on the host), `prepare(batch, device)` finishes its views on `device` (MultiView.to_device)."""
    import torch

    from slip.data.loader import collate
    from slip.data.synthetic import photo_like
    from slip.data.transforms import CLIP_MEAN, CLIP_STD, build_multiview

    views = build_multiview(inputs, image_size, CLIP_MEAN, CLIP_STD, context_length=context_length, backend="device")
    torch.manual_seed(0)
    side = image_size * 5 // 4
    template = collate([views(photo_like(side, side, seed), REAL_CAPTIONS[seed % len(REAL_CAPTIONS)])
                        for seed in range(micro)])

    def make(rows: int) -> dict:  # copies of the template: each batch holds memory of its own, as a loader's does
        def grow(value: torch.Tensor) -> torch.Tensor:
            return value.repeat(-(-rows // micro), *([1] * (value.dim() - 1)))[:rows].clone()
        return {key: type(value)(*(grow(field) for field in value)) if isinstance(value, tuple) else grow(value)
                for key, value in template.items()}

    return make, views.to_device


def step_measurement(device_name: str, model_name: str, loss: str, mode: str, micro: int, global_batch: int,
                     image_size: int | None = None, inputs_kind: str = "float") -> dict[str, Any]:
    """Wall time and peak memory of one optimizer step of `mode` at `global_batch`, in micro-batches of `micro`.

    Batches are made on the host, as a loader hands them over (`inputs_kind`: fp32 views, or the device backend's
    uint8 crops), and put on the device (views finished there) when a step uses them; exact accumulation keeps
    the loader batches of its window and prepares each for its pass and again for its replay, as the engine does.
    """
    import torch

    from slip.app.accumulation import exact_backward
    from slip.data.loader import batch_to_device

    device = torch.device(device_name)
    task, optimizer = training_task(device, model_name, loss,
                                    **({"image_size": image_size} if image_size else {}))
    arch = task.model.arch
    inputs = task.objective.inputs
    if inputs_kind == "deferred":
        make, prepare = deferred_batches(inputs, micro, arch["image_size"], arch["context_length"])
    else:
        def make(rows: int) -> dict:
            return _train_batch(inputs, rows, arch["image_size"], arch["context_length"], "cpu")
        prepare = batch_to_device

    def batch(rows: int) -> dict:
        return prepare(make(rows), device)

    def plain_step(rows: int) -> dict:
        loss_value = task(batch(rows))["loss"]
        loss_value.backward()
        return {"loss": loss_value}

    def micro_batches():  # on the device, each when it is needed
        return (batch(micro) for _ in range(global_batch // micro))

    def independent() -> dict:
        count = global_batch // micro
        results = []
        for piece in micro_batches():
            result = task(piece)
            (result["loss"] / count).backward()
            results.append(result["loss"].detach())
        return {"loss": torch.stack(results).mean()}

    def embeddings(piece: dict) -> dict:  # the model's per-sample outputs (the logit scale is a parameter)
        return {key: value for key, value in task.model(piece).items() if key != "logit_scale"}

    def objective_of_embeddings(outputs: dict) -> dict:
        scale = {"logit_scale": task.model.scaled_logit_scale()} if task.model.text is not None else {}
        return task.objective({**outputs, **scale})

    def exact(after_heads: bool) -> dict:
        encode, finish = ((embeddings, objective_of_embeddings) if after_heads
                          else (task.model.tower_features, task.finish))
        window = [make(micro) for _ in range(global_batch // micro)]  # the loader batches, on the host
        return exact_backward(window, lambda loader_batch: encode(prepare(loader_batch, device)), finish,
                              lambda value: value.backward(), task.model, device)

    steps = {"independent": independent, "exact": lambda: exact(False), "exact_after_heads": lambda: exact(True),
             "big": lambda: plain_step(global_batch), "micro": lambda: plain_step(micro)}

    def optimizer_step(backward) -> dict:
        result = backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result

    rss_before_warmup = _peak_memory_mib(device)
    optimizer_step(lambda: plain_step(micro))  # warm-up: allocator, AdamW's state
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peak_after_warmup = _peak_memory_mib(device)
    with HeapSampler() as heap:
        start = time.perf_counter()
        result = optimizer_step(steps[mode])
        _synchronize(device)
        seconds = time.perf_counter() - start
    rows = micro if mode == "micro" else global_batch
    return {"mode": mode, "global_batch": rows, "micro_batch": micro if mode != "big" else rows,
            "update_freq": global_batch // micro if mode not in ("big", "micro") else 1,
            "step_s": seconds, "samples_per_s": rows / seconds, "loss": float(result["loss"].detach()),
            "peak_memory_mib": _peak_memory_mib(device), "peak_after_warmup_mib": peak_after_warmup,
            "memory_before_warmup_mib": rss_before_warmup, "peak_heap_in_use_mib": heap.peak_mib,
            "cached_features_mib": cached_bytes(task, global_batch) / 2**20 if mode.startswith("exact") else 0.0}


def available_memory_mib(device_name: str, meminfo: Path = Path("/proc/meminfo")) -> float:
    """Memory a new process could still take: free CUDA memory, or the kernel's MemAvailable (inf if unknown)."""
    import torch

    if device_name.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device_name))[0] / 2**20
    for line in meminfo.read_text().splitlines() if meminfo.exists() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def big_batch_fits(micro_row: dict[str, Any], micro: int, global_batch: int, available_mib: float) -> bool:
    """Whether one plain step at `global_batch` should fit: the micro step's memory in the steps grows with the
    batch, with 10% to spare (running out of host memory would take the machine's other work with it)."""
    if "error" in micro_row:
        return False
    predicted = micro_row["memory_before_warmup_mib"] + _step_memory(micro_row) * global_batch / micro
    return predicted < 0.9 * available_mib


def run(device_name: str, model_name: str, loss: str, micro: int, globals_: list[int], big_max: int,
        after_heads: list[int], image_size: int | None, inputs_kind: str = "float") -> dict[str, Any]:
    """Every measurement of the plan, each in its own process; the micro-batch reference first."""
    rows = [isolated(step_measurement, device_name, model_name, loss, "micro", micro, micro, image_size,
                     inputs_kind)]
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    available = available_memory_mib(device_name)
    for global_batch in globals_:
        modes = ["independent", "exact"] + (["exact_after_heads"] if global_batch in after_heads else [])
        if global_batch <= big_max and big_batch_fits(rows[0], micro, global_batch, available):
            modes.append("big")
        for mode in modes:
            row = isolated(step_measurement, device_name, model_name, loss, mode, micro, global_batch, image_size,
                           inputs_kind)
            rows.append(row if "error" not in row else {**row, "mode": mode, "global_batch": global_batch})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"model": model_name, "loss": loss, "micro_batch": micro, "inputs": inputs_kind, "rows": rows}


def _step_memory(row: dict[str, Any]) -> float:
    """Peak memory above what the process held before its first step (interpreter, torch, model)."""
    return row["peak_memory_mib"] - row["memory_before_warmup_mib"]


def sample_input_mib(model_name: str, loss: str, image_size: int | None = None, inputs_kind: str = "float") -> float:
    """MiB of one sample's loader inputs (fp32 views, or uint8 crops; int64 tokens), read from a model built on no
    device (the deferred views' few operation numbers left out)."""
    import torch

    import slip.losses
    from slip.models import MODEL_BUILDERS

    objective = getattr(slip.losses, OBJECTIVES[loss])()
    with torch.device("meta"):
        arch = MODEL_BUILDERS[model_name](inputs=objective.inputs, **({"image_size": image_size} if image_size
                                                                      else {})).arch
    view_bytes = 3 * arch["image_size"] ** 2 * (1 if inputs_kind == "deferred" else 4)
    return sum(arch["context_length"] * 8 if key == "text" else view_bytes for key in objective.inputs) / 2**20


def _memory_ratios(exact: dict[str, Any], micro: dict[str, Any] | None, independent: dict[str, Any],
                   key: str, window_inputs_mib: float | None) -> dict[str, float]:
    """Exact's `key` memory over one micro-batch step's plus the cached features (plus the window's inputs), and
    over independent accumulation's."""
    if exact.get(key) is None or independent.get(key) is None:
        return {}
    ratios = {"of_independent": exact[key] / independent[key]}
    if micro is not None and micro.get(key) is not None:
        reference = micro[key] + exact["cached_features_mib"]
        ratios["of_micro"] = exact[key] / reference
        if window_inputs_mib is not None:
            ratios["of_micro_and_inputs"] = exact[key] / (reference + window_inputs_mib)
    return ratios


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per global batch: exact's time over independent's (and the big batch's, the after-heads split's), and its
    peak memory (resident set; live heap) against one micro-batch step's and independent accumulation's."""
    rows = [row for row in results["rows"] if "error" not in row]
    (micro,) = [row for row in rows if row["mode"] == "micro"] or [None]
    table = []
    for global_batch in sorted({row["global_batch"] for row in rows if row["mode"] != "micro"}):
        found = {row["mode"]: row for row in rows if row["global_batch"] == global_batch and row["mode"] != "micro"}
        if "exact" not in found or "independent" not in found:
            continue
        exact, independent = found["exact"], found["independent"]
        inputs = results["sample_input_mib"] * global_batch if "sample_input_mib" in results else None
        line = {"global_batch": global_batch, "update_freq": exact["update_freq"],
                "time_ratio": exact["step_s"] / independent["step_s"], "exact_peak_mib": exact["peak_memory_mib"],
                "window_inputs_mib": inputs,
                "peak": _memory_ratios(exact, micro, independent, "peak_memory_mib", inputs),
                "heap": _memory_ratios(exact, micro, independent, "peak_heap_in_use_mib", inputs)}
        if "big" in found:
            line["big_time_ratio"] = exact["step_s"] / found["big"]["step_s"]
        if "exact_after_heads" in found:
            line["after_heads_time_ratio"] = found["exact_after_heads"]["step_s"] / exact["step_s"]
        table.append(line)
    return table


def markdown(results: dict[str, Any], command: str, machine: dict[str, Any]) -> str:
    """The results as a Markdown page: every measurement, then the ratios the targets are about."""
    kind = results.get("inputs", "float")
    described = INPUT_KINDS[kind]
    lines = [*results_header(f"Accumulation: {results['model']} {results['loss']}, micro-batch "
                             f"{results['micro_batch']}, {described} inputs", command, machine),
             "| mode | global batch | update_freq | step s | samples/s | peak memory MiB | of it, in the steps "
             "| live heap peak MiB | cached features MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        if "error" in row:
            lines.append(error_row([row["mode"], row["global_batch"], "–"], row["error"], 9))
            continue
        heap = row.get("peak_heap_in_use_mib")
        lines.append(f"| {row['mode']} | {row['global_batch']} | {row['update_freq']} | {row['step_s']:.1f} | "
                     f"{row['samples_per_s']:.2f} | {row['peak_memory_mib']:.0f} | {_step_memory(row):.0f} | "
                     f"{'–' if heap is None else f'{heap:.0f}'} | {row['cached_features_mib']:.2f} |")
    lines += ["", "Peak memory: the process's peak resident set (CPU) or the CUDA allocator's peak; live heap: the "
              "most bytes malloc had handed out at once during the timed step (glibc's mallinfo2, sampled every "
              "2 ms), which leaves out what the heap keeps after frees. Exact's memory against one micro-batch "
              "step's plus the cached features (*micro*), the same plus the window's inputs, kept for the replays "
              "(*+ inputs*), and against independent accumulation's (*indep.*):", "",
              "| global batch | update_freq | exact / independent time | exact / big batch time | after-heads / "
              "feature split time | exact peak MiB | peak: micro | + inputs | indep. | live heap: micro | "
              "+ inputs | indep. |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for line in summary(results):
        def cell(value: float | None, digits: int = 2) -> str:
            return "–" if value is None else f"{value:.{digits}f}"
        memory = [cell(line[kind].get(ratio)) for kind in ("peak", "heap")
                  for ratio in ("of_micro", "of_micro_and_inputs", "of_independent")]
        lines.append(f"| {line['global_batch']} | {line['update_freq']} | {cell(line['time_ratio'])} | "
                     f"{cell(line.get('big_time_ratio'))} | {cell(line.get('after_heads_time_ratio'))} | "
                     f"{cell(line['exact_peak_mib'], 0)} | " + " | ".join(memory) + " |")
    if "sample_input_mib" in results:
        lines += ["", f"The window's inputs: {results['sample_input_mib']:.2f} MiB per sample ({described}, int64 "
                  "tokens), the loader batches kept on the host until each micro-batch's replay."]
    return "\n".join(lines) + "\n"


def result_stem(inputs_kind: str) -> str:
    """File name (without suffix) of a run's results: accumulation, or accumulation-deferred."""
    return "accumulation" if inputs_kind == "float" else f"accumulation-{inputs_kind}"


def write(payload: dict[str, Any], out: Path) -> str:
    """Write accumulation[-deferred].json and .md under `out`; the Markdown."""
    from slip.checkpoint import atomic_write

    text = markdown(payload, payload["command"], payload["machine"])
    stem = result_stem(payload.get("inputs", "float"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{stem}.json",
                 lambda handle: handle.write(json.dumps(payload, indent=2).encode() + b"\n"))
    atomic_write(out / f"{stem}.md", lambda handle: handle.write(text.encode()))
    return text


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every measurement, write accumulation.json and accumulation.md."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--loss", default="slip", choices=list(OBJECTIVES))
    parser.add_argument("--micro", type=int, default=16, help="micro-batch size (per step of the towers)")
    parser.add_argument("--globals", default="32,64,128,256,512", help="global batch sizes, comma-separated")
    parser.add_argument("--big-max", type=int, default=512,
                        help="largest global batch timed as one plain step (where it is predicted to fit)")
    parser.add_argument("--after-heads", default="128", help="global batches at which to time the after-heads split")
    parser.add_argument("--image-size", type=int, default=None, help="override the model's image size")
    parser.add_argument("--inputs", default="float", choices=list(INPUT_KINDS),
                        help="loader batches of fp32 views (tensor backend) or of uint8 crops (device backend)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="measure nothing: summarise an earlier run's accumulation.json again, into --out")
    args = parser.parse_args(argv)
    globals_ = [int(value) for value in args.globals.split(",") if value]
    if any(value % args.micro for value in globals_):
        parser.error(f"--globals: every global batch must be a multiple of --micro {args.micro}")
    if args.render is not None:  # measurements of an earlier run, summarised and written again by this code
        payload = json.loads(args.render.read_text())
        payload.setdefault("sample_input_mib", sample_input_mib(payload["model"], payload["loss"], args.image_size,
                                                                payload.get("inputs", "float")))
        payload["summary"] = summary(payload)
        print(write(payload, args.out))
        return
    after_heads = [int(value) for value in args.after_heads.split(",") if value]
    results = run(args.device, args.model, args.loss, args.micro, globals_, args.big_max, after_heads,
                  args.image_size, args.inputs)
    command = "python " + " ".join(shlex.quote(part) for part in [sys.argv[0], *(argv or sys.argv[1:])])
    payload = {"command": command, "machine": machine_record(args.device), **results,
               "sample_input_mib": sample_input_mib(args.model, args.loss, args.image_size, args.inputs)}
    payload["summary"] = summary(payload)
    print(write(payload, args.out))


if __name__ == "__main__":
    main()
