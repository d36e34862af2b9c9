"""Build (once) and print the cached bf16 SmolLM2-135M-Instruct folder, for tests and benches.

    .venv/bin/python -m tests.real_model.build_smollm2 [--out DIR]

Prints the folder's path on stdout (nothing else), so a script can do
``MODEL=$(.venv/bin/python -m tests.real_model.build_smollm2)``. Exit 0 on success; exit 3 with one
line on stderr when a required package is missing (the line names it and the install command);
exit 1 when the build itself fails. The recipe, cache location and checks are in
tests/real_model/smollm2.py.
"""

from __future__ import annotations

import argparse
import sys

from tests.real_model.smollm2 import RealModelUnavailable, default_cache_dir, ensure_smollm2

EXIT_UNAVAILABLE = 3


def main(argv: list[str] | None = None) -> int:
    """Parse ``--out``, build if needed, print the folder path."""
    parser = argparse.ArgumentParser(prog="python -m tests.real_model.build_smollm2", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help=f"target folder (default: {default_cache_dir()})")
    args = parser.parse_args(argv)
    try:
        folder = ensure_smollm2(args.out)
    except RealModelUnavailable as error:
        print(f"build_smollm2: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (RuntimeError, FileExistsError) as error:
        print(f"build_smollm2: error: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
