"""What a run directory says of its run: the console's lines in train.log, the run header, results.json."""
from __future__ import annotations

import json
import re
from pathlib import Path

from train_helpers import FAST, compose_config

from slip.app.run_layout import LOG_FILE, RESULTS_FILE
from slip.app.train import train

TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def _logged(run_dir: Path) -> list[str]:
    """train.log's lines without their timestamps (every line must have one)."""
    lines = (run_dir / LOG_FILE).read_text().splitlines()
    assert all(re.match(TIMESTAMP, line) for line in lines), lines
    return [re.sub("^" + TIMESTAMP, "", line) for line in lines]


def test_train_log_holds_every_console_line_of_every_invocation(tmp_path: Path, capsys) -> None:
    overrides = [*FAST, "loss=clip", "trainer.max_steps=3", "val=synthetic", "val.dataset.num_samples=24"]
    train(compose_config(*overrides, "trainer.stop_after=2"), tmp_path)
    first = capsys.readouterr().err.splitlines()
    train(compose_config(*overrides), tmp_path)
    second = capsys.readouterr().err.splitlines()
    assert first and second
    assert _logged(tmp_path) == first + second
    assert any(line.startswith("step 3/3 ") for line in second) and "resumed from step 2" in second[0]
    assert any(line.startswith("zero-shot top-1 on the held-out split") for line in second)


def test_the_run_header_counts_update_freq_in_the_global_batch(tmp_path: Path, capsys) -> None:
    train(compose_config(*FAST, "loss=clip", "trainer.max_steps=1", "trainer.update_freq=2"), tmp_path)
    printed = capsys.readouterr().err
    assert f"run dir {tmp_path}: 1 steps of global batch 8 x 1 process x update_freq 2 = 16, " in printed
    assert "data: 64 records\n" in printed  # what was read (a CSV says images and captions)


def test_results_say_which_checkpoint_and_validation_they_belong_to(tmp_path: Path) -> None:
    overrides = [*FAST, "loss=clip", "trainer.max_steps=2", "trainer.save_every=0", "val=synthetic",
                 "val.dataset.num_samples=24"]
    stopped = train(compose_config(*overrides, "trainer.stop_after=1"), tmp_path / "run")
    assert (stopped["step"], stopped["checkpoint_step"], stopped["finished"]) == (1, 1, False)
    assert stopped["validation"] == "pending" and stopped["zeroshot"] == {}  # step 1's weights are not scored
    done = train(compose_config(*overrides), tmp_path / "run")
    assert (done["step"], done["checkpoint_step"], done["validation"]) == (2, 2, "done")
    assert set(done["zeroshot"]) == {"top1", "top5"}
    assert json.loads((tmp_path / "run" / RESULTS_FILE).read_text()) == done
    # A validation every step scores step 1's weights: a run stopped there reports them as step 1's.
    scored = train(compose_config(*overrides, "trainer.eval_every=1", "trainer.stop_after=1"), tmp_path / "scored")
    assert (scored["step"], scored["validation"], set(scored["zeroshot"])) == (1, "done", {"top1", "top5"})
    simclr = train(compose_config(*FAST, "loss=simclr", "trainer.max_steps=1", "val=synthetic",
                                  "val.dataset.num_samples=24"), tmp_path / "simclr")
    assert simclr["validation"] == "none" and simclr["zeroshot"] == {}


def test_config_yaml_is_written_when_training_starts_so_a_crashed_run_documents_itself(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    import pytest
    from omegaconf import OmegaConf

    from slip.app.engine import Trainer
    from slip.app.run_layout import CONFIG_FILE

    def crash(self, *args, **kwargs):
        raise MemoryError("killed in the first step")

    monkeypatch.setattr(Trainer, "fit", crash)
    cfg = compose_config(*FAST, "loss=clip", "trainer.max_steps=2")
    with pytest.raises(MemoryError):
        train(cfg, tmp_path)
    assert (tmp_path / CONFIG_FILE).read_text() == OmegaConf.to_yaml(cfg, resolve=True)
    assert not list(tmp_path.glob(f".{CONFIG_FILE}.*"))  # written atomically: no temporary file left


def test_results_scored_under_other_val_settings_are_not_taken_for_today_s_after_a_crash(tmp_path: Path,
                                                                                        capsys) -> None:
    """config.yaml is rewritten when an invocation starts: if it then dies before validating, the results on disk
    still say which val settings they were scored with, and the next run validates again."""
    from omegaconf import OmegaConf

    from slip.app.run_layout import CONFIG_FILE

    overrides = [*FAST, "loss=clip", "trainer.max_steps=1", "val=synthetic", "val.dataset.num_samples=24"]
    first = train(compose_config(*overrides), tmp_path)
    assert first["validation"] == "done" and first["val_settings"]["dataset"]["num_samples"] == 24
    changed = compose_config(*overrides[:-1], "val.dataset.num_samples=48")
    (tmp_path / CONFIG_FILE).write_text(OmegaConf.to_yaml(changed, resolve=True))  # as a crashed start leaves it
    capsys.readouterr()
    second = train(changed, tmp_path)
    assert "nothing to do" not in capsys.readouterr().err
    assert second["validation"] == "done" and second["val_settings"]["dataset"]["num_samples"] == 48
