"""python -m slip.finetune: timm's layer decay, the recipe's parts, exact resume, ranks, one-line refusals, report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from slip.app.config import ConfigError
from slip.app.finetune import finetune, source_checkpoint
from slip.app.run_layout import CHECKPOINT_IN_RUN, SHARDED_CHECKPOINT_IN_RUN
from slip.checkpoint import CheckpointError, read_checkpoint, save_model
from slip.classifier import classifier_from_model, layer_decay_groups, load_classifier
from slip.data.classification import eval_transform
from slip.data.synthetic import SyntheticClassification
from slip.eval.classification import ClassifierEvaluator
from slip.models import build_resnet_model, build_vit_model
from slip.pretrained import load_pretrained
from rank_helpers import free_port
from train_helpers import CONF_DIR, assert_same_run, losses_by_step, subprocess_env

TINY_VIT = dict(image_size=32, patch_size=4, vision_width=64, vision_layers=3, vision_heads=2, embed_dim=32,
                text_width=32, text_layers=1, text_heads=2, context_length=16, ssl_mlp_dim=64, ssl_embed_dim=32)
# A few small steps on the embedded task at the tiny model's 32 px.
FAST = ["trainer.log_every=1", "trainer.log_images=false", "trainer.device=cpu", "trainer.save_every=0",
        "data.batch_size=8", "data.num_workers=0", *(f"catalog.synthetic.{split}.{key}={value}" for split, size in (("train", 32),
                                                                                                ("test", 24))
                               for key, value in (("num_samples", size), ("image_size", 32)))]
# Every random part of the recipe on: mixup/cutmix, drop path, RandAugment, random erasing.
# BEiT's mixup and cutmix (the CPU recipe leaves them off).
MIXUP = "mixup={_target_:timm.data.Mixup,_partial_:true,mixup_alpha:0.8,cutmix_alpha:1.0,label_smoothing:0.1}"
STOCHASTIC = [MIXUP, "classifier.drop_path_rate=0.2", "augment.auto_augment=rand-m9-mstd0.5-inc1",
              "augment.re_prob=0.5"]


def compose_finetune(*overrides: str) -> DictConfig:
    """The config as `python -m slip.finetune <overrides>` composes it."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("finetune", overrides=list(overrides))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny image-text model saved as a run's checkpoint (a run dir)."""
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    torch.manual_seed(0)
    save_model(build_vit_model(**TINY_VIT), run_dir / CHECKPOINT_IN_RUN)
    return run_dir


def scales_by_name(groups: list[dict], model: torch.nn.Module, prefix: str = "") -> dict[str, tuple[float, float]]:
    """{parameter name without `prefix`: (lr_scale, weight_decay)} of optimiser groups over `model`."""
    names = {id(param): name.removeprefix(prefix) for name, param in model.named_parameters()}
    return {names[id(param)]: (group["lr_scale"], group["weight_decay"]) for group in groups
            for param in group["params"]}


def test_layer_decay_is_timms_assignment_for_the_same_vit_with_a_head() -> None:
    from timm.models.vision_transformer import VisionTransformer
    from timm.optim import param_groups_layer_decay

    classifier = classifier_from_model(build_vit_model(**TINY_VIT), num_classes=7)
    reference = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, num_classes=7,
                                  global_pool="token")
    want = scales_by_name(param_groups_layer_decay(reference, 0.05, reference.no_weight_decay(), layer_decay=0.65),
                          reference)
    got = scales_by_name(layer_decay_groups(classifier, 0.05, 0.65), classifier, "tower.")
    assert got == want
    # stem 0, blocks 1-3 (the final norm with the last, as timm groups it), the head at 4
    assert got["blocks.0.attn.qkv.weight"][0] == pytest.approx(0.65 ** 3) and got["head.weight"] == (1.0, 0.05)
    assert got["norm.weight"] == (0.65, 0.0) and got["pos_embed"] == (pytest.approx(0.65 ** 4), 0.0) and got["cls_token"][1] == 0.0


def test_a_modified_resnet_decays_by_block_from_the_stem_up() -> None:
    model = build_resnet_model(image_size=32, vision_layers=[1, 2, 1, 1], vision_width=8, embed_dim=16,
                               text_width=16, text_layers=1, text_heads=2, context_length=8, ssl_mlp_dim=16,
                               ssl_embed_dim=8)
    classifier = classifier_from_model(model, num_classes=3)
    got = scales_by_name(layer_decay_groups(classifier, 0.1, 0.5), classifier, "tower.")
    # stem, 5 residual blocks, then the attention pool with the head: 7 groups, scales 0.5 ** 6 ... 1.
    assert got["conv1.weight"][0] == 0.5 ** 6 and got["layer1.0.conv1.weight"][0] == 0.5 ** 5
    assert got["layer2.1.conv1.weight"][0] == 0.5 ** 3 and got["layer4.0.conv1.weight"][0] == 0.5
    assert got["attnpool.c_proj.weight"] == (1.0, 0.1) and got["head.weight"] == (1.0, 0.1)
    assert got["attnpool.positional_embedding"] == (1.0, 0.0) and got["bn1.weight"][1] == 0.0


