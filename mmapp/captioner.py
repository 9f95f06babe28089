"""A generative captioner from Hugging Face ``transformers`` (BLIP, GIT, ViT+GPT-2 …), loaded from a local folder.

``model.captioner`` = "hf" turns it on (the ``blip`` profile); ``model.captioner_path`` is a folder
written by ``save_pretrained`` (the model and its processor), e.g. one downloaded on a machine with
internet: ``huggingface-cli download Salesforce/blip-image-captioning-base --local-dir PATH``.
Offline with no such folder, loading fails at once with a message saying what to download and where.
Decoding (greedy or beam search, new-token budget) comes from config; fp16/bf16 from the placement.
The caption's confidence is the geometric mean of its tokens' probabilities. No database, no UI.

A retrain may fine-tune the text decoder (``mmapp.captioner_tune``); a model version then stores only
the decoder's weights (a *delta*) with the base model's identity, and :meth:`GenerativeCaptioner.set_delta`
puts them on the loaded base (``None`` restores the base's own decoder).
"""
from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from mmapp.device import Placement

DOWNLOAD_HINT = ("download a captioning model on a machine with internet, e.g. `huggingface-cli download "
                 "Salesforce/blip-image-captioning-base --local-dir /path/to/blip`, copy the folder here and set "
                 "model.captioner_path (env MMAPP__MODEL__CAPTIONER_PATH) to it")


HUB_PREFIX = "hub:"  # model.captioner_path "hub:Salesforce/blip-image-captioning-base": from the Hugging Face hub


def captioner_folder(source: str | Path) -> Path:
    """The local folder of ``model.captioner_path``: the path itself, or for ``hub:<repo id>`` the hub
    snapshot (downloaded once online, from the local Hugging Face cache after that; with
    ``HF_HUB_OFFLINE=1`` and nothing cached this fails at once with what to do)."""
    text = str(source)
    if not text.startswith(HUB_PREFIX):
        return Path(text)
    repo_id = text[len(HUB_PREFIX):].strip()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # offline, unknown repo, no network: all mean "not here"
        raise FileNotFoundError(f"could not get the captioner {repo_id!r} from the Hugging Face hub "
                                f"({type(exc).__name__}: {str(exc)[:200]}); without internet: {DOWNLOAD_HINT}") from exc


@dataclass(frozen=True)
class GeneratedCaption:
    text: str
    confidence: float  # geometric mean of the generated tokens' probabilities, in (0, 1]


class GenerativeCaptioner:
    def __init__(self, path: str | Path, *, placement: Placement, max_new_tokens: int = 30, num_beams: int = 1):
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError(f"captioner decoding needs max_new_tokens >= 1 and num_beams >= 1, "
                             f"got {max_new_tokens} and {num_beams}")
        if not str(path):
            raise FileNotFoundError(f"model.captioner_path is empty: {DOWNLOAD_HINT}")
        path = captioner_folder(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no generative captioner at {str(path)!r} (a folder with config.json, the weights "
                                    f"and the processor files): {DOWNLOAD_HINT}")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise RuntimeError(f"could not load the captioner in {path}: {exc}. {DOWNLOAD_HINT}") from exc
        self.placement = placement
        self.model = model.to(placement.device, placement.dtype).eval()
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.path = path
        self._lock = threading.Lock()  # set_delta and generate never interleave
        self._base_decoder: dict[str, torch.Tensor] | None = None  # the base's decoder, kept once a delta is set
        self.delta_name: str | None = None  # the model version whose decoder delta is applied (None: the base)

    @property
    def identity(self) -> str:
        """The base model's identity: its class and the sha256 of its folder (what a delta is tied to)."""
        if not hasattr(self, "_identity"):
            from mmapp.encoders.base import tree_sha256

            self._identity = f"captioner-{type(self.model).__name__}@{tree_sha256(self.path)[:16]}"
        return self._identity

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """The fine-tunable decoder's parameters (what a version's delta holds), on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in decoder_parameters(self.model).items()}

    def set_delta(self, state: dict[str, torch.Tensor] | None, *, name: str | None = None) -> None:
        """Serve the base with ``state`` on it: the whole text decoder, and (when a retrain also tuned the
        vision encoder, ``retrain.captioner_train_vision``) vision parameters. ``None``: the base again."""
        decoder = decoder_parameters(self.model)
        params = dict(self.model.named_parameters())
        if state is not None:
            missing, unknown = set(decoder) - set(state), set(state) - set(params)
            if missing or unknown:
                raise ValueError(f"captioner delta does not fit {self.identity}: missing {sorted(missing)[:3]}, "
                                 f"unknown {sorted(unknown)[:3]}")
        with self._lock:
            base = self._base_decoder if self._base_decoder is not None else {}
            touched = set(state or {}) | set(base)
            for key in touched - set(base):  # remember the base's own values before the first change
                base[key] = params[key].detach().cpu().clone()
            self._base_decoder = base or None
            with torch.no_grad():
                for key in touched:
                    value = state[key] if state is not None and key in state else base[key]
                    params[key].copy_(value.to(params[key].device, params[key].dtype))
            self.delta_name = name if state is not None else None

    def with_delta(self, state: dict[str, torch.Tensor] | None) -> "GenerativeCaptioner":
        """A copy (own model weights, shared processor) serving ``state`` as its decoder."""
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        other._lock, other._base_decoder = threading.Lock(), None
        if state is not None:
            other.set_delta(state)
        return other

    def generate(self, images: Sequence[Image.Image]) -> list[GeneratedCaption]:
        with self._lock:
            return self._generate(images)

    def _generate(self, images: Sequence[Image.Image]) -> list[GeneratedCaption]:
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.placement.device, self.placement.dtype)
        with torch.inference_mode():
            out = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens,
                                      num_beams=self.num_beams, do_sample=False, output_scores=True,
                                      return_dict_in_generate=True)
            scores = self.model.compute_transition_scores(out.sequences, out.scores,
                                                          getattr(out, "beam_indices", None), normalize_logits=True)
        texts = self.processor.batch_decode(out.sequences, skip_special_tokens=True)
        result = []
        for text, logp in zip(texts, scores.float().cpu()):
            logp = logp[torch.isfinite(logp)]
            mean = float(logp.mean()) if len(logp) else 0.0
            result.append(GeneratedCaption(" ".join(text.split()), math.exp(mean)))
        return result


def decoder_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The text decoder's parameters by full name: what a retrain fine-tunes (the vision side stays frozen).
    BLIP-style models (``text_decoder``) and ``VisionEncoderDecoderModel`` (``decoder``) are supported."""
    for prefix in ("text_decoder", "decoder"):
        part = getattr(model, prefix, None)
        if isinstance(part, torch.nn.Module):
            return {f"{prefix}.{k}": v for k, v in part.named_parameters()}
    raise NotImplementedError(f"fine-tuning {type(model).__name__} is not supported: it has no text_decoder "
                              "(BLIP) or decoder (VisionEncoderDecoderModel) part")
