"""Instance-level forward wrappers that come off exactly: how every hook in synccache attaches.

`wrap_forward(module, fn)` makes module(...) call fn(original_forward, *args, **kwargs); the class's
forward stays untouched, so `unwrap` restores the module bit for bit (an earlier instance-level forward,
if any, comes back too).
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn


@dataclass
class Wrapped:
    module: nn.Module
    prev: Optional[Callable]  # the instance-level forward before wrapping, or None
    wrapper: Callable


def wrap_forward(module: nn.Module, fn: Callable, marker: str = "_synccache") -> Wrapped:
    """module.forward(*a, **k) -> fn(original_forward, *a, **k); the wrapper carries attribute `marker`."""
    prev, forward = module.__dict__.get("forward"), module.forward

    def wrapper(*args, **kwargs):
        return fn(forward, *args, **kwargs)
    setattr(wrapper, marker, True)
    module.forward = wrapper
    return Wrapped(module, prev, wrapper)


def unwrap(records, strict: bool = True) -> None:
    """Undo wrap_forward, last first. strict: raise if someone replaced a wrapper in the meantime."""
    for r in reversed(list(records)):
        if r.module.__dict__.get("forward") is not r.wrapper:
            if strict:
                raise RuntimeError(f"{type(r.module).__name__}.forward was replaced after the cache was applied")
            continue
        if r.prev is None:
            del r.module.__dict__["forward"]
        else:
            r.module.__dict__["forward"] = r.prev


def detach(records, hooks, strict: bool = True) -> None:
    """unwrap(records) and remove the torch hook handles: what every handle's remove() does."""
    unwrap(records, strict)
    for h in hooks:
        h.remove()