def test_the_tower_is_the_checkpoints_and_the_head_starts_small() -> None:
    model = build_vit_model(**TINY_VIT)
    classifier = classifier_from_model(model, num_classes=50, drop_path_rate=0.3, head_init_scale=1e-3)
    assert classifier.spec.vision.drop_path_rate == 0.3 and model.spec.vision.drop_path_rate == 0.0
    for name, value in model.visual.state_dict().items():
        assert torch.equal(classifier.tower.state_dict()[name], value), name
    assert classifier.head.weight.std().item() == pytest.approx(0.02e-3, rel=0.1)
    assert not classifier.head.bias.any()
    with pytest.raises(ValueError, match="the ModifiedResNet tower has no drop path"):
        classifier_from_model(build_resnet_model(image_size=32, vision_layers=[1, 1, 1, 1], vision_width=8,
                                                 embed_dim=16, text_width=16, text_layers=1, text_heads=2,
                                                 context_length=8), 3, drop_path_rate=0.1)


def test_finetuning_a_tiny_checkpoint_improves_on_its_start(source: Path, tmp_path: Path) -> None:
    cfg = compose_finetune(f"checkpoint={source}", f"output_root={tmp_path}", "run_name=ft", *FAST,
                           "catalog.synthetic.train.num_samples=480", "catalog.synthetic.test.num_samples=96",
                           "trainer.max_steps=60", "data.batch_size=16", "trainer.log_every=10", "mixup=null",
                           "classifier.drop_path_rate=0", "classifier.layer_decay=1.0", "augment.re_prob=0",
                           "schedule.warmup_epochs=0.1")
    pretrained = load_pretrained(source_checkpoint(str(source)))
    preprocess = pretrained.spec.preprocess
    test = SyntheticClassification(num_samples=96, image_size=32, seed=1)
    start = ClassifierEvaluator(test, eval_transform(32, preprocess.mean, preprocess.std, preprocess.interpolation))(
        classifier_from_model(pretrained, len(test.classes)))
    results = finetune(cfg)
    assert results["validation"] == "done" and results["step"] == 60
    assert results["test"]["top1"] > start["top1"] + 5, (start, results["test"])
    losses = [row["loss"] for row in results["history"]]
    assert losses[-1] < losses[0] - 0.1
    classifier = load_classifier(tmp_path / "ft" / CHECKPOINT_IN_RUN)
    records = json.loads((source / "eval" / "finetune.json").read_text())["records"]
    assert {record["metric"]: record["value"] for record in records} == results["test"]
    assert classifier.num_classes == 24 and records[0]["finetune_run"] == str((tmp_path / "ft").resolve())


def test_resume_mid_run_equals_an_uninterrupted_run_in_float64(source: Path, tmp_path: Path) -> None:
    common = [f"checkpoint={source}", f"output_root={tmp_path}", *FAST, *STOCHASTIC, "trainer.max_steps=6",
              "trainer.precision=fp64"]
    whole = finetune(compose_finetune(*common, "run_name=whole"))
    first = finetune(compose_finetune(*common, "run_name=split", "trainer.stop_after=3"))
    assert first["step"] == 3 and not first["finished"]
    resumed = finetune(compose_finetune(*common, "run_name=split"))
    assert_same_run(losses_by_step(resumed), read_checkpoint(tmp_path / "split" / CHECKPOINT_IN_RUN)["model"],
                    losses_by_step(whole), read_checkpoint(tmp_path / "whole" / CHECKPOINT_IN_RUN)["model"])
    assert resumed["test"] == whole["test"]
    groups = read_checkpoint(tmp_path / "whole" / CHECKPOINT_IN_RUN)["optimizer"]["param_groups"]
    # patch embedding, 3 blocks (the final norm with the last), the head: each group at the step's lr x its scale
    assert sorted({group["lr_scale"] for group in groups}) == pytest.approx([0.65 ** n for n in range(4, -1, -1)])
    assert all(group["lr"] == pytest.approx(whole["history"][-1]["lr"] * group["lr_scale"], rel=1e-12)
               for group in groups)
    with pytest.raises(ConfigError, match=r"^classifier.drop_path_rate: differs from the checkpoint"):
        finetune(compose_finetune(*common, "run_name=split", "classifier.drop_path_rate=0.1"))


