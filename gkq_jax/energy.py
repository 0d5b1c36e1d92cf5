"""Energy per example of a model's forward pass: a documented, overridable estimate.

The model (Deep k-Means' energy metrics, with Horowitz's ISSCC 2014 45 nm costs):

  energy = MACs x (multiply + add at the weight's stored precision)
         + weight bits read from DRAM            (32-bit DRAM read per 32 bits)
         + codebook look-ups from on-chip SRAM   (32-bit 8 KB SRAM read per stored index)
         + activations read and written          (32-bit SRAM access per 32 bits)

* MACs are counted from the model itself: the forward is traced once and every
  ``dot_general`` / ``conv_general_dilated`` contributes out.size x (the
  contraction size), attributed to the parameter its weight operand comes
  from (through casts, reshapes, transposes and nested calls). XLA's own flop
  count of the same lowered forward is returned beside it as a cross-check.
* Stored precision: a dense leaf's dtype (float32 -> 32 bits); a clustered
  leaf (:class:`gkq_jax.ClusteredArray`) stores ceil(log2 K)-bit indices. Its
  MACs are charged at ``clustered_mac_bits`` (default: the index width): a
  datapath that holds the K shared values in 8-bit fixed point, as
  weight-sharing accelerators do (EIE: 4-bit indices into 16-bit shared
  weights), runs int8 MACs; pass ``clustered_mac_bits=32`` for a float
  datapath. Widths up to 8 bits cost an int8 MAC, wider ones an fp32 MAC.
* Weights are read from DRAM once per batch of ``batch_size`` examples (the
  default 1 is single-example inference, where weight traffic dominates);
  each clustered weight costs one codebook look-up per batch.
* Zeros (pruning, a pinned zero centroid): with ``skip_zeros`` a leaf's MACs
  scale with its density, and it is stored sparse (value or index bits plus
  ``sparse_index_bits`` of relative position per non-zero) when that is smaller.
  A clustered leaf's sparse part (dense-and-sparse outliers) is read as its
  values' bits plus ``sparse_index_bits`` each.
* Activations: the activation operand(s) of every MAC op are read and its
  output written once, at ``activation_bits`` per element. Element-wise ops,
  pooling and normalisation are assumed fused (not charged).
* Loops: a ``scan`` body counts ``length`` times; a ``while`` body once
  (its trip count is unknown when tracing); a ``cond`` its costliest branch.

All numbers are per example, in microjoules (uJ); costs are in picojoules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.extend import core as jax_core

from gkq_jax._paths import named_leaves
from gkq_jax.clustered import is_clustered

_ACTIVATION = -1  # mark of values computed from the input (not from a parameter)
_MAC_PRIMITIVES = ("dot_general", "conv_general_dilated")


@dataclasses.dataclass(frozen=True)
class EnergyCosts:
  """Energy of the basic operations in picojoules (Horowitz, ISSCC 2014, 45 nm)."""

  fp32_mult_pj: float = 3.7
  fp32_add_pj: float = 0.9
  int8_mult_pj: float = 0.2
  int8_add_pj: float = 0.03
  sram_read_pj: float = 5.0  # one 32-bit read from an 8 KB SRAM
  dram_read_pj: float = 640.0  # one 32-bit read from DRAM

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"EnergyCosts.{field.name} must be a finite number >= 0 "
                         f"(picojoules), got {value!r}.")

  def mac_pj(self, bits: int) -> float:
    """One multiply-accumulate with operands of ``bits`` bits (int8 up to 8 bits)."""
    if bits <= 8:
      return self.int8_mult_pj + self.int8_add_pj
    return self.fp32_mult_pj + self.fp32_add_pj


HOROWITZ_45NM = EnergyCosts()


@dataclasses.dataclass(frozen=True)
class EnergyEstimate:
  """Per-example energy (uJ) with its breakdown, MAC counts and per-layer rows."""

  total_uj: float
  mac_uj: float
  weight_dram_uj: float
  codebook_sram_uj: float
  activation_uj: float
  macs: float  # per example, zeros skipped where ``skip_zeros``
  dense_macs: float  # per example, every MAC of the traced forward
  xla_flops: float | None  # XLA's cost analysis of the same forward, per example
  weight_bits: float  # bits read from DRAM per batch
  layers: tuple  # one dict per parameter leaf that is stored or multiplied

  def as_dict(self) -> dict:
    return dataclasses.asdict(self) | {"layers": [dict(r) for r in self.layers]}


def _index_bits(k: int) -> int:
  return max(1, math.ceil(math.log2(max(k, 2))))


def _storage(leaf, skip_zeros: bool, sparse_index_bits: int, stored_bytes):
  """(dense array, stored bits, MAC bits if not overridden, density, look-ups)."""
  if is_clustered(leaf):
    dense = np.asarray(leaf.dequantize())
    bits = _index_bits(leaf.num_clusters)
    book_bits = 32 * int(np.asarray(leaf.codebook).size)
    n_indices = int(np.asarray(leaf.indices).size)
    if leaf.sparse is not None:  # weights kept exactly: value and relative position each
      values = np.asarray(leaf.sparse.values)
      book_bits += values.size * (8 * values.dtype.itemsize + sparse_index_bits)
  else:
    dense = np.asarray(leaf)
    bits = 8 * dense.dtype.itemsize
    book_bits, n_indices = 0, dense.size
  n = max(1, dense.size)
  nonzero = int(np.count_nonzero(dense))
  density = nonzero / n if skip_zeros else 1.0
  payload = n_indices * bits
  reads = n_indices
  if skip_zeros and dense.size == n_indices:  # sparse storage is per scalar weight
    sparse = nonzero * (bits + sparse_index_bits)
    if sparse < payload:
      payload, reads = sparse, nonzero
  stored = book_bits + payload if stored_bytes is None else 8 * int(stored_bytes)
  lookups = reads if is_clustered(leaf) else 0
  return dense, stored, bits, density, lookups


# ----------------------------------------------------------- MACs from the trace


def _macs_of(eqn) -> int:
  out = int(np.prod(eqn.outvars[0].aval.shape))
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  if eqn.primitive.name == "dot_general":
    (contract_lhs, _), _ = eqn.params["dimension_numbers"]
    return out * int(np.prod([lhs[d] for d in contract_lhs]))
  out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
  return out * int(np.prod(rhs)) // max(1, rhs[out_feature_dim])


def _subjaxprs(eqn):
  """(jaxpr, marks-in mapping, multiplier) for the nested computations of ``eqn``."""
  name, params = eqn.primitive.name, eqn.params
  if name == "while":
    body = params["body_jaxpr"]
    n_cond = params["cond_nconsts"]
    return [(body.jaxpr, eqn.invars[n_cond:], 1)]
  if name == "cond":
    return [(b.jaxpr, eqn.invars[1:], 1) for b in params["branches"]]
  if name == "scan":
    return [(params["jaxpr"].jaxpr, eqn.invars, int(params["length"]))]
  found = []
  for value in params.values():
    inner = getattr(value, "jaxpr", value)
    if hasattr(inner, "eqns") and len(inner.invars) == len(eqn.invars):
      found.append((inner, eqn.invars, 1))
  return found


def _walk(jaxpr, marks: dict, ops: list, multiplier: int) -> list:
  """Appends (leaf, macs, activation elements) per MAC op; returns the outvars' marks."""

  def mark(v):
    return None if isinstance(v, jax_core.Literal) else marks.get(v)

  for eqn in jaxpr.eqns:
    in_marks = [mark(v) for v in eqn.invars]
    if eqn.primitive.name in _MAC_PRIMITIVES:
      lhs, rhs = in_marks[:2]
      weights = [m for m in (rhs, lhs) if m is not None and m != _ACTIVATION]
      acts = sum(int(np.prod(v.aval.shape)) for v, m in zip(eqn.invars[:2], (lhs, rhs))
                 if m == _ACTIVATION)
      out = int(np.prod(eqn.outvars[0].aval.shape))
      ops.append((weights[0] if weights else None, multiplier * _macs_of(eqn),
                  multiplier * (acts + out)))
      out_marks = [_ACTIVATION] * len(eqn.outvars)
    else:
      nested = _subjaxprs(eqn)
      if nested:
        out_marks = None
        branch_ops = []
        for inner, outer_vars, times in nested:
          inner_ops: list = []
          inner_marks = {iv: mark(ov) for iv, ov in zip(inner.invars, outer_vars)
                         if mark(ov) is not None}
          result = _walk(inner, inner_marks, inner_ops, multiplier * times)
          branch_ops.append(inner_ops)
          out_marks = out_marks or result
        if eqn.primitive.name == "cond":  # the costliest branch
          ops.extend(max(branch_ops, key=lambda o: sum(m for _, m, _ in o)))
        else:
          for inner_ops in branch_ops:
            ops.extend(inner_ops)
        if len(out_marks) != len(eqn.outvars):  # e.g. while: carries only
          out_marks = out_marks[-len(eqn.outvars):]
      elif _ACTIVATION in in_marks:
        out_marks = [_ACTIVATION] * len(eqn.outvars)
      else:
        leaves = [m for m in in_marks if m is not None]
        out_marks = [leaves[0] if leaves else None] * len(eqn.outvars)
    for v, m in zip(eqn.outvars, out_marks):
      if m is not None:
        marks[v] = m
  return [mark(v) for v in jaxpr.outvars]


