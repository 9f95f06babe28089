"""The shapes world: rendered pictures of coloured shapes in arrangements, with compositional captions.

Every scene is two objects, each a (size, colour, shape), in one relation ("above" or "to the left
of"), captioned "a small red circle above a large blue square". Two relations only, so that no two
captions describe the same picture ("A above B" is never also "B below A"). Pictures are drawn with
PIL, deterministically from the scene and a seed (position jitter), so tests can make the data and
train on it with no download.

* :func:`all_scenes` / :func:`split_scenes`: the world and a seeded split into named parts.
* :func:`render_scene`: one picture; :func:`write_pairs`: pictures + a pairs TSV (``mmapp.data.pairs``).
* :func:`write_bootstrap_dataset`: a part of the world as the bootstrap corpus layout
  (``{train,val,test}.tsv`` + ``items.jsonl``) that ``python -m mmapp build-bootstrap`` reads.
* :func:`train_tiny_clip`: a tiny open_clip model (small ViT + small text transformer) trained with
  the CLIP loss on scenes, saved as a ``local-dir:`` checkpoint for the clip profile.
No database and no UI here.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from itertools import permutations, product
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from mmapp.data.pairs import Pair, write_pairs_tsv

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SIZES = {"small": 0.16, "large": 0.28}  # radius as a fraction of the picture side
RELATIONS = ("above", "to the left of")


@dataclass(frozen=True)
class Thing:
    size: str
    colour: str
    shape: str

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    first: Thing
    relation: str
    second: Thing

    @property
    def caption(self) -> str:
        return f"a {self.first.phrase} {self.relation} a {self.second.phrase}"

    @property
    def key(self) -> str:
        return self.caption.replace(" ", "-")


def all_things() -> list[Thing]:
    return [Thing(s, c, h) for s, c, h in product(SIZES, COLOURS, SHAPES)]


def all_scenes() -> list[Scene]:
    """Every scene of the world (24 things, ordered pairs of different things, 2 relations: 1104)."""
    return [Scene(a, rel, b) for a, b in permutations(all_things(), 2) for rel in RELATIONS]


def split_scenes(fractions: dict[str, float], *, seed: int = 0) -> dict[str, list[Scene]]:
    """The world shuffled with ``seed`` and cut into named parts of these fractions (summing to <= 1)."""
    if any(f <= 0 for f in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
        raise ValueError(f"fractions must be positive and sum to at most 1, got {fractions}")
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    out, start = {}, 0
    for name, frac in fractions.items():
        n = int(round(frac * len(scenes)))
        out[name] = scenes[start:start + n]
        start += n
    return out


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, cx: float, cy: float, side: int) -> None:
    r = SIZES[thing.size] * side / 2
    fill = COLOURS[thing.colour]
    if thing.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif thing.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        h = r * math.sqrt(3) / 2
        draw.polygon([(cx, cy - r), (cx - r, cy + h), (cx + r, cy + h)], fill=fill)


def render_scene(scene: Scene, *, size: int = 64, variant: int = 0) -> Image.Image:
    """The scene on a light background; ``variant`` jitters the positions (same caption, new picture)."""
    rng = random.Random(f"{scene.key}/{variant}")
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    jitter = lambda: rng.uniform(-0.08, 0.08) * size  # noqa: E731
    near, far = 0.27 * size, 0.73 * size
    mid = size / 2
    if scene.relation == "above":
        spots = ((mid + jitter(), near + jitter() / 2), (mid + jitter(), far + jitter() / 2))
    else:
        spots = ((near + jitter() / 2, mid + jitter()), (far + jitter() / 2, mid + jitter()))
    for thing, (x, y) in zip((scene.first, scene.second), spots):
        _draw(draw, thing, x, y, size)
    return img


def write_pairs(scenes: Sequence[Scene], directory: Path, *, size: int = 64, variants: Sequence[int] = (0,),
                name: str = "pairs.tsv") -> Path:
    """Render the scenes under ``directory/images`` (skipping pictures already there) and write a TSV:
    one pair per scene and variant (several pictures of one caption when ``variants`` has several)."""
    if not variants:
        raise ValueError("write_pairs needs at least one picture variant")
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    pairs = []
    for variant in variants:
        for scene in scenes:
            path = directory / "images" / f"{scene.key}-v{variant}-{size}.png"
            if not path.is_file():
                tmp = path.with_suffix(".tmp.png")
                render_scene(scene, size=size, variant=variant).save(tmp)
                os.replace(tmp, path)
            pairs.append(Pair(image_path=path, caption=scene.caption, group=scene.key, source="shapes"))
    out = directory / name
    write_pairs_tsv(pairs, out)
    return out


def write_bootstrap_dataset(splits: dict[str, Sequence[Scene]], directory: Path, *, size: int = 64,
                            train_variants: int = 1) -> dict[str, Path]:
    """``splits`` ('train', 'val', 'test') as the bootstrap corpus layout read by ``build-bootstrap``:
    ``{split}.tsv`` and ``items.jsonl`` (the meme set is rendered from the items). The train split
    has ``train_variants`` pictures per caption; val and test one (so every caption names one picture)."""
    missing = {"train", "val", "test"} - set(splits)
    if missing:
        raise ValueError(f"the bootstrap corpus needs train, val and test splits; missing {sorted(missing)}")
    directory = Path(directory)
    paths, items = {}, []
    for split in ("train", "val", "test"):
        variants = range(train_variants) if split == "train" else (0,)
        paths[split] = write_pairs(splits[split], directory, size=size, variants=tuple(variants), name=f"{split}.tsv")
        for scene in splits[split]:
            items.append({"item_id": scene.key, "png_path": str(directory / "images" / f"{scene.key}-v0-{size}.png"),
                          # the meme set needs both image valences (mmapp.data.memes.image_valence):
                          # toys are cheerful; a red first thing is a "warning" sign, grim
                          "category": "recreation/toys", "title": scene.caption,
                          "keywords": [scene.first.colour, scene.first.shape, scene.second.colour, scene.second.shape,
                                       *(["warning"] if scene.first.colour == "red" else [])],
                          "caption": scene.caption, "split": split})
    tmp = directory / ".items.jsonl.tmp"
    tmp.write_text("".join(json.dumps(i) + "\n" for i in items))
    os.replace(tmp, directory / "items.jsonl")
    paths["items"] = directory / "items.jsonl"
    return paths


# ---- a tiny open_clip model --------------------------------------------------------------------

def tiny_clip_config(*, image_size: int = 64, embed_dim: int = 64, width: int = 64, layers: int = 2,
                     patch_size: int = 16) -> dict:
    """An open_clip model config (``model_cfg``): a small ViT and a small text transformer."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size,
                       "head_width": 32},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": width, "heads": 4, "layers": layers},
    }


