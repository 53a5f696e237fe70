"""Verifiers: how well each generated image follows its prompt.

Every verifier has `score(images, prompts) -> (N,) float32` (higher is better) for images (N, H, W, 3)
float in [0, 1] and N prompts. The VLM judge also exposes the yes/no logits that SANA's knockout
tournament compares (`search.knockout`) and a pairwise `compare`.

The Hugging Face models (transformers, torch) are optional dependencies, imported when a verifier is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from sana_jax.scaling import search

# SANA's question to its NVILA verifier, verbatim (NVlabs/Sana, tools/inference_scaling).
SANA_JUDGE_QUESTION = (
    "You are an AI assistant specializing in image analysis and ranking. Your task is to analyze and "
    "compare image based on how well they match the given prompt.\n"
    "The given prompt is:{prompt}. Please consider the prompt and the image to make a decision and "
    "response directly with 'yes' or 'no'.\n"
)
DTYPES = ("float32", "bfloat16")


class Verifier(Protocol):
    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """(N,) float32 agreement scores of images (N, H, W, 3) in [0, 1] with their prompts."""
        ...


def check_inputs(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Validates a batch of images (N, H, W, 3) float in [0, 1] against N prompts; returns the images."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images have shape {images.shape}: expected (N, H, W, 3)")
    in_range = images.size == 0 or (images.min() >= 0 and images.max() <= 1)
    if not np.issubdtype(images.dtype, np.floating) or not in_range:
        raise ValueError(f"images of dtype {images.dtype}: expected floats in [0, 1]")
    if isinstance(prompts, str) or len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images and prompts={prompts!r}: expected a list of "
                         f"{len(images)} prompts")
    return images


def to_pil(images: np.ndarray) -> list[Any]:
    """Images (N, H, W, 3) in [0, 1] as 8-bit PIL images (what a saved PNG holds)."""
    from PIL import Image

    return [Image.fromarray(np.round(image * 255).astype(np.uint8)) for image in images]


def _batches(count: int, batch_size: int, desc: str) -> Iterator[slice]:
    starts = range(0, count, batch_size)
    for start in tqdm(starts, desc=desc, disable=len(starts) <= 1):
        yield slice(start, start + batch_size)


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    return getattr(torch, dtype)


class VLMJudge:
    """A vision-language model asked SANA's yes/no question; reads its first answer token's logits.

    Works with `AutoModelForImageTextToText` checkpoints whose processor has a chat template
    (e.g. SmolVLM, Qwen2.5-VL, PaliGemma, LLaVA). The answer is "yes" when the yes-token's logit
    exceeds the no-token's; `score` is their difference, the log-odds of yes over no.
    """

    def __init__(self, name_or_path: str, *, question: str = SANA_JUDGE_QUESTION, yes: str = "yes",
                 no: str = "no", trust_remote_code: bool = False, dtype: str = "float32", device: str = "cpu",
                 batch_size: int = 8):
        """Loads the processor and model from a local folder or a hub id.

        Args:
          name_or_path: an image-text-to-text checkpoint.
          question: the question template; "{prompt}" is replaced by the image's prompt.
          yes, no: answer words; their first tokens (without special tokens) are read.
          trust_remote_code: allow the checkpoint's own modelling code (only for sources you trust).
          dtype: "float32" or "bfloat16" for the model.
          device: torch device.
          batch_size: images per forward pass.
        """
        if "{prompt}" not in question:
            raise ValueError(f"question={question!r}: expected a template containing '{{prompt}}'")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self._processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if getattr(self._processor, "chat_template", None) is None:
            raise ValueError(f"the processor of {name_or_path!r} has no chat template to pose the question")
        self._model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code).to(device).eval()
        self._device = device
        self._question = question
        self._batch_size = batch_size
        tokenizer = self._processor.tokenizer
        self.yes_id, self.no_id = (tokenizer.encode(word, add_special_tokens=False)[0] for word in (yes, no))
        if self.yes_id == self.no_id:
            raise ValueError(f"yes={yes!r} and no={no!r} start with the same token {self.yes_id}")

    def prompt_text(self, prompt: str) -> str:
        """The chat-formatted question for one image, ending where the answer starts."""
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": self._question.format(prompt=prompt)}]}]
        return self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def yes_no_logits(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The yes- and no-token logits (N,) float32 of the first answer token per image."""
        import torch

        images = check_inputs(images, prompts)
        yes, no = [], []
        for part in _batches(len(images), self._batch_size, "VLM judge"):
            texts = [self.prompt_text(p) for p in prompts[part]]
            # Right padding keeps every real token at the position it has in an unpadded forward.
            inputs = self._processor(text=texts, images=to_pil(images[part]), padding=True,
                                     padding_side="right", return_tensors="pt")
            inputs = inputs.to(device=self._device, dtype=self._model.dtype)  # Casts floats only.
            mask = inputs["attention_mask"]
            last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # The last real token of each row.
            positions, row_of = torch.unique(last, return_inverse=True)
            with torch.inference_mode():
                logits = self._model(**inputs, logits_to_keep=positions).logits
            answer = logits[torch.arange(len(texts)), row_of].float().cpu()
            yes.append(answer[:, self.yes_id].numpy())
            no.append(answer[:, self.no_id].numpy())
        return np.concatenate(yes), np.concatenate(no)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        yes, no = self.yes_no_logits(images, prompts)
        return yes - no

    def compare(self, a: np.ndarray, b: np.ndarray, prompt: str) -> int:
        """0 if image a (H, W, 3) beats image b under SANA's tournament rules, else 1."""
        yes, no = self.yes_no_logits(np.stack([a, b]), [prompt, prompt])
        return 0 if search.judge_winner(yes[0], no[0], yes[1], no[1]) else 1


class ClipScorer:
    """Image-text similarity of a CLIP or SigLIP model: its `logits_per_image` for each (image, prompt).

    CLIP's score is its scaled cosine similarity; SigLIP's adds its bias (a sigmoid of it is the match
    probability).
    """

    def __init__(self, name_or_path: str, *, dtype: str = "float32", device: str = "cpu",
                 batch_size: int = 32):
        from transformers import AutoModel, AutoProcessor

        self._processor = AutoProcessor.from_pretrained(name_or_path)
        self._model = AutoModel.from_pretrained(name_or_path, dtype=_torch_dtype(dtype)).to(device).eval()
        self._device = device
        self._batch_size = batch_size

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        import torch

        images = check_inputs(images, prompts)
        scores = []
        for part in _batches(len(images), self._batch_size, "CLIP scores"):
            # Fixed-length padding, as SigLIP was trained (CLIP pools at its end token either way).
            inputs = self._processor(text=list(prompts[part]), images=to_pil(images[part]),
                                     padding="max_length", truncation=True, return_tensors="pt")
            inputs = inputs.to(device=self._device, dtype=self._model.dtype)  # Casts floats only.
            with torch.inference_mode():
                logits = self._model(**inputs).logits_per_image
            scores.append(torch.diagonal(logits).float().cpu().numpy())
        return np.concatenate(scores)


class CheckerVerifier:
    """The shapes domain's programmatic checker as a verifier: 1.0 where the image satisfies its prompt."""

    def __init__(self, check: Callable[[str, np.ndarray], bool] | None = None):
        """check(prompt, image (H, W, 3) in [0, 1]) -> bool; by default `sana_jax.data.checker.check`."""
        self._check = check

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        images = check_inputs(images, prompts)
        if self._check is None:
            from sana_jax.data.checker import check

            self._check = check
        return np.array([float(self._check(p, image)) for p, image in zip(prompts, images, strict=True)],
                        dtype=np.float32)
