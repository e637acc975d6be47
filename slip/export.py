"""`python -m slip.export` and `slip-export`: the export app (slip.app.export), under the name users type."""
from slip.app.export import TARGETS, export, main, model_card

__all__ = ["TARGETS", "export", "main", "model_card"]

if __name__ == "__main__":
    main()