@dataclass(frozen=True)
class TinyClipRecipe:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    variants: int = 2  # jittered pictures per scene
    seed: int = 0


def train_tiny_clip(scenes: Sequence[Scene], directory: Path, *, recipe: TinyClipRecipe = TinyClipRecipe(),
                    model_cfg: dict | None = None, threads: int | None = None) -> Path:
    """Train a tiny open_clip model with the CLIP loss on ``scenes`` and save it as ``local-dir:directory``."""
    import open_clip
    import torch

    from mmapp.encoders.openclip import save_local_dir

    if threads:
        torch.set_num_threads(threads)
    model_cfg = model_cfg or tiny_clip_config()
    torch.manual_seed(recipe.seed)
    model = open_clip.CLIP(**model_cfg)
    tokenizer = open_clip.tokenize
    size = model_cfg["vision_cfg"]["image_size"]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]

    def pixels(img: Image.Image) -> torch.Tensor:
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
        return (x.permute(2, 0, 1).float() / 255 - mean) / std

    images = torch.stack([pixels(render_scene(s, size=size, variant=v)) for v in range(recipe.variants)
                          for s in scenes])  # (V*N, 3, H, W)
    tokens = tokenizer([s.caption for s in scenes], context_length=model_cfg["text_cfg"]["context_length"])
    n = len(scenes)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.1)
    steps = recipe.epochs * math.ceil(n / recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(recipe.seed)
    loss_fn = open_clip.ClipLoss()
    model.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(n, generator=gen)  # each scene once per epoch: no caption twice in a batch
        for start in range(0, n, recipe.batch_size):
            idx = perm[start:start + recipe.batch_size]
            if len(idx) < 2:
                continue
            variant = torch.randint(recipe.variants, (len(idx),), generator=gen)
            img_f, txt_f, scale = model(images[variant * n + idx], tokens[idx])
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return save_local_dir(model, model_cfg, Path(directory),
                          preprocess_cfg={"size": size, "mean": mean.flatten().tolist(), "std": std.flatten().tolist(),
                                          "interpolation": "bicubic", "resize_mode": "shortest"})


# ---- a tiny generative captioner (BLIP) ----------------------------------------------------------

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def shapes_vocabulary() -> list[str]:
    """Every word of every caption of the world (a word-level tokenizer needs nothing else)."""
    words = {"a", *SIZES, *COLOURS, *SHAPES}
    for relation in RELATIONS:
        words.update(relation.split())
    return sorted(words)


def scenes_with_colour(scenes: Sequence[Scene], colour: str, *, present: bool = True) -> list[Scene]:
    """The scenes in which some thing has ``colour`` (``present=False``: the scenes with no such thing)."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; the world has {sorted(COLOURS)}")
    return [s for s in scenes if (colour in (s.first.colour, s.second.colour)) == present]


@dataclass(frozen=True)
class TinyCaptionerRecipe:
    epochs: int = 60  # 20 gave greedy captions that ignored the picture; 60: ~0.1 exact match on unseen scenes
    batch_size: int = 32
    lr: float = 2e-3
    variants: int = 2  # jittered pictures per scene
    image_size: int = 64
    width: int = 64
    layers: int = 2
    seed: int = 0


def train_tiny_captioner(scenes: Sequence[Scene], directory: Path, *,
                         recipe: TinyCaptionerRecipe = TinyCaptionerRecipe(), threads: int | None = None) -> Path:
    """Train a tiny BLIP (a 2-layer ViT and a 2-layer text decoder, width 64) on ``scenes`` and save it with
    its processor (``BlipImageProcessor`` + a word-level ``BertTokenizerFast`` over :func:`shapes_vocabulary`,
    so nothing is downloaded) as a folder ``model.captioner_path`` can name."""
    import torch
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    if threads:
        torch.set_num_threads(threads)
    if not scenes:
        raise ValueError("train_tiny_captioner needs scenes")
    tokens = [*SPECIAL_TOKENS, *shapes_vocabulary()]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    w, heads = recipe.width, 4
    config = BlipConfig(
        vision_config={"hidden_size": w, "intermediate_size": 2 * w, "num_hidden_layers": recipe.layers,
                       "num_attention_heads": heads, "image_size": recipe.image_size, "patch_size": 16},
        text_config={"hidden_size": w, "intermediate_size": 2 * w, "num_hidden_layers": recipe.layers,
                     "num_attention_heads": heads, "vocab_size": tokenizer.vocab_size, "encoder_hidden_size": w,
                     "max_position_embeddings": 32, "bos_token_id": tokenizer.cls_token_id,
                     "sep_token_id": tokenizer.sep_token_id, "eos_token_id": tokenizer.sep_token_id,
                     "pad_token_id": tokenizer.pad_token_id, "label_smoothing": 0.0})
    torch.manual_seed(recipe.seed)
    model = BlipForConditionalGeneration(config)
    size = recipe.image_size
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                              tokenizer=tokenizer)
    pictures = [render_scene(s, size=size, variant=v) for v in range(recipe.variants) for s in scenes]
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]  # (V*N, 3, H, W)
    text = tokenizer([s.caption for s in scenes], padding=True, return_tensors="pt")
    ids, mask = text["input_ids"], text["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    n = len(scenes)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    steps = recipe.epochs * math.ceil(n / recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, recipe.batch_size):
            idx = perm[start:start + recipe.batch_size]
            variant = torch.randint(recipe.variants, (len(idx),), generator=gen)
            loss = model(pixel_values=pixels[variant * n + idx], input_ids=ids[idx], attention_mask=mask[idx],
                         labels=labels[idx]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
