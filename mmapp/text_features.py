"""What the meme head reads as "text": the text tower's embedding, optionally with sentiment features.

One function, :func:`meme_text_features`, turns meme texts into the head's text input; the bootstrap
build (``mmapp.pipeline.meme_examples``), the served predictor (``Predictor.analyze_meme``), the
retrain's label corrections (``retrain.job``) and ``mmapp import memes`` all call it, with the kind
the model version records in ``VersionMeta.meme_text_features``:

* ``""`` (:data:`RAW`) — the tower embedding alone (every version made before this existed);
* ``"vader-v1"`` (:data:`VADER_V1`) — the embedding plus :data:`N_EXTRA` sentiment-incongruence
  features: VADER scores of the whole text and of its top and bottom lines, the gap between them,
  strongest positive / negative word, and the text's similarity (in the tower's own space) to three
  topic prototypes — pleasant things, everyday hassles, death — crossed with the VADER compound:
  ironic praise is a positive score on a hassle topic, a grim joke a death topic, often with a
  cheerful set-up line.

No model state of its own: the prototypes are embedded with the caller's text encoder (cached).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Sequence

import torch

RAW = ""
VADER_V1 = "vader-v1"
KINDS = (RAW, VADER_V1)
N_EXTRA = 16
EXTRA_SCALE = 0.25  # the extras sit beside a unit-norm 384-d embedding; keep them on a comparable scale

PROTOTYPES = (
    "a fun, pleasant, happy thing that people enjoy and love",
    "a boring, annoying chore, hassle or everyday nuisance nobody enjoys",
    "death, dying, funerals, graves, coffins and disasters",
)

Embed = Callable[[list[str]], torch.Tensor]


def extra_dim(kind: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"unknown meme text features {kind!r}; valid: {list(KINDS)}")
    return N_EXTRA if kind == VADER_V1 else 0


@lru_cache(maxsize=1)
def _analyzer():
    from vader import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _lines(text: str) -> tuple[str, str]:
    parts = [p.strip() for p in text.split("\n") if p.strip()]
    if not parts:
        return "", ""
    if len(parts) == 1:
        return parts[0], ""
    return parts[0], " ".join(parts[1:])


def sentiment_features(text: str) -> list[float]:
    """10 lexical features of one text (lower-cased: memes are written in capitals)."""
    sia = _analyzer()
    text = text.lower()
    top, bottom = _lines(text)
    whole = sia.polarity_scores(text.replace("\n", " "))
    c_top = sia.polarity_scores(top)["compound"] if top else 0.0
    c_bottom = sia.polarity_scores(bottom)["compound"] if bottom else 0.0
    words = re.findall(r"[a-z']+", text)
    valences = [float(sia.lexicon[w]) for w in words if w in sia.lexicon]
    return [whole["compound"], whole["pos"], whole["neg"], c_top, c_bottom, abs(c_top - c_bottom),
            max(valences, default=0.0) / 4.0, min(valences, default=0.0) / 4.0,
            float("?" in text), float('"' in text or "!" in text)]


def meme_text_features(texts: Sequence[str], kind: str, embed: Embed, *,
                       raw: torch.Tensor | None = None) -> torch.Tensor:
    """(N, D_text + extra_dim(kind)) head input for ``texts``.

    ``embed`` maps a list of texts to the text tower's (N, D_text) embeddings; pass ``raw`` when the
    embeddings of ``texts`` are already at hand (they are not recomputed)."""
    extra = extra_dim(kind)
    texts = list(texts)
    if raw is None:
        raw = embed(texts)
    raw = raw.float()
    if len(raw) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(raw)} embeddings")
    if extra == 0:
        return raw
    protos = torch.nn.functional.normalize(embed(list(PROTOTYPES)).float(), dim=-1)  # (3, D)
    sims = torch.nn.functional.normalize(raw, dim=-1) @ protos.T  # (N, 3)
    lex = torch.tensor([sentiment_features(t) for t in texts], dtype=torch.float32).reshape(len(texts), 10)
    compound = lex[:, :1]
    topic = sims[:, :1] - sims[:, 1:2]  # pleasant minus hassle
    feats = torch.cat([lex, sims, compound * topic, compound * sims[:, 2:3], lex[:, 3:4] * lex[:, 4:5]], dim=1)
    assert feats.shape[1] == N_EXTRA
    return torch.cat([raw, EXTRA_SCALE * feats], dim=1)
