"""`python -m slip.finetune` and `slip-finetune`: the fine-tuning app (slip.app.finetune), under the name users type."""
from slip.app.finetune import cli, finetune, main

__all__ = ["cli", "finetune", "main"]

if __name__ == "__main__":
    cli()
