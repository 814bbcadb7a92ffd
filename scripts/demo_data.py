"""The demo's images: the SUIM sample when it is beside the repository, else scikit-image's photos.

    python scripts/demo_data.py runs/data/demo            # writes OUT/train/images (+ true_masks)
    python scripts/demo_data.py runs/data/demo --suim /path/to/SUIM

With SUIM (this project's machines, or your own download) the demo is scored against the 6
coarse classes. Anywhere else it uses the photographs bundled in scikit-image (the ``demo``
extra: no download), which have no labels, so the run has masks and pictures but no metrics.
Either way the folder is in the DatUS layout that ``configs/demo.yaml`` reads (split ``train``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datus.commands.cli import main as datus
from datus.core.errors import ConfigurationError

REPO = Path(__file__).resolve().parents[1]
SUIM_SAMPLE = REPO.parent / "shared" / "data" / "suim-sample"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "hubble_deep_field",
          "immunohistochemistry", "retina", "clock", "cell")  # fmt: skip
"""scikit-image photographs shipped inside its wheel (no network needed)."""


def write_photos(out_dir: Path) -> int:
    """scikit-image's bundled photographs as PNGs in OUT/train/images; returns how many."""
    try:
        from PIL import Image
        from skimage import data
    except ImportError as error:
        raise ConfigurationError("the demo photos need the 'demo' extra: pip install -e '.[demo]'") from error
    images = out_dir / "train" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).convert("RGB").save(images / f"{name}.png")
    return len(PHOTOS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--suim", type=Path, default=SUIM_SAMPLE, help="SUIM in its published layout (holds train_val/)")
    options = parser.parse_args(argv)
    if options.suim.is_dir():
        datus(["prepare", "suim", str(options.suim), str(options.out_dir), "--classes", "coarse", "--overwrite"])
    elif (options.out_dir / "train" / "images").is_dir():
        print(f"demo images already in {options.out_dir}")
    else:
        count = write_photos(options.out_dir)
        print(f"no SUIM sample at {options.suim}: the demo uses {count} photographs from scikit-image (no labels)")


if __name__ == "__main__":
    try:
        main()
    except ConfigurationError as error:
        print(f"datus: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
