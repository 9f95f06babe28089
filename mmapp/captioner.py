"""A generative captioner from Hugging Face ``transformers`` (BLIP, GIT, ViT+GPT-2 …), loaded from a local folder.

``model.captioner`` = "hf" turns it on (the ``blip`` profile); ``model.captioner_path`` is a folder
written by ``save_pretrained`` (the model and its processor), e.g. one downloaded on a machine with
internet: ``huggingface-cli download Salesforce/blip-image-captioning-base --local-dir PATH``.
Offline with no such folder, loading fails at once with a message saying what to download and where.
Decoding (greedy or beam search, new-token budget) comes from config; fp16/bf16 from the placement.
The caption's confidence is the geometric mean of its tokens' probabilities. No database, no UI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from mmapp.device import Placement

DOWNLOAD_HINT = ("download a captioning model on a machine with internet, e.g. `huggingface-cli download "
                 "Salesforce/blip-image-captioning-base --local-dir /path/to/blip`, copy the folder here and set "
                 "model.captioner_path (env MMAPP__MODEL__CAPTIONER_PATH) to it")


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
        path = Path(path)
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

    @property
    def identity(self) -> str:
        from mmapp.encoders.base import tree_sha256

        return f"captioner-{type(self.model).__name__}@{tree_sha256(self.path)[:16]}"

    def generate(self, images: Sequence[Image.Image]) -> list[GeneratedCaption]:
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
