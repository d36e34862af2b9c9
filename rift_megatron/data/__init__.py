"""Prompt datasets, tokenizers and the resumable sampler.

- :func:`load_prompts` reads a JSON Lines or Parquet prompt file into :class:`PromptRecord` s
  (``prompt`` / ``answer`` fields; a bad file is an error naming the file and line or row);
- :func:`render_prompt` turns one prompt into token ids, through the tokenizer's chat template
  when asked;
- :class:`PromptSampler` is the seeded, resumable epoch shuffler that picks each step's prompts
  and shards them over data-parallel ranks.
"""

from .prompts import PromptFileError, PromptRecord, load_prompts, render_prompt
from .sampler import PromptSampler

__all__ = ["PromptFileError", "PromptRecord", "PromptSampler", "load_prompts", "render_prompt"]
