"""The benchmark scripts keep working: suite.py's measurements run on tiny sizes and every section renders;
step_profile.py accounts for a step's time."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """benchmarks/NAME.py as a module (the scripts import their sibling captions.py, so that folder is on the path
    while it loads)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def suite():
    """benchmarks/suite.py."""
    return _load("suite")


def test_the_step_profile_accounts_for_the_step():
    step_profile = _load("step_profile")
    result = step_profile.profile("tiny", "clip", batch_size=1, steps=1, warmup=0)  # any model: the CPU one
    run = result["runs"][0]
    assert {"matmul", "attention", "other"} <= run["groups_s"].keys()
    assert abs(sum(run["groups_s"].values()) + run["outside_operators_s"] - run["wall_s"]) < 1e-6
    assert run["top"][0]["calls"] > 0 and step_profile.group_of("addmm") == "matmul"
    assert step_profile.group_of("_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert "| 1 |" in step_profile.markdown(result, "cmd", {})


@pytest.mark.parametrize("backend", ["tensor", "device"])
def test_the_training_loader_measurement_runs_the_real_loader(suite, backend):
    result = suite.training_loader("cpu", samples=8, batch_size=4, workers=1, backend=backend)
    assert result["samples"] >= 8 and result["workers"] == 1 and result["samples_per_s"] > 0


def test_the_view_finishing_measurement_finishes_a_real_batch(suite):
    result = suite.view_finishing("cpu", batch_size=3, repeats=1)
    assert result["batch_size"] == 3 and result["samples_per_s"] > 0
    transform, batch = suite._deferred_batch(2)
    finished = transform.to_device(batch, "cpu")
    assert finished["aug1"].shape == (2, 3, 224, 224) and finished["aug1"].dtype.is_floating_point


def test_the_sustained_matmul_rate_counts_every_product(suite):
    import torch

    a, b = torch.ones(64, 64), torch.ones(64, 64)
    assert 0 < suite._sustained_matmul_tflops(a, b, torch.device("cpu"), 0.05) < 100


def test_every_section_renders_including_errors(suite):
    train = {"model": "vit_ti16", "objective": "slip", "batch_size": 2, "images_per_s": 4.0, "step_s": 0.5,
             "model_tflops_per_step": 0.05, "achieved_tflops": 0.1, "fraction_of_peak": 0.5,
             "fraction_of_adjacent_matmul": 0.6, "fraction_of_adjacent_matmul_range": [0.55, 0.7],
             "peak_memory_mib": 100.0}
    results = {"matmul_peak": {"size": 64, "dtype": "float32", "tflops": 0.2}, "train_probe_s": 1.0,
               "train_step": [train, {"model": "vit_s16", "objective": "clip", "error": "boom"}],
               "data_pipeline": [{"backend": "tensor", "samples_per_s_per_core": 150.0, "ms_per_sample": 6.7,
                                  "decode_ms": 1.5, "rounds": 10},
                                 {"backend": "slip_original", "samples_per_s_per_core": 75.0, "ms_per_sample": 13.3,
                                  "decode_ms": 1.5, "rounds": 10}],
               "view_finishing": {"device": "cpu", "threads": 2, "batch_size": 64, "batch_ms": 80.0,
                                  "samples_per_s": 800.0},
               "training_loader": [{"backend": "tensor", "workers": 2, "batch_size": 4, "samples": 8,
                                    "samples_per_s": 200.0, "samples_per_s_per_worker": 100.0},
                                   {"backend": "device", "workers": 2, "batch_size": 4, "samples": 8,
                                    "samples_per_s": 400.0, "samples_per_s_per_worker": 200.0}],
               "evaluation": {"error": "no model"}, "contrastive_loss": [{"error": "out of memory"}]}
    text = suite.markdown(results, "python benchmarks/suite.py", {"device": "cpu"})
    assert "| vit_ti16 | slip | 2 | 4 | 0.5 |" in text and "60% (55–70%)" in text
    assert "error: boom" in text and "| tensor | 150 | 2 |" in text
    assert "| tensor | **200** | 100 |" in text and "| device | **400** | 200 |" in text
    assert "| vit_ti16 | 4 | 50x | 100x |" in text  # each loader feeds 50 and 100 such steps
    assert "**800 samples/s**" in text
    assert "error: out of memory" in text


def test_the_cpu_description_names_the_widest_float32_vector_extension(suite, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some Xeon\n"
                       "flags\t\t: fpu sse2 avx avx2 fma\n\n"
                       "processor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Some Xeon\n"
                       "flags\t\t: fpu sse2 avx avx2 fma\n")
    assert suite.cpu_description(cpuinfo) == {"cpu_vendor": "GenuineIntel", "cpu_model": "Some Xeon",
                                              "fp32_simd": "avx2"}
    assert suite.cpu_description(tmp_path / "missing") == {}


def test_each_finished_section_is_handed_on_and_a_cut_short_run_says_what_it_lacks(suite, monkeypatch, tmp_path):
    # The measurements run in spawned processes, which import suite.py by name and look its functions up there.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setitem(sys.modules, "suite", suite)
    snapshots = []
    results = suite.run(["loss"], "cpu", quick=True,
                        after_section=lambda so_far: snapshots.append(list(so_far["sections_done"])))
    assert snapshots == [["loss"]] and len(results["contrastive_loss"]) == 2
    partial = suite.markdown(results, "cmd", {}, sections=["loss", "eval"])
    assert "**Partial results**: written after loss; not (yet) measured: eval." in partial
    assert "Partial" not in suite.markdown(results, "cmd", {}, sections=["loss"])

    # main() runs the same sections through run(), whose spawned measurements ran above (and
    # test_a_measurement_whose_process_dies_comes_back_as_an_error checks `isolated` itself): here they run in this
    # process, to check what main writes.
    monkeypatch.setattr(suite, "isolated", lambda fn, *args: fn(*args))
    suite.main(["--quick", "--sections", "loss", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "suite_quick.json").read_text())
    assert written["sections_done"] == ["loss"] and written["command"].endswith(f"--out {tmp_path}")
    assert "## Contrastive loss" in (tmp_path / "suite_quick.md").read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["suite_quick.json", "suite_quick.md"]


def test_the_attention_comparison_times_two_forms_of_the_same_attention():
    import torch

    model_fastpaths = _load("model_fastpaths")
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(model_fastpaths.written_out_attention(q, k, v), expected, rtol=1e-10, atol=1e-12)
    result = model_fastpaths.bench_attention(images=1, pairs=1)
    assert result["pairs"] == 1 and result["seconds_sdpa"] > 0 and result["sdpa_gflops"] > 0


def test_model_flops_count_cpu_attention_as_torch_counts_gpu_attention(suite):
    import torch
    import torch.nn.functional as F

    batch, heads, tokens, width = 2, 3, 17, 8
    q, k, v = (torch.randn(batch, heads, tokens, width, requires_grad=True) for _ in range(3))
    with suite.model_flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    products = 2 * 2 * batch * heads * tokens * tokens * width  # q k^T and the weights times v
    assert counter.get_total_flops() == 3 * products  # once forward, twice backward


def test_the_accumulation_benchmark_times_every_mode_and_renders_its_ratios(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    accumulation = _load("accumulation")
    # The CPU "tiny" model (8M parameters; vit_ti16 has 88M, most of them in its text tower): what is checked is that
    # every mode is measured and rendered, whatever the model.
    rows = [accumulation.step_measurement("cpu", "tiny", "slip", mode, 2, 4, image_size=32)
            for mode in accumulation.MODES]
    assert [row["mode"] for row in rows] == list(accumulation.MODES)
    assert all(row["step_s"] > 0 and row["peak_memory_mib"] > 0 for row in rows)
    by_mode = {row["mode"]: row for row in rows}
    assert by_mode["exact"]["cached_features_mib"] > 0 and by_mode["exact"]["update_freq"] == 2
    text = accumulation.markdown({"model": "vit_ti16", "loss": "slip", "micro_batch": 2,
                                  "rows": rows + [{"mode": "exact", "global_batch": 8, "error": "boom"}]}, "cmd", {})
    assert "| exact | 4 | 2 |" in text and "error: boom" in text
    assert all(row["peak_heap_in_use_mib"] > 0 for row in rows)  # glibc's live-allocation count (Linux CI)
    (line,) = accumulation.summary({"rows": rows, "sample_input_mib": 0.5})
    assert line["global_batch"] == 4 and line["window_inputs_mib"] == 2.0 and "big_time_ratio" in line
    assert {"of_micro", "of_micro_and_inputs", "of_independent"} == line["peak"].keys() == line["heap"].keys()
    assert line["peak"]["of_micro_and_inputs"] < line["peak"]["of_micro"]


def test_the_accumulation_benchmark_keeps_uint8_loader_batches_for_the_device_backend(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    accumulation = _load("accumulation")
    rows = {mode: accumulation.step_measurement("cpu", "tiny", "slip", mode, 2, 4, image_size=32,
                                                inputs_kind="deferred") for mode in ("exact", "big")}
    # The same samples finished a micro-batch at a time (exact) or all at once (big): one objective value.
    assert rows["exact"]["loss"] == pytest.approx(rows["big"]["loss"], rel=1e-4)
    make, prepare = accumulation.deferred_batches(("image", "text", "aug1", "aug2"), 2, 32, 77)
    loader_batch = make(3)
    assert loader_batch["aug1"].pixels.dtype == torch.uint8 and loader_batch["text"].shape == (3, 77)
    assert prepare(loader_batch, torch.device("cpu"))["aug2"].shape == (3, 3, 32, 32)
    uint8, fp32 = (accumulation.sample_input_mib("vit_s16", "slip", inputs_kind=kind) for kind in ("deferred", "float"))
    assert uint8 == pytest.approx((3 * 3 * 224 * 224 + 77 * 8) / 2**20) and fp32 > 3.9 * uint8
    assert accumulation.result_stem("deferred") == "accumulation-deferred"


def test_a_measurement_whose_process_dies_comes_back_as_an_error(suite, monkeypatch):
    import os

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the spawned process imports suite.py by name
    monkeypatch.setitem(sys.modules, "suite", suite)
    assert suite.isolated(os._exit, 3) == {"error": "the measuring process died (exit code 3)"}


def test_the_big_batch_is_timed_only_where_the_scaled_micro_step_fits(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    accumulation = _load("accumulation")
    micro = {"memory_before_warmup_mib": 1000.0, "peak_memory_mib": 3000.0}  # 2000 MiB in a 16-sample step
    assert accumulation.big_batch_fits(micro, 16, 32, available_mib=6000)  # predicted 5000 < 0.9 x 6000
    assert not accumulation.big_batch_fits(micro, 16, 64, available_mib=6000)  # predicted 9000
    assert not accumulation.big_batch_fits({"error": "boom"}, 16, 32, available_mib=6000)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683648 kB\nMemAvailable:   20480000 kB\n")
    assert accumulation.available_memory_mib("cpu", meminfo) == 20000


def test_the_patch_dropout_benchmark_counts_fewer_flops_at_higher_rates(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    patch_dropout = _load("patch_dropout")
    suite = _load("suite")
    rows = [{"objective": "clip", "patch_dropout": rate,
             **suite.train_step("cpu", "tiny", "clip", 4, 1, 64, 0.01, False, {"patch_dropout": rate})}
            for rate in (0.0, 0.5)]
    assert rows[1]["model_tflops_per_step"] < 0.75 * rows[0]["model_tflops_per_step"]
    text = patch_dropout.markdown({"model": "tiny", "batch": 4, "command": "cmd", "machine": {}, "rows": rows})
    assert "| clip | 0.5 |" in text and "1.00x" in text


def test_the_peer_benchmark_times_the_same_network_in_open_clip(monkeypatch):
    pytest.importorskip("open_clip")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    peers = _load("peers")
    row = peers.train_steps("cpu", "tiny", 4, 2, False, 0.0, 0.0)
    assert row["ours_step_s"] > 0 and row["open_clip_step_s"] > 0 and len(row["times"]["ours"]) == 2
    full = peers.train_steps("cpu", "tiny", 4, 1, True, 0.5, 0.5)
    assert full["mean_caption_tokens"] == 32 > row["mean_caption_tokens"]  # the tiny model's whole context
    text = peers.markdown({"command": "cmd", "machine": {}, "train": [row, full], "clip_view": {"error": "skipped"}})
    assert "| real-length |" in text and "| full-context |" in text and "CLIP view: error: skipped" in text


def test_the_end_to_end_section_reads_the_training_loops_own_rates(suite):
    loop = suite.end_to_end("cpu", "tiny", "clip", 4, 3, 1)
    assert loop["images_per_s"] > 0 and 0 <= loop["data_wait_fraction"] <= 1
    text = "\n".join(suite._end_to_end_markdown({"loop": loop, "bare_step": {"images_per_s": 2 * loop["images_per_s"]}}))
    assert "50% of it" in text and "img/s" in text
