"""Latency cost models: a roofline over a device table, or a measured table.

Roofline (per weight matrix slice of a unit, summed over slices, so costs stay additive):

    t = max(bytes_moved / (bandwidth · eff_bw), flops / (peak · eff_flops))

Decode (``decode_latency_us``, batch ``B``, one new token, ``C`` cached tokens):
    bytes = packed weight bytes (the same size function as ``memory_bytes``)
            + for a head group: its K/V cache read, 2 · C · head_dim · 2 bytes (fp16)
    flops = 2 · params · B  (+ head group: 4 · C · head_dim · q_heads · B)
Prefill (``prefill_latency_us``, ``T`` tokens): weights are dequantized to fp16 once, then a
tensor-core GEMM:
    bytes = packed bytes + (2 + 2) · params if quantized (write then read the fp16 copy),
            2 · params at 16 bits
    flops = 2 · params · T  (+ head group causal attention: 2 · T² · head_dim · q_heads)
Pruned units cost 0. Fixed per-layer costs (norms, kernel launches) are the same for every
plan and therefore left out of the budget (documented in the problem metadata).

Prefill is compute bound, so quantization barely helps it and often costs a dequantization
pass: a prefill budget below the dense time forces pruning, which is the point of the joint
formulation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bitsack.errors import ValidationError
from bitsack.kernels.formats import packed_nbytes
from bitsack.solver.costs.base import CostModel, UnitShape, register_cost_model


@dataclass(frozen=True)
class Device:
    """Peak figures of a device (vendor data sheets, dense FP16/BF16 tensor throughput)."""

    name: str
    bandwidth_gbs: float  # memory bandwidth, GB/s
    peak_tflops: float  # dense fp16/bf16 tensor-core (or CPU fp32 SIMD) throughput, TFLOP/s
    source: str


#: Data-sheet figures. H200 SXM: 4.8 TB/s HBM3e, 989 TFLOP/s dense BF16; A100 SXM 80 GB:
#: 2.039 TB/s, 312 TFLOP/s; L40: 864 GB/s, 181 TFLOP/s (362 is with sparsity); ``cpu-2c``: the
#: 2-core development VM, order-of-magnitude figures (replace with a measured table for real use).
DEVICES: dict[str, Device] = {
    "h200": Device("h200", 4800.0, 989.0, "NVIDIA H200 SXM data sheet"),
    "a100": Device("a100", 2039.0, 312.0, "NVIDIA A100 80GB SXM data sheet"),
    "l40": Device("l40", 864.0, 181.0, "NVIDIA L40 data sheet (dense)"),
    "cpu-2c": Device("cpu-2c", 20.0, 0.1, "2-core x86 VM, rough"),
}


def _head_facts(unit: UnitShape) -> tuple[int, int]:
    """(q_heads, head_dim) of a head-group unit, 0s when the adapter did not say."""
    return int(unit.extra.get("q_heads", 0)), int(unit.extra.get("head_dim", 0))


def _weight_bytes(unit: UnitShape, bits: int, group_size: int) -> float:
    return float(sum(packed_nbytes(s.rows, s.cols, bits, group_size) for s in unit.slices))


@register_cost_model
class Roofline(CostModel):
    """``decode_latency_us`` and ``prefill_latency_us`` from a roofline over ``device``."""

    name = "roofline"
    resources = ("decode_latency_us", "prefill_latency_us")

    def __init__(self, device: str = "h200", batch: int = 1, context: int = 1024,
                 prefill_tokens: int = 2048, eff_bw: float = 0.8, eff_flops: float = 0.6):
        if device not in DEVICES:
            raise ValidationError("device", f"{device!r} is not in the device table; "
                                  f"valid: {sorted(DEVICES)}")
        for field_name, value in (("batch", batch), ("context", context),
                                  ("prefill_tokens", prefill_tokens)):
            if value < 1:
                raise ValidationError(field_name, f"{value} must be a positive integer")
        for field_name, value in (("eff_bw", eff_bw), ("eff_flops", eff_flops)):
            if not 0 < value <= 1:
                raise ValidationError(field_name, f"{value} must lie in (0, 1]")
        self.device = DEVICES[device]
        self.batch, self.context, self.prefill_tokens = batch, context, prefill_tokens
        self.eff_bw, self.eff_flops = eff_bw, eff_flops

    def _time_us(self, nbytes: float, flops: float) -> float:
        t_mem = nbytes / (self.device.bandwidth_gbs * 1e9 * self.eff_bw)
        t_cmp = flops / (self.device.peak_tflops * 1e12 * self.eff_flops)
        return max(t_mem, t_cmp) * 1e6

    def cost(self, unit: UnitShape, bits: int, group_size: int) -> dict[str, float]:
        if bits == 0:
            return {"decode_latency_us": 0.0, "prefill_latency_us": 0.0}
        params = unit.params
        wbytes = _weight_bytes(unit, bits, group_size)
        q_heads, head_dim = _head_facts(unit)
        is_attn = unit.kind == "head_group" and q_heads and head_dim

        d_bytes, d_flops = wbytes, 2.0 * params * self.batch
        if is_attn:
            d_bytes += 2 * self.context * head_dim * 2 * self.batch
            d_flops += 4.0 * self.context * head_dim * q_heads * self.batch
        t = self.prefill_tokens
        p_bytes = wbytes + (4.0 * params if bits < 16 else 0.0)
        p_flops = 2.0 * params * t
        if is_attn:
            p_flops += 2.0 * t * t * head_dim * q_heads
        if unit.kind == "embedding" and unit.extra.get("lookup_only"):
            # an untied input embedding is a gather, not a matmul
            d_flops = p_flops = 0.0
            d_bytes = wbytes * self.batch / max(1, unit.slices[0].rows)
            p_bytes = wbytes * min(1.0, t / max(1, unit.slices[0].rows))
        return {"decode_latency_us": self._time_us(d_bytes, d_flops),
                "prefill_latency_us": self._time_us(p_bytes, p_flops)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "resources": list(self.resources),
                "device": asdict(self.device), "batch": self.batch, "context": self.context,
                "prefill_tokens": self.prefill_tokens, "eff_bw": self.eff_bw,
                "eff_flops": self.eff_flops}


@register_cost_model
class LatencyTable(CostModel):
    """Latencies from a measured table instead of the roofline.

    The JSON file maps resource -> unit kind -> bits -> microseconds per million parameters::

        {"decode_latency_us": {"head_group": {"4": 1.9, "3g128": 1.5, "16": 6.8}, ...}}

    A key ``"<bits>g<G>"`` prices that bit-width at group size G; a plain ``"<bits>"`` prices
    every group size that has no key of its own. A unit's cost is ``params / 1e6 · value``;
    pruned units cost 0. A missing (kind, bits) entry is an error naming it, never a silent
    zero.
    """

    name = "latency-table"
    resources = ("decode_latency_us", "prefill_latency_us")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            table = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValidationError("latency_table",
                                  f"{str(path)!r} cannot be read as JSON: {exc}") from exc
        if not isinstance(table, dict) or not table:
            raise ValidationError("latency_table", "must be a non-empty JSON object "
                                  "resource -> kind -> bits -> us per million params")
        self.table = table
        self.resources = tuple(table)

    def cost(self, unit: UnitShape, bits: int, group_size: int) -> dict[str, float]:
        out = {}
        for res, by_kind in self.table.items():
            if bits == 0:
                out[res] = 0.0
                continue
            row = by_kind.get(unit.kind)
            key = f"{bits}g{group_size}"
            if row is None or (key not in row and str(bits) not in row):
                raise ValidationError(f"latency_table.{res}.{unit.kind}.{bits}",
                                      f"missing in {self.path} (nor {key!r}); the table has "
                                      f"kinds {sorted(by_kind)}")
            per_m = float(row[key] if key in row else row[str(bits)])
            out[res] = unit.params / 1e6 * per_m
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "resources": list(self.resources), "path": str(self.path)}
