"""Re-render the real-photo meme evaluation set from labels.tsv (python tests/data/memes/render.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from PIL import Image

from mmapp.config import ASSETS_DIR
from mmapp.data.memes import render_meme

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    for line in (HERE / "labels.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, photo, top, bottom, *_ = line.split("\t")
        with Image.open(ASSETS_DIR / "photos" / photo) as picture:
            render_meme(picture, top, bottom, size=384).save(HERE / name, quality=85, optimize=True)
