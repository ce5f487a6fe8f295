"""``memory``: exact packed bytes of a unit, from the packed format's own size function."""

from __future__ import annotations

from bitsack.kernels.formats import packed_nbytes
from bitsack.solver.costs.base import CostModel, UnitShape, register_cost_model


@register_cost_model
class MemoryModel(CostModel):
    """``memory_bytes`` = Σ over the unit's slices of ``packed_nbytes(rows, cols, bits, G)``.

    Column slices are packed as their own segment columns (groups inside the slice), row slices
    as whole rows; both are what the packer writes, so the sum over units equals the bytes of
    the packed tensors (norms and biases, which stay 16-bit, are outside every unit). G is the
    option's own group size (``b<k>g<G>``, or the problem's default for ``b<k>``); a row of
    ``cols`` values holds ``ceil(cols/G)`` groups, so G need not divide ``cols``.
    """

    name = "memory"
    resources = ("memory_bytes",)

    def cost(self, unit: UnitShape, bits: int, group_size: int) -> dict[str, float]:
        total = sum(packed_nbytes(s.rows, s.cols, bits, group_size) for s in unit.slices)
        return {"memory_bytes": float(total)}

    def describe(self) -> dict:
        return {"name": self.name, "resources": list(self.resources),
                "formula": "rows*ceil(bits*cols/32)*4 + rows*ceil(cols/g)*4 per slice; "
                           "16 bits: 2*rows*cols; pruned: 0"}
