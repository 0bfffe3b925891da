"""Where a new adapter lives: on the device its base layer computes on.

Usually that is the base weight's device. A model loaded with `device_map` / `max_memory` may have
layers whose weights accelerate offloads to CPU RAM or disk: the weight sits on the meta device (disk)
or on the CPU, and a hook on the module (`_hf_hook`, an AlignDevicesHook) brings it to its
`execution_device` for each call. The adapter must live on that execution device: it is small, it
trains, and it is never offloaded.

Public: compute_device.
"""

from __future__ import annotations

import torch
from torch import nn


def compute_device(module: nn.Module) -> torch.device | None:
    """The execution device of an accelerate-offloaded module, or None (then: the weight's device)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None
