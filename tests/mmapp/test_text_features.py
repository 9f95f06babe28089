"""mmapp.text_features: the meme head's text input (tower embedding + sentiment-incongruence features)."""
from __future__ import annotations

import pytest
import torch

from mmapp.model_store import VersionMeta
from mmapp.text_features import KINDS, N_EXTRA, RAW, VADER_V1, extra_dim, meme_text_features, sentiment_features

D = 8


def fake_embed(texts):  # deterministic stand-in for the text tower: unit vectors from a hash of the text
    g = [torch.Generator().manual_seed(abs(hash(t)) % 2**31) for t in texts]
    return torch.nn.functional.normalize(torch.stack([torch.randn(D, generator=x) for x in g]), dim=-1)


def test_raw_is_the_embedding_unchanged_and_old_metas_read_as_raw():
    texts = ["I JUST LOVE\nDOING MY TAXES", "BEST DAY EVER"]
    raw = fake_embed(texts)
    assert torch.equal(meme_text_features(texts, RAW, fake_embed), raw)
    assert torch.equal(meme_text_features(texts, RAW, None, raw=raw), raw)
    assert VersionMeta.from_dict({"labels": ["a"]}).meme_text_features == RAW  # versions made before it
    assert VersionMeta.from_dict(VersionMeta(meme_text_features=VADER_V1).to_dict()).meme_text_features == VADER_V1


def test_vader_features_append_a_fixed_block_and_reuse_given_embeddings():
    texts = ["I JUST LOVE\nDOING MY TAXES", "SAVING UP\nFOR MY OWN FUNERAL", ""]
    raw = fake_embed(texts)
    out = meme_text_features(texts, VADER_V1, fake_embed, raw=raw)
    assert out.shape == (3, D + N_EXTRA) and extra_dim(VADER_V1) == N_EXTRA and extra_dim(RAW) == 0
    assert torch.equal(out[:, :D], raw)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, meme_text_features(texts, VADER_V1, fake_embed))  # same with or without raw=
    with pytest.raises(ValueError, match="unknown"):
        extra_dim("bert-v9")
    assert set(KINDS) == {RAW, VADER_V1}


def test_sentiment_features_see_the_polarity_of_each_line():
    ironic = sentiment_features("I JUST LOVE\nDOING MY TAXES")
    grim = sentiment_features("SAVING UP\nFOR MY OWN FUNERAL")
    assert ironic[0] > 0.3 and grim[0] < -0.1  # whole-text compound; upper case is read like lower case
    assert ironic[3] > 0.3 and ironic[4] == pytest.approx(sentiment_features("doing my taxes")[0])
    assert grim[7] < 0 and ironic[6] > 0  # strongest negative / positive word
    assert sentiment_features("") == [0.0] * 10
