"""Seeds: one master seed, and per-stage seeds derived from it so a resumed run repeats exactly."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(master: int, *parts: object) -> int:
    """A stable 31-bit seed from the master seed and labels (e.g. ``("train", stage)``)."""
    h = hashlib.sha256(":".join(map(str, (master, *parts))).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
