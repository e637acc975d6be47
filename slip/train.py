"""`python -m slip.train` and `slip-train`: the training app (slip.app.train), under the name users type."""
from slip.app.train import build_run, cli, main, train

__all__ = ["build_run", "cli", "main", "train"]

if __name__ == "__main__":
    cli()
