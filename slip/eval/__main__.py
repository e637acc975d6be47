"""`python -m slip.eval` and `slip-eval`: the evaluation app (slip.app.eval_main), under the name users type."""
from slip.app.eval_main import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
