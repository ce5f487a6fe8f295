"""Cost models: what each option of a unit costs, per resource.

A cost model turns a unit's weight shapes and an option (prune / keep at b bits) into costs on
the resources it defines. Built in:

- ``memory`` -> ``memory_bytes``: exact packed bytes from the format's own size function
  (``bitsack.kernels.formats.packed_nbytes``), so a memory budget is bytes on disk;
  ``memory`` with ``format="gguf"`` / ``"compressed-tensors"``: the bytes of that export's
  tensors (``bitsack.solver.costs.formats`` says which options and constraints go with it).
- ``roofline`` -> ``decode_latency_us``, ``prefill_latency_us``: a roofline over a device table
  (bytes moved / bandwidth vs FLOPs / peak, per unit, additive).
- ``latency-table`` -> the same resources from a measured table (JSON) instead of the roofline.

Plugging in a custom model::

    from bitsack.solver.costs import CostModel, UnitShape, register_cost_model

    @register_cost_model
    class EnergyModel(CostModel):
        name = "energy"
        resources = ("energy_uj",)

        def cost(self, unit: UnitShape, bits: int, group_size: int) -> dict[str, float]:
            return {"energy_uj": 0.0 if bits == 0 else unit.params * bits * 1e-6}

then ``bitsack profile --cost-model memory --cost-model energy`` (or
``build_costs(..., models=["memory", "energy"])``) puts ``energy_uj`` on every option and a
budget can be set on it with ``--budget energy_uj=...``.
"""

from bitsack.solver.costs.base import (
    CostModel,
    SliceShape,
    UnitShape,
    cost_model_names,
    get_cost_model,
    option_costs,
    register_cost_model,
)
from bitsack.solver.costs.latency import DEVICES, Device, LatencyTable, Roofline
from bitsack.solver.costs.memory import MemoryModel

__all__ = [
    "DEVICES",
    "CostModel",
    "Device",
    "LatencyTable",
    "MemoryModel",
    "Roofline",
    "SliceShape",
    "UnitShape",
    "cost_model_names",
    "get_cost_model",
    "option_costs",
    "register_cost_model",
]
