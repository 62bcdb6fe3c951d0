"""A module whose sampler hook raises when called (its import succeeds)."""

from gptkit import hookimpl

__version__ = "0.3"


@hookimpl
def gptkit_register_sampler(register):
    raise RuntimeError("the hook fell over")
