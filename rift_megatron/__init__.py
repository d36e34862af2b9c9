"""rift-megatron: Reward-Informed Fine-Tuning (RIFT) on Megatron-Core."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rift-megatron")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.1.0+source"