def test_two_gloo_processes_equal_one_process_in_float64(source: Path, tmp_path: Path) -> None:
    """Without the draws that are per process by design (mixup's pairs and lambda, drop path), 2 ranks at batch 4
    train what 1 process does at batch 8, under DDP and under FSDP; RandAugment and erasing are drawn per sample and
    stay on."""
    common = [f"checkpoint={source}", f"output_root={tmp_path}", *FAST, "mixup=null",
              "classifier.drop_path_rate=0", "augment.auto_augment=rand-m9-mstd0.5-inc1", "trainer.max_steps=3",
              "trainer.precision=fp64"]
    one = finetune(compose_finetune(*common, "run_name=one", "data.batch_size=8"))
    for strategy, checkpoint in (("ddp", CHECKPOINT_IN_RUN), ("fsdp", SHARDED_CHECKPOINT_IN_RUN)):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   f"--master_port={free_port()}", "-m", "slip.finetune", *common, f"run_name=two-{strategy}",
                   "data.batch_size=4", f"trainer.strategy={strategy}"]
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env=subprocess_env(OMP_NUM_THREADS="1"))
        assert run.returncode == 0, run.stderr[-3000:]
        two = json.loads((tmp_path / f"two-{strategy}" / "results.json").read_text())
        saved = read_checkpoint(tmp_path / f"two-{strategy}" / checkpoint)
        assert saved["processes"] == 2
        assert_same_run(losses_by_step(two), saved["model"], losses_by_step(one),
                        read_checkpoint(tmp_path / "one" / CHECKPOINT_IN_RUN)["model"])


def one_line(error: pytest.ExceptionInfo) -> str:
    """The error's message, checked to be one line."""
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_input_is_refused_in_one_line_naming_the_key_or_file(source: Path, tmp_path: Path) -> None:
    common = [f"output_root={tmp_path}", *FAST, "trainer.max_steps=1"]
    with pytest.raises(ConfigError) as error:
        finetune(compose_finetune(f"checkpoint={source}", *common, "dataset=nope"))
    assert one_line(error).startswith("catalog.nope: no such dataset in the catalog")
    cfg = compose_finetune(f"checkpoint={source}", *common, "dataset=unlabelled")
    OmegaConf.set_struct(cfg, False)
    shapes = {"_target_": "slip.data.synthetic.SyntheticShapes", "num_samples": 8, "image_size": 32}
    cfg.catalog.unlabelled = {"train": {**shapes, "split": "train"}, "test": {**shapes, "split": "test"}}
    with pytest.raises(ConfigError) as error:
        finetune(cfg)
    assert one_line(error).startswith("catalog.unlabelled.train: SyntheticShapes has no class labels")
    with pytest.raises(ConfigError) as error:
        finetune(compose_finetune(f"checkpoint={source}", *common, MIXUP, "data.batch_size=7"))
    assert one_line(error).startswith("data.batch_size: mixup pairs each batch with its reverse")
    unrelated = tmp_path / "weights.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, unrelated)
    with pytest.raises(CheckpointError) as error:
        finetune(compose_finetune(f"checkpoint={unrelated}", *common))
    assert str(unrelated) in one_line(error)
    finetune(compose_finetune(f"checkpoint={source}", *common, "run_name=done", "mixup=null"))
    finetuned = tmp_path / "done" / CHECKPOINT_IN_RUN
    with pytest.raises(CheckpointError) as error:
        finetune(compose_finetune(f"checkpoint={finetuned}", *common))
    assert one_line(error) == (f"{finetuned}: a fine-tuned classifier (python -m slip.finetune), not an image-text "
                               "model; read it with slip.classifier.load_classifier")


