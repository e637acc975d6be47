"""Repeated images per training batch of a CSV with several caption rows per image, without and with
data.source.group_by_image (the training loader as slip.train builds it; each sample's image read back from its
caption).

    python benchmarks/caption_duplicates.py --images 1000 --rows 3 --batch 128 --epochs 5
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_caption_groups as generated  # noqa: E402  (the test's file writer and batch reader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=3, help="caption rows per image")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/caption_duplicates.md"))
    args = parser.parse_args()
    lines = ["# Repeated images per batch, CSV with several caption rows per image", "",
             f"`python {' '.join(sys.argv)}`: {args.images} generated images x {args.rows} caption rows, batches of "
             f"{args.batch}, {args.epochs} epochs of the training loader.", "",
             "| data.source.group_by_image | repeated images | batches | per batch | max | batches with any |",
             "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as root:
        path = generated.write_captions_csv(Path(root), images=args.images, rows_per_image=args.rows)
        generated.BATCH = args.batch
        for label, extra in (("false (one item per row)", {"group_by_image": False}), ("null (default)", {})):
            counts = generated.duplicates(generated.images_per_batch(generated.csv_node(path, **extra),
                                                                     epochs=args.epochs))
            lines.append(f"| {label} | {sum(counts)} | {len(counts)} | {sum(counts) / len(counts):.2f} | "
                         f"{max(counts)} | {sum(c > 0 for c in counts)} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
