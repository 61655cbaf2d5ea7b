"""What the ``quantize``/``inspect``/``export`` commands are given: models, checkpoints, data.

Models are built with random weights and never downloaded: ``torchvision:NAME``
(``weights=None``), ``timm:NAME`` (``pretrained=False``) or a Hugging Face folder
(``transformers.AutoModel.from_pretrained``).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from quantwire.errors import QuantwireError

__all__ = [
    "CliError",
    "build_model",
    "is_text_model",
    "load_calibration",
    "load_float_weights",
    "load_text_calibration",
    "parse_shape",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class CliError(QuantwireError, ValueError):
    """A command-line argument that can not be used (unknown model, unreadable file)."""


def build_model(spec: str) -> nn.Module:
    """The float model named by ``spec`` (see the module docstring), in eval mode."""
    source, sep, name = spec.partition(":")
    if sep and source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None).eval()
        except ValueError:
            raise CliError(f"unknown torchvision model {name!r}") from None
    if sep and source == "timm":
        import timm

        if not timm.is_model(name):
            raise CliError(f"unknown timm model {name!r}")
        return timm.create_model(name, pretrained=False).eval()
    if Path(spec).is_dir():
        return _pretrained_model(spec)
    raise CliError(f"unknown model {spec!r}: use torchvision:NAME, timm:NAME or a Hugging Face model folder")


def _pretrained_model(folder: str) -> nn.Module:
    """The Hugging Face model saved in ``folder``, in eval mode. Its weights are read without
    unpickling code and no Python file of the folder runs (stated here, not left to
    transformers' defaults); a checkpoint that would need either is a :class:`CliError`."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the command shows its own progress
    try:
        model = transformers.AutoModel.from_pretrained(folder, weights_only=True, trust_remote_code=False)
    except pickle.UnpicklingError as error:
        raise CliError(f"the weights in {folder!r} can not be read safely: {_first_line(error)}") from error
    return model.eval()


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type name when it has none): library errors
    such as the unpickler's run to a page of advice."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _existing_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or a :class:`CliError` when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"{what} {str(path)!r} does not exist")
    return path


def load_float_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a float ``state_dict`` (``.safetensors`` or a ``torch.save`` file, read with
    ``weights_only=True``) into ``model``; returns ``model``."""
    path = _existing_file(path, "checkpoint")
    state = _read_tensors(path, "checkpoint")
    try:
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CliError(f"{path} does not fit {type(model).__name__}: {_first_line(error)}") from None
    return model


def _read_tensors(path: Path, what: str) -> object:
    """What the tensor file ``path`` holds, read without running any of its code: safetensors,
    ``.npy`` without pickles, or ``torch.load(weights_only=True)``. A file that can not be read
    so (a pickle that would import or call anything, a damaged file) is a :class:`CliError`."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # numpy, safetensors and the unpickler each raise their own types
        raise CliError(f"{what} {str(path)!r} can not be read safely: {_first_line(error)}") from error


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` as a tuple of positive ints."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise CliError(f"bad shape {text!r}: expected comma-separated integers such as 1,3,224,224") from None
    if not shape or min(shape) < 1:
        raise CliError(f"bad shape {text!r}: every dimension must be positive")
    return shape


def _image_folder(folder: Path, image_size: int) -> Tensor:
    """Every image in ``folder`` as RGB, resized to ``image_size`` square, in ``[0, 1]``."""
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CliError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    arrays = []
    for file in files:
        with Image.open(file) as image:
            resized = image.convert("RGB").resize((image_size, image_size))
            arrays.append(np.asarray(resized, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _tensor_file(path: Path) -> Tensor:
    """A ``.npy`` or ``.pt`` tensor file as a float tensor."""
    loaded = _read_tensors(path, "calibration data")
    if not isinstance(loaded, Tensor):
        raise CliError(f"{path} holds a {type(loaded).__name__}, not a tensor")
    return loaded.float()


def load_calibration(source: str, image_size: int, count: int = 8, seed: int = 0) -> Tensor:
    """Calibration inputs ``(N, C, H, W)`` from an image folder, a ``.npy``/``.pt`` file or
    ``synthetic`` (``count`` random images, with a warning on stderr)."""
    if source == "synthetic":
        print(
            "quantwire: warning: calibrating on synthetic random images; scales will not suit real data",
            file=sys.stderr,
        )
        return torch.rand(count, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    path = Path(source)
    if path.is_dir():
        return _image_folder(path, image_size)
    path = _existing_file(path, "calibration data")
    if path.suffix.lower() not in (".npy", ".pt", ".pth"):
        raise CliError(f"calibration data {source!r}: expected an image folder, a .npy/.pt file or 'synthetic'")
    return _tensor_file(path)


def is_text_model(spec: str) -> bool:
    """Whether ``spec`` is a Hugging Face folder with a tokenizer (its inputs are token ids)."""
    folder = Path(spec)
    return folder.is_dir() and any(
        (folder / name).exists() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    )


def load_text_calibration(
    folder: str, source: str, batch_size: int, count: int = 8, seed: int = 0
) -> list[dict[str, Tensor]]:
    """Calibration batches (tokenizer outputs) for a Hugging Face text model: a ``.txt`` file,
    one sentence per line, or ``synthetic`` (``count`` random token sequences, with a warning)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if source == "synthetic":
        print(
            "quantwire: warning: calibrating on synthetic random tokens; scales will not suit real text",
            file=sys.stderr,
        )
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, tokenizer.vocab_size, (count, 16), generator=generator)
        return [
            {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in torch.split(ids, batch_size)
        ]
    path = _existing_file(source, "calibration text")
    if path.suffix.lower() != ".txt":
        raise CliError(f"calibration data {source!r}: a text model calibrates on a .txt file (one sentence a line)")
    sentences = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not sentences:
        raise CliError(f"calibration text {source!r} holds no sentence")
    return [
        dict(tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, return_tensors="pt"))
        for i in range(0, len(sentences), batch_size)
    ]
