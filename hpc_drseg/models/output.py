"""What a model's forward returns: (B, 4, H, W) logits, or {"logits", "aux"} while training with the auxiliary head."""

from __future__ import annotations

from typing import Any, Optional

import torch


def split_output(output: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(logits, aux logits or None) from either form of a model's output."""
    if isinstance(output, dict):
        return output["logits"], output.get("aux")
    return output, None