# ------------------------------------------------------------------ estimate


def estimate_energy(apply_fn: Callable, params: Any, sample_input, *,
                    costs: EnergyCosts = HOROWITZ_45NM, batch_size: int = 1,
                    clustered_mac_bits: int | None = None, activation_bits: int = 32,
                    skip_zeros: bool = True, sparse_index_bits: int = 5,
                    stored_bytes: Mapping[str, int] | None = None,
                    xla_check: bool = True) -> EnergyEstimate:
  """Energy per example of ``apply_fn(params, sample_input)``.

  Args:
    apply_fn: the forward pass, ``apply_fn(params, x) -> outputs`` (for linen:
      ``lambda v, x: model.apply(v, x)``, with ``params`` the variables dict
      so that batch statistics count as stored weights too).
    params: a pytree of arrays, dense or quantized (:func:`gkq_jax.quantize`'s
      output; each ClusteredArray is one stored leaf).
    sample_input: an input batch (leading axis = examples); the estimate is
      divided by its size. Only shapes matter.
    costs: per-operation energies (:class:`EnergyCosts`), e.g.
      ``EnergyCosts(dram_read_pj=320.0)``.
    batch_size: examples that share one read of the weights (1: single-example
      inference).
    clustered_mac_bits: precision of a clustered layer's MACs (default: its
      index width, i.e. int8 MACs for K <= 256).
    activation_bits: bits per activation read or written.
    skip_zeros: skip MACs of zero weights and store zero-rich leaves sparse.
    sparse_index_bits: relative-position bits per non-zero in sparse storage.
    stored_bytes: per leaf path, the bytes actually stored (e.g. the sizes
      :func:`gkq_jax.save` returns), replacing the model's storage estimate.
    xla_check: also return XLA's flop count of the lowered forward.

  Returns:
    An :class:`EnergyEstimate` (``.as_dict()`` for JSON).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1 (examples sharing one weight read), got "
                     f"{batch_size}.")
  if activation_bits < 1:
    raise ValueError(f"activation_bits must be >= 1, got {activation_bits}.")
  if not isinstance(costs, EnergyCosts):
    raise TypeError(f"costs must be an EnergyCosts, got {type(costs).__name__}.")
  examples = int(np.shape(jax.tree.leaves(sample_input)[0])[0]) if jax.tree.leaves(
      sample_input) else 0
  if examples < 1:
    raise ValueError("sample_input must be a batch with a leading axis of at least one "
                     "example (e.g. x[:1]).")
  named = named_leaves(params, is_leaf=is_clustered)
  stored_bytes = dict(stored_bytes or {})
  unknown = set(stored_bytes) - {p for p, _ in named}
  if unknown:
    raise ValueError(f"stored_bytes names leaves that params does not have: {sorted(unknown)[:3]}")
  treedef = jax.tree.structure(params, is_leaf=is_clustered)
  info = [_storage(leaf, skip_zeros, sparse_index_bits, stored_bytes.get(path))
          for path, leaf in named]
  dense = [d for d, *_ in info]

  traced = jax.jit(lambda leaves, x: apply_fn(treedef.unflatten(leaves), x)).trace(
      dense, sample_input)
  closed = traced.jaxpr
  n_params = len(jax.tree.leaves(dense))
  marks = {v: i for i, v in enumerate(closed.jaxpr.invars[:n_params])}
  marks.update({v: _ACTIVATION for v in closed.jaxpr.invars[n_params:]})
  ops: list = []
  _walk(closed.jaxpr, marks, ops, 1)
  xla_flops = None
  if xla_check:
    analysis = traced.lower().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    if analysis and "flops" in analysis:
      xla_flops = float(analysis["flops"]) / examples

  per_leaf_macs = [0.0] * len(named)
  other_macs, activation_elements = 0.0, 0.0
  for leaf, macs, acts in ops:
    activation_elements += acts
    if leaf is None:
      other_macs += macs
    else:
      per_leaf_macs[leaf] += macs
  pj_per_uj = 1e6
  rows, mac_pj, dram_pj, sram_pj, kept_macs = [], 0.0, 0.0, 0.0, 0.0
  for (path, leaf), (_, stored, bits, density, lookups), macs in zip(named, info,
                                                                     per_leaf_macs):
    mac_bits = bits
    if is_clustered(leaf) and clustered_mac_bits is not None:
      mac_bits = int(clustered_mac_bits)
    done = macs * density / examples
    row = {"layer": path, "macs": done, "mac_bits": int(mac_bits),
           "stored_bits": int(stored), "density": float(density),
           "mac_uj": done * costs.mac_pj(mac_bits) / pj_per_uj,
           "weight_dram_uj": stored / 32 * costs.dram_read_pj / batch_size / pj_per_uj,
           "codebook_sram_uj": lookups * costs.sram_read_pj / batch_size / pj_per_uj}
    rows.append(row)
    kept_macs += done
    mac_pj += row["mac_uj"] * pj_per_uj
    dram_pj += row["weight_dram_uj"] * pj_per_uj
    sram_pj += row["codebook_sram_uj"] * pj_per_uj
  # MACs between two activations (attention, ...) run at the activations' precision.
  other = other_macs / examples
  mac_pj += other * costs.mac_pj(activation_bits)
  act_pj = activation_elements / examples * activation_bits / 32 * costs.sram_read_pj
  parts = [p / pj_per_uj for p in (mac_pj, dram_pj, sram_pj, act_pj)]
  return EnergyEstimate(
      total_uj=sum(parts), mac_uj=parts[0], weight_dram_uj=parts[1], codebook_sram_uj=parts[2],
      activation_uj=parts[3], macs=kept_macs + other,
      dense_macs=(sum(per_leaf_macs) + other_macs) / examples, xla_flops=xla_flops,
      weight_bits=float(sum(i[1] for i in info)), layers=tuple(rows))
