"""KV-cache surgery for MemGen decoding: forwards on a subset of a batch's rows, and compaction of dead slots.

A latent block goes to the rows that insert, not to the whole batch. ``transformers`` caches hold one tensor per
layer of shape (B, H, L, D), so rows cannot have different lengths; the rows that insert run their forward on a
cache restricted to them (``select_rows``), and the new slots are written back with empty (masked) slots for the
other rows (``append_rows``). Those dead slots cost attention reads on every later step, so ``compact`` drops them
now and then: each row's live slots, in order, are moved to the right end and the rest becomes left padding.
Attention does not depend on where a key sits in the cache (positions are explicit ``position_ids``; RoPE is
already applied to cached keys), so a compacted cache gives the same outputs up to float summation order.

Written by hand because ``transformers`` offers only whole-batch ``batch_select_indices`` (in place) and no way to
write a sub-batch back. Only plain ``DynamicLayer`` caches (full attention) are handled; ``supports`` says so, and
callers fall back to whole-batch forwards otherwise.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def supports(cache: DynamicCache) -> bool:
    """True when every initialised layer is a plain full-attention ``DynamicLayer`` (what the surgery handles)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _live(cache: DynamicCache) -> list[DynamicLayer]:
    return [layer for layer in cache.layers if layer.is_initialized and layer.keys is not None
            and layer.keys.numel() > 0]


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> DynamicCache:
    """A new cache holding only ``rows`` (n,) of ``cache`` (copies; ``cache`` is untouched)."""
    return DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
                                        for layer in _live(cache)])


def append_rows(cache: DynamicCache, sub: DynamicCache, rows: torch.Tensor, width: int) -> None:
    """Grow every layer of ``cache`` (B rows) by ``width`` slots: rows ``rows`` get the last ``width`` slots of
    ``sub`` (the cache ``select_rows`` gave, after a forward of ``width`` slots), the others zeros (to be masked)."""
    for layer, new in zip(_live(cache), _live(sub), strict=True):
        for name in ("keys", "values"):
            full, part = getattr(layer, name), getattr(new, name)[..., -width:, :]  # (B, H, L, D), (n, H, w, D)
            grown = torch.cat([full, full.new_zeros((*full.shape[:2], width, full.shape[3]))], dim=2)
            grown[rows, :, -width:] = part
            setattr(layer, name, grown)


def dead_slots(mask: torch.Tensor) -> int:
    """Slots every row could lose by compaction: cache length minus the longest row's live count."""
    return int(mask.shape[1] - mask.sum(1).max()) if mask.numel() else 0


def right_aligned(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's live slots (``mask`` (B, L) == 1) go when packed to the right in order: the source slot of
    every new slot (B, L') and the new mask (B, L'), L' = the longest row's live count (left padding points at
    slot 0 of its row; it is masked, so which slot it reads does not matter)."""
    live = mask.bool()
    counts = live.sum(1)  # (B,)
    width = int(counts.max()) if counts.numel() else 0
    B, L = mask.shape
    # Rank of each live slot among its row's live slots, shifted so that the last live slot lands at width - 1.
    rank = live.long().cumsum(1) - 1 + (width - counts)[:, None]  # (B, L)
    index = torch.zeros((B, width), dtype=torch.long, device=mask.device)  # (B, L')
    row_of = torch.arange(B, device=mask.device)[:, None].expand(B, L)
    col_of = torch.arange(L, device=mask.device)[None, :].expand(B, L)
    index[row_of[live], rank[live]] = col_of[live]
    new_mask = (torch.arange(width, device=mask.device)[None, :] >= (width - counts)[:, None]).to(mask.dtype)
    return index, new_mask


def compact(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
    """Drop dead slots: keep each row's live slots (``mask`` (B, L) == 1) in order, right-aligned; returns the new
    mask (B, L'), L' = the longest row's live count. ``cache`` is changed in place."""
    index, new_mask = right_aligned(mask)  # (B, L'), (B, L')
    B, width = index.shape
    for layer in _live(cache):
        H, D = layer.keys.shape[1], layer.keys.shape[3]
        gather = index[:, None, :, None].expand(B, H, width, D)
        layer.keys = layer.keys.gather(2, gather)
        layer.values = layer.values.gather(2, gather)
    return new_mask
