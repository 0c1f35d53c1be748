"""Token rows: the pad id and the one padding function every batched forward pass uses.

Rows are placed in a (B, T) grid with an attention mask and explicit position ids
cumsum(mask) − 1 (clamped at 0), so a padded row sees exactly the positions it would see alone
(transformers 5 does not derive positions from the mask for GPT-2 / Llama).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def pad_id(tok: Any) -> int:
    """The id padded positions get: pad, else EOS, else UNK, else 0 (any id works: they are masked)."""
    for cand in (tok.pad_token_id, tok.eos_token_id, getattr(tok, "unk_token_id", None)):
        if cand is not None:
            return int(cand)
    return 0


def pad_batch(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    side: str = "right",
    device: torch.device | str = "cpu",
    offsets: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """input_ids, attention_mask, position_ids and each row's offset (pads before its first token).

    ``side`` "right" puts every row at column 0, "left" ends every row in the last column;
    ``offsets`` (one per row) place the rows at given columns instead, e.g. to align one token of
    every row on the same column, and the grid is as wide as the furthest row end."""
    if offsets is None:
        if side not in ("left", "right"):
            raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
        width = max(len(s) for s in seqs)
        offsets = [width - len(s) if side == "left" else 0 for s in seqs]
    else:
        offsets = list(offsets)
        if len(offsets) != len(seqs):
            raise ValueError(f"{len(offsets)} offsets for {len(seqs)} rows")
        width = max(off + len(s) for off, s in zip(offsets, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (off, s) in enumerate(zip(offsets, seqs)):
        ids[r, off : off + len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, off : off + len(s)] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device), list(offsets)
