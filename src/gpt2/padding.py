"""Right padding of token lists into a batch: shared by the data pipeline, training, evaluation and decoding."""

from __future__ import annotations

import torch

PAD_ID = 0  # the seed pads with token 0 ("!"); it is never a target, so any id would do


def pad_right(sequences: list[list[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> right-padded ids and 1/0 mask, LongTensor [B, max_len]."""
    T = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
