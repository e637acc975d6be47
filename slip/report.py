"""`python -m slip.report` and `slip-report`: the report app (slip.app.report), under the name users type."""
import sys

from slip.app.report import build_report, main, write_report

__all__ = ["build_report", "main", "write_report"]

if __name__ == "__main__":
    sys.exit(main())
