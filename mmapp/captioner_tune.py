"""Fine-tuning a generative captioner's text decoder on (image, caption) pairs, and scoring captions with it.

What a retrain does with a BLIP-style captioner (``retrain.captioner_stage``): the vision encoder stays
frozen (its outputs are computed once per picture, without gradients), the text decoder is trained
with teacher forcing on users' pairs mixed with replayed pairs (about half of every batch), and the
result is the decoder's new weights (a delta for :meth:`GenerativeCaptioner.set_delta`).

:func:`caption_agreement` is the cleaning score: each caption's mean token log-likelihood under a model,
standardised against the same picture's likelihood of other captions (about 0 for a caption that fits
the picture no better than a random one; several units for a fitting one).
No database, no UI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from mmapp.captioner import GenerativeCaptioner, decoder_parameters


@dataclass(frozen=True)
class DecoderRecipe:
    epochs: int = 15  # passes over the user pairs ...
    min_steps: int = 60  # ... but at least this many optimizer steps
    lr: float = 1e-3
    batch_size: int = 32
    user_share: float = 0.5  # share of each batch from users' pairs (the rest replayed)
    weight_decay: float = 0.01
    train_vision: bool = False  # also tune the vision encoder (its weights then join the delta)
    seed: int = 0


def _blip_parts(model: torch.nn.Module):
    if not (hasattr(model, "vision_model") and hasattr(model, "text_decoder")):
        raise NotImplementedError(f"fine-tuning supports BLIP-style captioners (vision_model + text_decoder), "
                                  f"not {type(model).__name__}")
    return model.vision_model, model.text_decoder


def _encode_images(captioner: GenerativeCaptioner, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
    vision, _ = _blip_parts(captioner.model)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = [im.convert("RGB") for im in images[start:start + batch_size]]
            pixels = captioner.processor(images=chunk, return_tensors="pt")["pixel_values"]
            out.append(vision(pixel_values=pixels.to(captioner.placement.device, captioner.placement.dtype))[0].float())
    return torch.cat(out).clone()  # (N, P, D), out of inference mode


def _tokens(captioner: GenerativeCaptioner, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tok = captioner.processor.tokenizer(list(captions), padding=True, return_tensors="pt")
    ids = tok["input_ids"].clone()
    ids[:, 0] = captioner.model.config.text_config.bos_token_id  # generation starts from bos: train the same way
    return ids.to(captioner.placement.device), tok["attention_mask"].to(captioner.placement.device)


def _token_logprobs(decoder, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean log-probability of each caption's tokens after bos, padding excluded."""
    logits = decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=embeds).logits  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    m = mask[:, 1:].float()
    return (logp * m).sum(1) / m.sum(1).clamp_min(1)


