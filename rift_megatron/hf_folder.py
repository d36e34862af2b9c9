"""An HF model folder as a command receives it: checked by its files before anything slow starts.

Why here and not left to the libraries: given a path that does not exist, transformers and vLLM
take it for a Hub repo id and fail 70 lines later with "Repo id must be in the form ..." or a
connection error; given a folder without tokenizer files, transformers blames sentencepiece
(installed) or, when tokenizer_config.json names a missing tokenizer.model, silently builds a
tokenizer with no vocabulary. A few `stat` calls say what is wrong, naming the flag or config key
the path came from. Torch-free: `rift train` runs these checks before importing the heavy stack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "ModelFolderError",
    "TOKENIZER_FILES",
    "check_model_folder",
    "folder_problem",
    "load_tokenizer",
    "safetensors_problem",
]

# Files that hold a tokenizer's vocabulary (one of them is enough): fast tokenizers
# (tokenizer.json), sentencepiece models, byte-level BPE (vocab.json + merges.txt), WordPiece,
# tiktoken. tokenizer_config.json alone holds none.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.tiktoken", "tiktoken.model",
)
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth")


class ModelFolderError(ValueError):
    """A model folder that cannot serve the command; the message names the flag / key and path."""


def safetensors_problem(folder: Path) -> str | None:
    """None if `folder` holds safetensors weights as long as their headers say, else what is wrong
    (one phrase): no safetensors (and what it holds instead), or a file cut short."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return next(filter(None, map(_cut_short, files)), None)
    pickled = sorted(path.name for pattern in _PICKLE_WEIGHTS for path in folder.glob(pattern))
    found = f" (it holds {', '.join(pickled[:3])}{' ...' if len(pickled) > 3 else ''})" if pickled else ""
    return (f"has no *.safetensors weights{found}; .bin / PyTorch pickle checkpoints are not supported: convert "
            "them with transformers `model.save_pretrained(dir, safe_serialization=True)`")


def _cut_short(path: Path) -> str | None:
    """What is wrong with a safetensors file's length (an interrupted download or copy), or None.
    Only the header's length and the largest tensor end offset are read: vLLM would otherwise fail
    deep in its weight loader ("incomplete metadata, file not fully covered"); the converter's
    reader (convert/safetensors_io.py) checks every entry of the header itself."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        try:
            header = json.loads(handle.read(length)) if 8 + length <= size else None
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            needed = 8 + length + max(ends, default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"has {path.name}, which is not a readable safetensors file (its header is truncated or malformed)"
    if size < needed:
        return f"has {path.name}, which is truncated: its header needs {needed} bytes, the file has {size}"
    return None


def folder_problem(folder: str | Path, *, weights: bool = False, tokenizer: bool = True) -> str | None:
    """What is wrong with `folder` as an HF model folder (None: nothing): it must exist and hold
    config.json, a tokenizer if `tokenizer`, and safetensors weights if `weights`."""
    folder = Path(folder)
    if not folder.exists():
        return "does not exist (a local Hugging Face model folder is expected)"
    if not folder.is_dir():
        return "is not a directory (a local Hugging Face model folder is expected)"
    if not (folder / "config.json").is_file():
        return "has no config.json (not a Hugging Face model folder)"
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES) \
            and not any(folder.glob("*.tiktoken")):
        return (f"has no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, ...): copy the tokenizer files of the "
                "model it was trained from into it")
    if weights:
        return safetensors_problem(folder)
    return None


def check_model_folder(folder: str | Path, name: str, *, weights: bool = False, tokenizer: bool = True) -> Path:
    """`folder` as a Path, or ModelFolderError ``"NAME 'folder' <problem>"`` (NAME: the flag or
    config key it came from, e.g. ``--model`` or ``model.hf_dir``)."""
    problem = folder_problem(folder, weights=weights, tokenizer=tokenizer)
    if problem:
        raise ModelFolderError(f"{name} {str(folder)!r} {problem}")
    return Path(folder)


def load_tokenizer(folder: str | Path, name: str) -> Any:
    """The folder's tokenizer (transformers' AutoTokenizer), after `check_model_folder`; a
    tokenizer that still fails to load is one ModelFolderError line naming the folder."""
    check_model_folder(folder, name)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, ImportError, KeyError, TypeError) as error:
        from rift_megatron.exits import first_line

        raise ModelFolderError(f"{name} {str(folder)!r}: cannot load its tokenizer: {type(error).__name__}: "
                               f"{first_line(error)}") from None
