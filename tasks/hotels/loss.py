"""The thesis' online triplet loss with a random negative sampler, on pytorch-metric-learning (pml).

For each anchor-positive pair of the batch (every ordered pair of two images of one hotel), one negative drawn at
random among those that violate the margin; pairs without a violating negative give no triplet. The loss is pml's
`TripletMarginLoss` on those triplets: the mean over them of d(a, p) - d(a, n) + margin.

Distance: pml's `CosineSimilarity`, i.e. the cosine distance d = 1 - cos, the unit of the preset's margin (0.1).
The embeddings are L2-normalised, where every Lp-type distance orders pairs alike (||a - b||^2 = 2 - 2 cos(a, b) =
2 d): only the margin's scale depends on the choice, and in cosine distance it reads as the preset states it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper


class RandomViolatingNegativeMiner(BaseMiner):
    """The thesis' "random negative sampler": for each anchor-positive pair, ONE negative drawn uniformly among those
    that violate the margin, d(a, n) < d(a, p) + margin (a triplet with a positive loss); no triplet for a pair
    without one. Returns (anchors, positives, negatives) indices, anchors into `embeddings`, the others into
    `ref_emb` (`embeddings` when not given).

    The distance is pml's `CosineSimilarity` unless another is given (see the module docstring). The draw uses
    torch's RNG on the embeddings' device, so `torch.manual_seed` makes it reproducible.
    """

    def __init__(self, margin: float = 0.1, **kwargs) -> None:
        kwargs.setdefault("distance", CosineSimilarity())
        super().__init__(**kwargs)
        self.margin = margin
        self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=["num_pairs_without_negative"], is_stat=True)

    def mine(
        self, embeddings: torch.Tensor, labels: torch.Tensor, ref_emb: torch.Tensor, ref_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        matches, diffs = lmu.get_matches_and_diffs(labels, ref_labels)  # no self pair when ref is the batch itself
        anchors, positives = torch.where(matches.bool())
        mat = self.distance(embeddings, ref_emb)
        ap = mat[anchors, positives].unsqueeze(1)  # (pairs, 1)
        an = mat[anchors]  # (pairs, refs)
        # the triplet loss's own hinge argument (pml's `margin` reads the distance's direction): > 0 = violating
        violating = (self.distance.margin(ap, an) + self.margin > 0) & diffs[anchors].bool()
        # uniform among the violators: the largest of iid uniform keys, the others masked below any key
        keys = torch.rand(violating.shape, device=mat.device).masked_fill_(~violating, -1.0)
        negatives = keys.argmax(dim=1)
        found = violating.any(dim=1)
        if self.collect_stats:
            self.num_pairs_without_negative = int((~found).sum())
        return anchors[found], positives[found], negatives[found]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class TripletLoss:
    """The thesis' online triplet loss: `RandomViolatingNegativeMiner` triplets into pml's `TripletMarginLoss`
    (cosine distance, mean over the mined triplets), computed in fp32 also under autocast.

    Under torch.distributed with several workers, the miner and the loss see every worker's embeddings of the step
    (pml's `DistributedMinerWrapper` and `DistributedLossWrapper`), so triplets span the global batch, as the thesis'
    single batch of 104. Non-efficient mode: each worker mines and scores the whole global batch (a 104 x 104
    distance matrix, nothing next to the network), its gradient flowing into its own embeddings, which pml scales by
    the world size so that DDP's gradient average yields exactly the gradient of the global batch's loss. The
    efficient mode would keep only the triplets anchored on each worker and drop the gradient that the others'
    anchors send to this worker's positives and negatives. The returned value is the global batch's loss itself
    (pml's world-size factor kept in the gradient only), so the logged loss does not depend on the worker count.
    Each worker draws its random negatives with its own RNG (and pml orders the gathered batch from each worker's
    own rows): workers may pick different violating negatives, each an equally valid draw.

    A batch without a violating triplet gives a zero loss that still has a grad_fn (pml's zero loss).
    """

    def __init__(self, margin: float) -> None:
        self.margin = margin
        self.miner = RandomViolatingNegativeMiner(margin=margin, distance=CosineSimilarity())
        self.loss = TripletMarginLoss(margin=margin, distance=CosineSimilarity())
        self.distributed_miner = DistributedMinerWrapper(self.miner, efficient=False)
        self.distributed_loss = DistributedLossWrapper(self.loss, efficient=False)

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean triplet loss over the mined triplets of the (global) batch."""
        with torch.autocast(embeddings.device.type, enabled=False):
            embeddings = embeddings.float()
            world_size = _world_size()
            if world_size == 1:
                return self.loss(embeddings, labels, self.miner(embeddings, labels))
            scaled = self.distributed_loss(embeddings, labels, self.distributed_miner(embeddings, labels))
            return scaled - scaled.detach() + scaled.detach() / world_size  # value: the loss; gradient: pml's
