"""Two ranks (spawned CPU processes, gloo) produce the problem one process produces.

Tolerance: per-sequence rows (``fisher``'s U and losses) are computed by the same ops on the
same sequence whatever the rank, and gathered in sequence order, so they agree to float
rounding of identical computations (observed bit-identical); ``layerwise`` and ``measured``
all-reduce sums, which only reorders float64 additions of float32-computed terms: relative
1e-9 is far above that reordering error (~1e-15) and far below any real difference.
"""

from __future__ import annotations

import numpy as np
import torch

from bitsack.models import model_units
from bitsack.models.testing import tiny_model
from bitsack.profiling import EstimatorOptions, profile
from bitsack.profiling.distributed import Dist, spawn

G = 16
ESTIMATORS = ("fisher", "layerwise", "measured")


def _tokens():
    return torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(5))


def _run_all(dist: Dist) -> dict:
    torch.set_num_threads(1)
    model = tiny_model("llama", seed=1)
    units = model_units(model, mlp_group=32)
    opts = EstimatorOptions(batch_size=2, measure_units=("L0.attn.g1", "L1.mlp.c2", "embed"))
    return {est: profile(model, units, _tokens(), estimator=est, bits=(2, 4), group_size=G,
                         progress=False, options=opts, dist=dist).problem
            for est in ESTIMATORS}


def _losses(problem) -> np.ndarray:
    return np.array([o.loss for u in problem.units for o in u.options])


def test_two_ranks_equal_one_rank():
    one = _run_all(Dist())
    two = spawn(2, _run_all, threads=1, timeout_s=240)
    for est in ESTIMATORS:
        a, b = one[est], two[est]
        assert [u.id for u in a.units] == [u.id for u in b.units]
        np.testing.assert_allclose(_losses(b), _losses(a), rtol=1e-9, atol=1e-15, err_msg=est)
        if est == "fisher":
            np.testing.assert_allclose(b.interactions.U, a.interactions.U, rtol=1e-9, atol=0)
            assert b.interactions.U.shape[0] == 5  # 3 + 2 sequences gathered in order


def test_shards_are_contiguous_and_cover_everything():
    for world in (1, 2, 3, 7):
        parts = [Dist(r, world).shard(10) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(10))
