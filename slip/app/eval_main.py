"""python -m slip.eval checkpoint=PATH: evaluate checkpoints as conf/eval.yaml says (see the README)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from slip.checkpoint import CheckpointError
from slip.app.config import CONF_DIR, ConfigError
from slip.app.evaluate import evaluate


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: known errors end the run with one line on stderr, without a stack trace."""
    try:
        evaluate(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"slip.eval: error: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
