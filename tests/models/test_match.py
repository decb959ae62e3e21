"""Target-match statistics: the teacher's jagged and the student's padded forms (recdistill/models/match.py)."""

import torch

from recdistill.models.match import (
    NUM_MATCH,
    NUM_SUMMARY,
    history_summary,
    summary_match,
    target_match,
    target_match_padded,
)


def test_target_match_statistics():
    offsets = torch.tensor([0, 0, 3, 13])  # an empty history, 3 events, 10 events (oldest first)
    cat = torch.tensor([1, 2, 1, 5, 5, 1, 5, 5, 5, 5, 5, 5, 1])
    m = target_match(torch.tensor([1, 1, 5]), cat, offsets)
    assert m.shape == (3, NUM_MATCH)
    assert m[0].abs().sum() == 0
    torch.testing.assert_close(m[1, :2], torch.tensor([2 / 3, torch.log1p(torch.tensor(2.0)).item()]))
    # row 2, last 8 events: 1 5 5 5 5 5 5 1 -> 6 of 8 in category 5; all 10: 8 of 10
    torch.testing.assert_close(m[2, 0], torch.tensor(0.75))
    torch.testing.assert_close(m[2, 4], torch.tensor(0.8))
    torch.testing.assert_close(m[2, -1], torch.log1p(torch.tensor(10.0)))


def test_jagged_and_padded_forms_agree():
    """Same events, same numbers: the student's padded window (wide enough for every row) against the teacher's
    jagged history, with empty rows and rows longer than the largest window."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([0, 1, 7, 8, 9, 63, 64, 65, 100])
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    cat = torch.randint(0, 4, (int(lengths.sum()),), generator=g)
    cand = torch.randint(0, 4, (len(lengths),), generator=g)
    width = int(lengths.max())
    padded = torch.full((len(lengths), width), -1, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths.tolist()):  # right-aligned: newest event last
        if n:
            padded[i, -n:] = cat[offsets[i]:offsets[i + 1]]
            mask[i, -n:] = True
    torch.testing.assert_close(target_match_padded(cand, padded, mask), target_match(cand, cat, offsets))


def test_history_summary_counts_the_last_window_and_matches_target_match():
    """The per-user summary counts each category over the last `window` events; the candidate's share and count
    read off it equal the jagged target-match statistics over a window of the same length."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([0, 1, 5, 12, 40])
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    cat = torch.randint(0, 6, (int(lengths.sum()),), generator=g)
    s = history_summary(cat, offsets, window=10, num_cats=6)
    for i in range(len(lengths)):
        last = cat[offsets[i]:offsets[i + 1]][-10:]
        assert torch.equal(s[i], torch.bincount(last, minlength=6).float()), i
    cand = torch.tensor([0, cat[0].item(), 3, 5, 2])
    m = summary_match(s, cand)
    assert m.shape == (5, NUM_SUMMARY)
    full = target_match(cand, cat, offsets)  # columns 4, 5: share and log count over each row's whole history
    short = lengths <= 10  # rows the window covers entirely
    torch.testing.assert_close(m[short, 0], full[short, 4])
    torch.testing.assert_close(m[short, 1], full[short, 5])
    torch.testing.assert_close(m[:, 2], torch.log1p(lengths.clamp(max=10).float()))
    # a candidate category beyond the summary's categories: seen nowhere, not another category's count
    assert summary_match(s, torch.tensor([9, 9, 9, 9, 9]))[:, :2].abs().sum() == 0
