#!/usr/bin/env python
"""Megatron-style thin script over `rift convert` (same subcommands and flags):

    python tools/convert.py hf-to-mcore --hf ./Qwen2.5-0.5B --out ckpt/base
    python tools/convert.py mcore-to-hf --ckpt ckpt/run1 --out ./export
    python tools/convert.py verify --hf ./Qwen2.5-0.5B --ckpt ckpt/base --tp 2
"""

import sys

from rift_megatron.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
