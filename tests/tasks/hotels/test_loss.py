"""The random-negative triplet loss: the miner draws one margin-violating negative per anchor-positive pair uniformly,
the loss matches a hand computation, an easy batch gives a zero loss with a gradient, and two gloo workers compute
the loss of their concatenated batch."""

import math
import os
from collections import Counter

import pytest
import torch

from tasks.hotels.loss import RandomViolatingNegativeMiner, TripletLoss
from tests.distributed import run_gloo

MARGIN = 0.1


def _circle(*degrees: float) -> torch.Tensor:
    """Unit 2-d embeddings at these angles: cosine distance 1 - cos(angle between them)."""
    radians = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


# A1 at 0 deg, A2 at 60, B1 at 90, B2 at 140 (hotels A = 0, B = 1). With margin 0.1 exactly two pairs have a
# violating negative, one each: (A2, A1) with B1 (30 deg from A2, A1 60 deg away) and (B1, B2) with A2 (30 deg from
# B1, B2 50 deg away). (A1, A2) and (B2, B1) have none.
HAND = _circle(0, 60, 90, 140)
HAND_LABELS = torch.tensor([0, 0, 1, 1])
HAND_TRIPLETS = {(1, 0, 2), (2, 3, 1)}
HAND_LOSS = (
    (MARGIN + math.cos(math.radians(30)) - math.cos(math.radians(60)))
    + (MARGIN + math.cos(math.radians(30)) - math.cos(math.radians(50)))
) / 2


def _triplets(mined) -> list[tuple[int, int, int]]:
    return list(zip(*(t.tolist() for t in mined), strict=True))


def test_the_miner_returns_one_violating_negative_per_pair_that_has_one():
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(24, 4), dim=1)
    labels = torch.arange(6).repeat_interleave(4)
    miner = RandomViolatingNegativeMiner(margin=0.3)
    d = 1 - embeddings @ embeddings.T  # cosine distance
    violators = {
        (a, p): {n for n in range(24) if labels[n] != labels[a] and d[a, n] < d[a, p] + 0.3}
        for a in range(24)
        for p in range(24)
        if a != p and labels[a] == labels[p]
    }
    assert any(len(v) > 1 for v in violators.values()) and any(not v for v in violators.values())
    for _ in range(5):
        triplets = _triplets(miner(embeddings, labels))
        pairs = Counter((a, p) for a, p, _ in triplets)
        assert set(pairs) == {pair for pair, v in violators.items() if v} and set(pairs.values()) == {1}
        assert all(n in violators[a, p] for a, p, n in triplets)
    assert _triplets(miner(HAND, HAND_LABELS)) and set(_triplets(miner(HAND, HAND_LABELS))) == HAND_TRIPLETS


def test_the_negative_is_drawn_uniformly_among_the_violators_and_reproducibly():
    # anchor 0 and positive 1 (label 0) 60 deg apart; negatives at 20, 40, 65, 100 deg (violating: < 60 deg + the
    # margin, i.e. cos > cos(60) - 0.1) and 180 deg (not); the negatives' own labels are distinct.
    embeddings = _circle(0, 60, 20, 40, 65, 180)
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    assert 1 - math.cos(math.radians(65)) < 1 - math.cos(math.radians(60)) + MARGIN
    miner = RandomViolatingNegativeMiner(margin=MARGIN)
    torch.manual_seed(0)
    draws = 1500
    counts = Counter(n for _ in range(draws) for a, p, n in _triplets(miner(embeddings, labels)) if (a, p) == (0, 1))
    assert set(counts) == {2, 3, 4} and sum(counts.values()) == draws
    expected = draws / 3  # within 5 standard deviations of a binomial(1500, 1/3), about 91
    assert all(abs(c - expected) < 5 * math.sqrt(draws * (1 / 3) * (2 / 3)) for c in counts.values())
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001
    torch.manual_seed(7)
    first = _triplets(miner(embeddings, labels))
    torch.manual_seed(7)
    assert _triplets(miner(embeddings, labels)) == first


def test_the_loss_equals_the_hand_computation_and_trains():
    embeddings = HAND.clone().requires_grad_()
    loss = TripletLoss(MARGIN)(embeddings, HAND_LABELS)
    assert loss.item() == pytest.approx(HAND_LOSS, abs=1e-6)
    loss.backward()
    assert embeddings.grad[0].abs().sum() > 0  # A1 is a positive of a triplet


def test_the_loss_is_computed_in_fp32_under_autocast():
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    labels = torch.arange(4).repeat_interleave(4)
    torch.manual_seed(1)
    full = TripletLoss(MARGIN)(embeddings, labels)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = TripletLoss(MARGIN)(embeddings, labels)
    assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(full.item(), abs=1e-6)


def test_a_batch_without_a_violating_triplet_gives_a_zero_loss_with_a_gradient():
    embeddings = _circle(0, 10, 180, 190).requires_grad_()
    loss = TripletLoss(MARGIN)(embeddings, HAND_LABELS)
    assert loss.item() == 0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def _worker(rank: int, folder: str) -> None:
    # rank 0 holds A1 and B1, rank 1 A2 and B2: both triplets span the two workers
    own = HAND[[rank, rank + 2]].clone().requires_grad_()
    loss = TripletLoss(MARGIN)(own, HAND_LABELS[[rank, rank + 2]])
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": own.grad}, os.path.join(folder, f"rank{rank}.pt"))


def test_two_gloo_workers_compute_the_loss_of_their_concatenated_batch(tmp_path):
    run_gloo(_worker, str(tmp_path))
    whole = HAND.clone().requires_grad_()
    single = TripletLoss(MARGIN)(whole, HAND_LABELS)
    single.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["loss"].item() == pytest.approx(single.item(), abs=1e-6)
        # each worker's gradient is world_size x its rows' share: DDP's average makes it the global batch's gradient
        torch.testing.assert_close(result["grad"], 2 * whole.grad[[rank, rank + 2]])