def fine_tune_decoder(captioner: GenerativeCaptioner, user: Sequence[tuple[Image.Image, str]],
                      replay: Sequence[tuple[Image.Image, str]], *, recipe: DecoderRecipe = DecoderRecipe(),
                      start: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Train a copy of the captioner's text decoder (from ``start``, else the captioner's current decoder)
    on ``user`` pairs with ``replay`` pairs mixed in; returns (decoder state, training info)."""
    if not user:
        raise ValueError("fine_tune_decoder needs at least one user pair")
    with torch.random.fork_rng(devices=[]):  # seeded (dropout), without moving the caller's random state
        torch.manual_seed(recipe.seed)
        return _fine_tune(captioner, user, replay, recipe, start)


def _fine_tune(captioner: GenerativeCaptioner, user, replay, recipe: DecoderRecipe,
               start: dict[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], dict]:
    work = captioner.with_delta(start)
    model = work.model.train()
    vision, decoder = _blip_parts(model)
    for p in model.parameters():
        p.requires_grad_(False)
    params = decoder_parameters(model)
    if recipe.train_vision:
        params.update({f"vision_model.{k}": v for k, v in vision.named_parameters()})
    for p in params.values():
        p.requires_grad_(True)
    if not recipe.train_vision:
        vision.eval()
    device = captioner.placement.device
    images = [im for im, _ in user] + [im for im, _ in replay]
    captions = [c for _, c in user] + [c for _, c in replay]
    if recipe.train_vision:  # pictures through the encoder at every step, with gradients
        pixels = work.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device, captioner.placement.dtype)
        embed = lambda idx: vision(pixel_values=pixels[idx])[0]  # noqa: E731
    else:  # frozen: each picture's encoding once
        embeds = _encode_images(work, images).to(device)
        embed = lambda idx: embeds[idx]  # noqa: E731
    ids, mask = _tokens(work, captions)
    n_user, n_replay = len(user), len(replay)
    per_batch_user = max(1, round(recipe.batch_size * (recipe.user_share if n_replay else 1.0)))
    per_batch_replay = recipe.batch_size - per_batch_user if n_replay else 0
    steps_per_epoch = max(1, math.ceil(n_user / per_batch_user))
    total = max(recipe.epochs * steps_per_epoch, recipe.min_steps)  # a few dozen pairs still get enough steps
    opt = torch.optim.AdamW(list(params.values()), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(recipe.seed)
    losses, order, at = [], torch.randperm(n_user, generator=gen), 0
    for step in range(total):
        if at >= n_user:  # each user pair once per pass, in a new order every pass
            order, at = torch.randperm(n_user, generator=gen), 0
        idx = order[at:at + per_batch_user]
        at += per_batch_user
        if per_batch_replay:
            idx = torch.cat([idx, n_user + torch.randint(n_replay, (per_batch_replay,), generator=gen)])
        b_ids, b_mask = ids[idx], mask[idx]
        labels = b_ids.masked_fill(b_mask == 0, -100)
        loss = decoder(input_ids=b_ids, attention_mask=b_mask, encoder_hidden_states=embed(idx),
                       labels=labels, reduction="mean").loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    state = {k: v.detach().cpu().clone() for k, v in params.items()}
    return state, {"epochs": recipe.epochs, "lr": recipe.lr, "user_pairs": n_user, "replay_pairs": n_replay,
                   "steps": total, "loss_first": round(float(np.mean(losses[:steps_per_epoch])), 4),
                   "loss_last": round(float(np.mean(losses[-steps_per_epoch:])), 4),
                   "trained": "text decoder + vision encoder" if recipe.train_vision
                   else "text decoder (vision encoder frozen)",
                   "trainable_params": int(sum(p.numel() for p in params.values()))}


def caption_agreement(captioner: GenerativeCaptioner, images: Sequence[Image.Image], captions: Sequence[str],
                      bank: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """(N,) each caption's mean token log-likelihood for its picture, standardised against the same
    picture's likelihoods of the ``bank`` captions: (own - mean(bank)) / std(bank)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} pictures but {len(captions)} captions")
    if len(bank) < 2:
        raise ValueError("caption_agreement needs a bank of at least 2 captions")
    if not images:
        return np.zeros(0)
    _, decoder = _blip_parts(captioner.model)
    embeds = _encode_images(captioner, images)
    own_ids, own_mask = _tokens(captioner, captions)
    bank_ids, bank_mask = _tokens(captioner, bank)
    out = np.zeros(len(images))
    with torch.inference_mode():
        own = torch.cat([_token_logprobs(decoder, embeds[s:s + batch_size], own_ids[s:s + batch_size],
                                         own_mask[s:s + batch_size]) for s in range(0, len(images), batch_size)])
        per_image = max(1, batch_size // len(bank))
        for s in range(0, len(images), per_image):
            e = embeds[s:s + per_image]
            k = e.shape[0]
            ref = _token_logprobs(decoder, e.repeat_interleave(len(bank), 0), bank_ids.repeat(k, 1),
                                  bank_mask.repeat(k, 1)).view(k, len(bank))
            out[s:s + k] = ((own[s:s + k] - ref.mean(1)) / ref.std(1).clamp_min(1e-6)).cpu().numpy()
    return out
