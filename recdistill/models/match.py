"""Target-match statistics (SIM-style hard search by category), shared by the teacher and the student.

For a candidate and a user's history: over the last w events (w in MATCH_WINDOWS, then the whole history the
model sees) the share and log1p(count) of events in the candidate's category, and last log1p(history length):
NUM_MATCH numbers per row, parameter-free, no gradient. The teacher computes them on its jagged history
(`target_match`), the student on its right-aligned padded window (`target_match_padded`, export-friendly);
both give the same numbers for the same events (tests/models/test_match.py).
"""

from __future__ import annotations

import torch

MATCH_WINDOWS = (8, 64)
NUM_MATCH = 2 * (len(MATCH_WINDOWS) + 1) + 1


def _jagged_rows(offsets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lengths [B], row of each of the n jagged events [n], its recency [n]: 0 = the row's most recent event)."""
    lengths = offsets[1:] - offsets[:-1]
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=n)
    back = offsets[1:][row] - 1 - torch.arange(n, device=offsets.device)
    return lengths, row, back


def target_match(cand_cat: torch.Tensor, hist_cat: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[B, NUM_MATCH] for jagged history categories (oldest first, rows delimited by `offsets` [B+1])."""
    lengths, row, back = _jagged_rows(offsets, hist_cat.numel())
    b = lengths.numel()
    match = (hist_cat == cand_cat[row]).float()
    out = []
    for w in (*MATCH_WINDOWS, None):
        keep = match if w is None else match * (back < w)
        count = torch.zeros(b, device=offsets.device).index_add_(0, row, keep)
        n = lengths.float() if w is None else lengths.clamp(max=w).float()
        out += [count / n.clamp(min=1), torch.log1p(count)]
    out.append(torch.log1p(lengths.float()))
    return torch.stack(out, 1)


def target_match_padded(cand_cat: torch.Tensor, hist_cat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, NUM_MATCH] for right-aligned padded history categories [B, n] (newest last) and their mask."""
    match = ((hist_cat == cand_cat.unsqueeze(1)) & mask).float()
    valid = mask.float()
    out = []
    for w in (*MATCH_WINDOWS, hist_cat.shape[1]):
        count, n = match[:, -w:].sum(1), valid[:, -w:].sum(1)
        out += [count / n.clamp(min=1), torch.log1p(count)]
    out.append(torch.log1p(valid.sum(1)))
    return torch.stack(out, 1)


# ---- long-history summary (the student's servable stand-in for the teacher's long sequence) --------------------
#: Numbers per row of `summary_match`: share and log1p(count) of the candidate's category, log1p(events summarised).
NUM_SUMMARY = 3


def history_summary(hist_cat: torch.Tensor, offsets: torch.Tensor, window: int, num_cats: int) -> torch.Tensor:
    """[B, num_cats] float: how many of each row's last `window` history events fall in each category.

    This is the per-user summary a feature service keeps and serves with the request (one small vector per user,
    updated as events arrive), so a student that reads it needs no long sequence at serving time. Training computes
    it from the same jagged history (`offsets` [B+1], categories oldest first), which gives the numbers that service
    would hold at the sample's time."""
    lengths, row, back = _jagged_rows(offsets, hist_cat.numel())
    b = lengths.numel()
    # every event is added, weighted 1 inside the window and 0 before it: no boolean indexing, which would wait on
    # the device for the number of events kept
    out = torch.zeros(b * num_cats, device=offsets.device)
    return out.index_add_(0, row * num_cats + hist_cat, (back < window).float()).view(b, num_cats)


def summary_match(summary: torch.Tensor, cand_cat: torch.Tensor) -> torch.Tensor:
    """[B, NUM_SUMMARY] target-match statistics of the candidate's category read off a `history_summary` [B, C]."""
    total = summary.sum(1)
    c = summary.shape[1]
    count = summary.gather(1, cand_cat.clamp(0, c - 1).unsqueeze(1)).squeeze(1)
    count = torch.where(cand_cat < c, count, torch.zeros_like(count))  # a category no history event has: none seen
    return torch.stack([count / total.clamp(min=1), torch.log1p(count), torch.log1p(total)], 1)
