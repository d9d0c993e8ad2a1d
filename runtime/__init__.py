"""kimi-runtime: disaggregated serving of Kimi-K2.5-style vision-language models on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kimi-runtime")  # pyproject.toml owns the number
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