def test_a_sweep_over_checkpoints_lands_in_the_objective_report(tmp_path: Path) -> None:
    runs = tmp_path / "pretrained"
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        save_model(build_vit_model(**TINY_VIT), runs / name / CHECKPOINT_IN_RUN)
    command = [sys.executable, "-m", "slip.finetune", "-m", f"checkpoint={runs / 'a'},{runs / 'b'}",
               f"output_root={tmp_path / 'out'}", *FAST, "trainer.max_steps=2"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(path.name for path in (tmp_path / "out" / "finetune" / "synthetic").iterdir())[0].startswith("a-")
    report = subprocess.run([sys.executable, "-m", "slip.report", str(runs)], capture_output=True, text=True,
                            timeout=120, env=subprocess_env())
    assert report.returncode == 0, report.stderr[-2000:]
    rows = (runs / "report.csv").read_text().splitlines()
    assert "finetune/synthetic/top1" in rows[0] and [row.split(",")[0] for row in rows[1:]] == ["a", "b"]


def image_folder(root: Path, classes: tuple[str, ...], per_class: int, corrupt: int = 0) -> Path:
    """An ImageFolderDataset tree of small generated images, `corrupt` of the first class's files not images."""
    from PIL import Image

    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            path = root / name / f"{index}.png"
            if label == 0 and index < corrupt:
                path.write_bytes(b"not an image")
            else:
                Image.new("RGB", (40, 36), (60 * label, 255 - 40 * index, 90)).save(path)
    return root


def folder_entry(cfg: DictConfig, train: Path, test: Path) -> DictConfig:
    """`cfg` with catalog entry "folders" reading the two image-folder trees."""
    OmegaConf.set_struct(cfg, False)
    cfg.catalog.folders = {split: {"_target_": "slip.data.labelled.ImageFolderDataset", "root": str(root)}
                           for split, root in (("train", train), ("test", test))}
    return cfg


def test_unreadable_training_images_are_skipped_and_counted_and_foreign_test_classes_refused(
        source: Path, tmp_path: Path) -> None:
    train = image_folder(tmp_path / "train", ("red", "green", "blue"), per_class=6, corrupt=2)
    test = image_folder(tmp_path / "test", ("red", "green", "blue"), per_class=2)
    common = [f"checkpoint={source}", f"output_root={tmp_path}", *FAST, "dataset=folders", "trainer.max_steps=2",
              "mixup=null", "trainer.max_bad_fraction=0.5"]
    results = finetune(folder_entry(compose_finetune(*common, "run_name=folders"), train, test))
    assert results["skipped_samples"] == {"unreadable": 2} and results["step"] == 2
    other = image_folder(tmp_path / "other", ("red", "green", "violet"), per_class=2)
    with pytest.raises(ConfigError) as error:
        finetune(folder_entry(compose_finetune(*common, "run_name=other"), train, other))
    assert one_line(error).startswith("catalog.folders.test: its classes differ from the train split's")


def test_micro_batches_sum_to_the_whole_batch_whatever_the_accumulation_setting(source: Path,
                                                                                 tmp_path: Path) -> None:
    """The loss is a mean over samples: update_freq 2 at batch 4 is the step at batch 8, in float64."""
    common = [f"checkpoint={source}", f"output_root={tmp_path}", *FAST, "mixup=null", "classifier.drop_path_rate=0",
              "trainer.max_steps=3", "trainer.precision=fp64"]
    whole = finetune(compose_finetune(*common, "run_name=whole", "data.batch_size=8"))
    for mode in ("exact", "independent"):
        parts = finetune(compose_finetune(*common, f"run_name={mode}", "data.batch_size=4", "trainer.update_freq=2",
                                          f"trainer.accumulation={mode}"))
        assert_same_run(losses_by_step(parts), read_checkpoint(tmp_path / mode / CHECKPOINT_IN_RUN)["model"],
                        losses_by_step(whole), read_checkpoint(tmp_path / "whole" / CHECKPOINT_IN_RUN)["model"])


def test_every_top_level_key_is_identity_or_free_on_resume(source: Path) -> None:
    """Each key of the composed config either defines the run (a resume with another value stops) or may change."""
    from slip.app.finetune import FINETUNE_FREE_KEYS, FINETUNE_IDENTITY_SECTIONS

    keys = set(compose_finetune(f"checkpoint={source}"))
    identity, free = set(FINETUNE_IDENTITY_SECTIONS), set(FINETUNE_FREE_KEYS)
    assert not identity & free
    assert keys | {"source"} == identity | free  # "source": the source's contents by hash, added by the app


def test_bf16_autocast_finetunes_close_to_fp32(source: Path, tmp_path: Path) -> None:
    """trainer.precision=bf16 runs the same steps under autocast: losses within bf16's rounding of fp32's."""
    # A head at full scale: the recipe's 0.001 makes the first losses ln(classes) to float32's last bit either way.
    common = [f"checkpoint={source}", f"output_root={tmp_path}", *FAST, "mixup=null", "trainer.max_steps=2",
              "classifier.head_init_scale=1.0"]
    fp32 = losses_by_step(finetune(compose_finetune(*common, "run_name=fp32", "trainer.precision=fp32")))
    bf16 = losses_by_step(finetune(compose_finetune(*common, "run_name=bf16", "trainer.precision=bf16")))
    assert sorted(bf16) == sorted(fp32) == [1, 2] and bf16 != fp32  # autocast did compute in bf16
    for step, loss in fp32.items():
        assert bf16[step] == pytest.approx(loss, rel=2e-2), step
