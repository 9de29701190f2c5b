"""The information buffer: a vectorised rANS bit stack, one lane per weight.

Multiplying an integer velocity by the momentum ``gamma = n / d`` (``d = 2**16``) loses
``log2(d / n)`` bits per weight. ``multiply`` keeps them: it pushes the remainder ``v mod d``
(a symbol in base ``d``) onto the lane and pops a symbol ``x`` in base ``n``, and returns
``(v div d) * n + x``, a bijection onto the integers. ``divide`` is its exact inverse. The pair
is the only lossy step of momentum SGD, made lossless (Maclaurin et al. 2015, section 2.3),
with an entropy coder instead of the paper's arbitrary-precision integer, so the buffer grows
by the information-theoretic minimum ``log2(d / n)`` bits per weight per step.

Layout (static shapes, so the whole buffer lives inside ``lax.scan``):

* ``head``: uint64 per lane. Between operations ``head`` is in ``[B, H) = [2**16, 2**48)``.
* ``tail``: one flat uint32 array of 32-bit chunks shared by all lanes, and ``ptr``, the number
  of chunks in use. Lanes that spill write at ``ptr + cumsum(mask) - 1`` in lane order, a masked
  scatter; the reverse gathers the mirror image.

Because ``n <= d``, ``multiply`` only ever grows a head, so the forward pass only spills and the
reverse only refills: one renormalisation per step, and no condition on the arbitrary base
``n``. A lane spills (its low 32 bits go to the tail) when ``head >= 2**32 * n``, which keeps the
new head below ``H``; a spilled head is below ``2**16 = B``, every other head is at least ``B``,
so in reverse a lane refills exactly when its head falls below ``B`` after the undo.

Sharded (``shards``, a ``_sharding.Shards``): each head group is laid out like its parameter leaf
and every device owns a tail, pointer, overflow flag and bound of its own (``tail`` is
``[devices, capacity_chunks]``, the others ``[devices]``, each sharded on its leading axis). Every
operation runs under ``shard_map`` as the unsharded code on the device's own lanes, so the
cumulative sum, the scatter and the gather stay on the device: no collective touches the stack.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from revhyper import _sharding

DENOMINATOR_BITS = 16
DENOMINATOR = 2**DENOMINATOR_BITS  # d: momenta are n / 2**16 with 1 <= n <= 2**16.
CHUNK_BITS = 32
HEAD_LOW_BITS = 16  # B = 2**16
HEAD_HIGH_BITS = 48  # H = 2**48; head * d stays below 2**64.
# A fine denominator (D > 16) codes k = 8 low bits of the remainder through the head (see
# ``multiply``): head in [2**8, 2**40), and a result within 2**8 + 1 grid units of the product.
FINE_HEAD_BITS = 8


def head_bits(denominator_bits):
  """k, the low bits of the remainder that go through the head, for a denominator ``2**D``."""
  return HEAD_LOW_BITS if denominator_bits <= DENOMINATOR_BITS else FINE_HEAD_BITS
_CHUNK_MASK = 2**CHUNK_BITS - 1


class BitStack(NamedTuple):
  """State of the information buffer. Fields must be used with x64 enabled.

  The lanes come in groups (one per parameter leaf) that keep their own shapes, so that the
  per-step arithmetic needs no concatenation; only the rare renormalisation joins them.
  """

  # Sharded, every field but ``head`` has a leading [devices] axis: one tail per device.
  head: list  # uint64 arrays, one per group of lanes, in [2**16, 2**48) between operations.
  tail: jax.Array  # uint32 [capacity_chunks], chunks [0, ptr) in use.
  ptr: jax.Array  # int64 [], number of chunks in use.
  overflow: jax.Array  # bool [], sticky: a spill found the tail full (its chunk was dropped).
  # float64 []: a bound on the heads that lets most steps skip renormalisation: an upper bound
  # on every head while pushing (forward), a lower bound while popping (see ``for_popping``).
  bound: jax.Array


def empty(lane_shapes, capacity_chunks, k=HEAD_LOW_BITS, shards=None):
  """An empty bit stack with one group of lanes per shape: every head at ``B = 2**k``, no tail.

  ``k`` is ``head_bits`` of the denominators the stack will multiply by, the same for all its
  groups. With ``shards``, ``lane_shapes`` are the whole leaves' and ``capacity_chunks`` is per
  device.
  """
  head = [jnp.full(shape, 2**k, jnp.uint64) for shape in lane_shapes]
  if shards is None:
    return BitStack(
        head=head,
        tail=jnp.zeros((capacity_chunks,), jnp.uint32),
        ptr=jnp.zeros((), jnp.int64),
        overflow=jnp.zeros((), jnp.bool_),
        bound=jnp.asarray(2.0**k, jnp.float64),
    )
  devices = shards.num_devices
  per_device = lambda x: shards.lay_out(x, shards.device_spec)
  return BitStack(
      head=_sharding.constrain(head, shards),
      tail=per_device(jnp.zeros((devices, capacity_chunks), jnp.uint32)),
      ptr=per_device(jnp.zeros((devices,), jnp.int64)),
      overflow=per_device(jnp.zeros((devices,), jnp.bool_)),
      bound=per_device(jnp.full((devices,), 2.0**k, jnp.float64)),
  )


def _stack_specs(shards):
  device = shards.device_spec
  return BitStack(list(shards.specs), device, device, device, device)


def _local_view(stack):
  """A device's own row of the per-device fields, as an unsharded stack (inside shard_map)."""
  return stack._replace(tail=stack.tail[0], ptr=stack.ptr[0], overflow=stack.overflow[0],
                        bound=stack.bound[0])


def _on_devices(fn, shards, stack, args=(), arg_specs=(), out_specs=()):
  """``fn(local_stack, *args) -> (local_stack, *outs)`` run by every device on its own stack."""
  specs = _stack_specs(shards)

  def local(stack, *args):
    stack, *outs = fn(_local_view(stack), *args)
    stack = stack._replace(tail=stack.tail[None], ptr=stack.ptr[None],
                           overflow=stack.overflow[None], bound=stack.bound[None])
    return (stack, *outs)

  return _sharding.per_device(local, shards, (specs, *arg_specs), (specs, *out_specs))(
      stack, *args)


def _per_device_value(fn, shards, stack):
  """``fn(local_stack)``, a scalar per device, as a ``[devices]`` array."""
  run = _sharding.per_device(lambda st: fn(_local_view(st))[None], shards,
                             (_stack_specs(shards),), shards.device_spec)
  return run(stack)


def _rans_on_devices(op, stack, values, numerators, min_base, denominator_bits, shards):
  """``multiply`` or ``divide`` (``op``) run by every device on its own lanes and tail."""
  value_specs, numerator_specs = _value_specs(shards, values, numerators)
  return _on_devices(lambda st, v, n, m: op(st, v, n, m, denominator_bits), shards, stack,
                     (values, numerators, min_base),
                     (value_specs, numerator_specs, PartitionSpec()), (value_specs,))


def _value_specs(shards, values, numerators):
  """Values go like their leaves; a numerator is a scalar (replicated) or shaped like its leaf."""
  numerator_specs = []
  for v, n, spec in zip(values, numerators, shards.specs):
    if jnp.ndim(n) and jnp.shape(n) != jnp.shape(v):
      raise ValueError(f"sharded numerators must be scalars or shaped like their values "
                       f"{jnp.shape(v)}, got {jnp.shape(n)}.")
    numerator_specs.append(spec if jnp.ndim(n) else PartitionSpec())
  return list(shards.specs), numerator_specs


def _min_head(heads):
  return functools.reduce(
      jnp.minimum, [jnp.min(h, initial=2**HEAD_HIGH_BITS) for h in heads])


def for_popping(stack, shards=None):
  """Turns ``bound`` into a lower bound on the heads, for a run of ``divide``s."""
  if shards is not None:  # each device bounds its own heads
    return _on_devices(lambda st: (for_popping(st),), shards, stack)[0]
  return stack._replace(bound=_min_head(stack.head).astype(jnp.float64))


# Relative slack on the float64 bounds, far above their rounding error (2**-52 per step), so
# that they stay bounds.
_SLACK = 2.0**-30


def _join(groups):
  return jnp.concatenate([jnp.ravel(x) for x in groups])


def _split_like(flat, groups):
  out, start = [], 0
  for x in groups:
    out.append(flat[start:start + x.size].reshape(x.shape))
    start += x.size
  return out


def _spill(stack, masks):
  """Moves the low 32 bits of the masked lanes' heads to the tail (forward renormalisation)."""
  capacity = stack.tail.shape[0]
  mask, head = _join(masks), _join(stack.head)
  offsets = jnp.cumsum(mask, dtype=jnp.int64) - 1
  count = offsets[-1] + 1
  # Lanes that do not spill write out of bounds, which mode="drop" discards; so does a spill
  # past the capacity, which is recorded as overflow rather than corrupting the tail.
  index = jnp.where(mask, stack.ptr + offsets, capacity)
  chunks = (head & _CHUNK_MASK).astype(jnp.uint32)
  head = jnp.where(mask, head >> CHUNK_BITS, head)
  return BitStack(
      head=_split_like(head, stack.head),
      tail=stack.tail.at[index].set(chunks, mode="drop", unique_indices=True),
      ptr=stack.ptr + count,
      overflow=stack.overflow | (stack.ptr + count > capacity),
      bound=jnp.max(head).astype(jnp.float64),
  )


def _refill(stack, masks):
  """Exact inverse of ``_spill``: the masked lanes take back their chunks from the tail."""
  mask, head = _join(masks), _join(stack.head)
  offsets = jnp.cumsum(mask, dtype=jnp.int64) - 1
  ptr = stack.ptr - (offsets[-1] + 1)
  index = jnp.where(mask, ptr + offsets, 0)
  chunks = stack.tail.at[index].get(mode="clip").astype(jnp.uint64)
  head = jnp.where(mask, (head << CHUNK_BITS) | chunks, head)
  return stack._replace(head=_split_like(head, stack.head), ptr=ptr,
                        bound=jnp.min(head).astype(jnp.float64))


def _at_most_once(pred, fn, stack):
  """``fn(stack)`` if ``pred`` else ``stack``, as a loop of zero or one iterations.

  Not ``lax.cond``: a conditional whose branch returns its operand made XLA copy every head
  on every step (about 1.3 ms a step at 2.8M lanes on a CPU); a loop updates its carry in
  place and does nothing when it does not run.
  """
  return jax.lax.while_loop(lambda c: c[1], lambda c: (fn(c[0]), jnp.zeros((), jnp.bool_)),
                            (stack, pred))[0]


def divmod_small_quotient(s, base, s_float=None):
  """``(s // base, s % base)`` for uint64 ``s`` and ``1 <= base < 2**32`` with ``s / base < 2**50``.

  The same integers as the integer division, which x86 CPUs do one element at a time (about
  three times the cost of this on an AMD EPYC without AVX-512, for a divisor known only at run
  time), with vector float arithmetic instead: the float64 quotient ``s * (1 / base)`` is within
  ``4 * 2**-53`` relative (three roundings, the first at most ``2**-52``) of ``s / base``, so
  within 1/2 of it, and its nearest integer ``q`` (read from the bit pattern of ``2**52 + q``,
  which a float-to-integer conversion would not vectorise) is the floor or one more. The
  remainder ``s - q * base``, exact in wrapping uint64 arithmetic, is negative exactly when
  ``q`` is one too many.

  ``s_float``, if given, is ``s`` rounded once to float64 (the caller may have it cheaper than
  a uint64-to-float conversion, which AVX2 lacks).
  """
  if s_float is None:
    s_float = s.astype(jnp.float64)
  base = base & _CHUNK_MASK  # below 2**32: lets the compiler multiply 32 by 64 bits
  estimate = s_float * (1.0 / base.astype(jnp.float64)) + 2.0**52
  q = jax.lax.bitcast_convert_type(estimate, jnp.uint64) & (2**52 - 1)
  r = s - q * base
  over = r.astype(jnp.int64) < 0  # |s - q * base| < base < 2**32: the wrapped value is small
  return q - over.astype(jnp.uint64), jnp.where(over, r + base, r)


def exact_float(x):
  """``x`` as float64 for integers ``0 <= x < 2**52`` (exact), from the bit pattern of
  ``2**52 + x``: vector instructions only, where a 64-bit integer conversion has none on AVX2."""
  bits = x.astype(jnp.uint64) | np.uint64(0x4330000000000000)  # the pattern of 2**52
  return jax.lax.bitcast_convert_type(bits, jnp.float64) - 2.0**52


def floor_divmod(x, n):
  """``(floor(x / n), x mod n)`` for int64 ``x`` and positive int64 ``n``: floor semantics."""
  q = jax.lax.div(x, n)  # rounds towards zero
  r = x - q * n
  low = r < 0  # x < 0 and inexact: step down to the floor
  return q - low.astype(jnp.int64), jnp.where(low, r + n, r)


def _blocks(r_hi, numerators, shift):
  """Block ``r_hi`` of ``[0, n)``: its start ``ceil(r_hi * n / 2**shift)`` and length ``L``.

  The ``2**shift`` blocks tile ``[0, n)``; each has length ``floor(n / 2**shift)`` or one more,
  at least 1 when ``n >= 2**shift``. Rounding the starts up gives block 0 the longer length:
  a state stuck at 0 (a weight whose gradient is always 0, and its moments) stays in block 0,
  and stores no more than the information bound. ``r_hi < 2**shift`` and ``n <= 2**31``, so
  the products stay below ``2**(shift + 32) <= 2**55`` for ``shift = 31 - 8``.
  """
  up = 2**shift - 1
  start = (r_hi * numerators + up) >> shift
  return start, (((r_hi + 1) * numerators + up) >> shift) - start


def head_bases(numerators, denominator_bits):
  """``L_min = floor(n / 2**(D - k))``: the smallest base a multiply by ``n / 2**D`` pops.

  For ``D = 16`` (``k = 16``) it is ``n`` itself. Works on numpy and JAX integers alike.
  """
  return numerators >> (denominator_bits - head_bits(denominator_bits))


def _uniform_head_bits(denominator_bits):
  ks = {head_bits(bits) for bits in denominator_bits}
  if len(ks) != 1:
    raise ValueError(f"one bit stack needs one head width; got denominators {denominator_bits}")
  return ks.pop()


def multiply(stack, values, numerators, min_base, denominator_bits=None, shards=None):
  """Exact, invertible ``v -> v * n / d``, ``d = 2**D``: the remainder goes onto the stack.

  With ``D = 16`` (momentum): push ``r = v mod d`` (base d), pop ``x`` in base ``n``, return
  ``(v div d) * n + x``. A finer denominator (``16 < D <= 31``: the resolution of Adam's
  ``b2 = 0.999`` or of a weight decay ``1 - lr * wd`` close to 1) would make ``head * d``
  overflow 64 bits and let ``x`` stray up to ``n`` (2**31) grid units from ``v * n / d``.
  Instead ``[0, n)`` is cut into ``2**(D - k)`` blocks (``k = head_bits(D) = 8``), one per
  high part ``r_hi = r >> k`` of the remainder, of length ``L = floor(n / 2**(D - k))`` or one
  more; ``r_hi`` picks the block and only the low ``k`` bits ``r_lo`` go through the head, which
  pops the offset ``y`` within the block in base ``L``. This is the ``D = 16`` step with
  ``(d, n)`` replaced by ``(2**k, L)``: head interval ``[2**k, 2**(32 + k))``, the same 32-bit
  chunks, products below ``2**(32 + 2k)``, and ``|v' - v * n / d| < L + 1 <= 2**k + 1`` grid
  units whatever ``D``. It stores ``log2(2**k / L)`` bits, ``log2(d / n)`` on average over the
  blocks (to within ``1 / (8 L**2 ln 2)`` bits, by Jensen's inequality on ``L``, which varies
  by at most 1); a value that stays in one block (within ``2**31`` units of 0) stores that
  block's ``log2(2**k / L)``, at most ``log2(256 / 255) = 0.0056`` bits more than the bound
  (block 0, where states stuck at 0 stay, is one of the longer ones: no more). The blocks are
  non-empty for ``n >= 2**(D - k)``: factors of at least 2**-8.

  Args:
    stack: the ``BitStack`` (its ``bound`` an upper bound on the heads).
    values: int64 arrays shaped like the stack's head groups, the values to scale (any sign;
      floor division and modulo).
    numerators: one uint64 ``n`` per group, in ``[2**(D - k), 2**D]``, a scalar or an array
      that broadcasts against it.
    min_base: float64 [], the smallest ``head_bases`` of the numerators.
    denominator_bits: static ``D`` per group (16 when ``None``), all with one ``head_bits``.
    shards: ``None`` (one stack) or a ``_sharding.Shards``: then each device multiplies its own
      lanes with its own tail.

  Returns:
    ``(stack, values')`` with ``|v' - v * n / d| < min(n, 2**k + 1)``; ``divide`` undoes it.
  """
  if shards is not None:
    return _rans_on_devices(multiply, stack, values, numerators, min_base, denominator_bits,
                            shards)
  if denominator_bits is None:
    denominator_bits = (DENOMINATOR_BITS,) * len(values)
  k = _uniform_head_bits(denominator_bits)
  parts = []  # per group: (quotient, low remainder, block start, base) of the rANS step
  for v, n, bits in zip(values, numerators, denominator_bits):
    quotient = v >> bits  # floor division by d (arithmetic shift)
    remainder = (v & (2**bits - 1)).astype(jnp.uint64)  # floor modulo by d, in [0, d)
    if bits == k:
      parts.append((quotient, remainder, None, n))
    else:
      start, base = _blocks(remainder >> k, n, bits - k)
      parts.append((quotient, remainder & (2**k - 1), start, base))
  # Before: head in [B, H) = [2**k, 2**(32 + k)). Spill where head >= 2**32 * L, so that
  # afterwards head < 2**32 * L, and head >= L everywhere (a spilled head was >= 2**32 * L;
  # others are >= B >= L). While the bound shows that no head is near a threshold, the masks,
  # the scan and the scatter are skipped: spills cluster in a few steps, since all heads grow
  # at the same rate.
  stack = _at_most_once(
      stack.bound >= min_base * 2.0**CHUNK_BITS,
      lambda st: _spill(st, [h >= (p[3] << CHUNK_BITS) for h, p in zip(st.head, parts)]), stack)
  heads, out = [], []
  for head, (quotient, low, start, base), n in zip(stack.head, parts, numerators):
    s = (head << k) + low  # < 2**32 * L * 2**k <= 2**(32 + 2k) <= 2**64: no uint64 overflow.
    # head < 2**48 and low < 2**k convert exactly; their sum rounds once, like s would.
    s_float = exact_float(head) * 2.0**k + exact_float(low)
    # head' = s // L >= head * 2**k / L >= 2**k = B, and < H: a quotient below 2**48.
    head, _ = divmod_small_quotient(s, base, s_float)
    # The values' kernel reads the new heads as stored, rather than dividing again.
    head = jax.lax.optimization_barrier(head)
    x = s - head * (base & _CHUNK_MASK)  # in [0, L)
    if start is not None:
      x = start + x  # in [0, n): the block of r_hi
    heads.append(head)
    # n <= 2**31: masked so that the compiler multiplies 32 by 64 bits.
    out.append(quotient * (n & _CHUNK_MASK).astype(jnp.int64) + x.astype(jnp.int64))
  # head' <= (head + 1) * 2**k / L.
  bound = (stack.bound + 1) * (2.0**k / min_base) * (1 + _SLACK)
  return stack._replace(head=heads, bound=bound), out


def divide(stack, values, numerators, min_base, denominator_bits=None, shards=None):
  """Exact inverse of ``multiply``: pop the remainder back, push the popped symbol.

  ``stack.bound`` must be a lower bound on the heads (``for_popping``).
  """
  if shards is not None:
    return _rans_on_devices(divide, stack, values, numerators, min_base, denominator_bits,
                            shards)
  if denominator_bits is None:
    denominator_bits = (DENOMINATOR_BITS,) * len(values)
  k = _uniform_head_bits(denominator_bits)
  heads, out = [], []
  for head, v, n, bits in zip(stack.head, values, numerators, denominator_bits):
    quotient, x = floor_divmod(v, n.astype(jnp.int64))  # x in [0, n)
    x = x.astype(jnp.uint64)
    if bits == k:
      s = head * n + x  # head in [B, H), n <= 2**k: s < 2**(32 + 2k) <= 2**64.
      heads.append(s >> k)
      out.append((quotient << bits) + (s & (2**k - 1)).astype(jnp.int64))
      continue
    shift = bits - k
    # The block holding x: the largest r_hi with ceil(r_hi * n / 2**shift) <= x, i.e.
    # r_hi * n <= x * 2**shift. Every block is non-empty, so x lies inside it.
    r_hi = (x << shift) // n
    start, base = _blocks(r_hi, n, shift)
    s = head * base + (x - start)  # head < H = 2**(32 + k), L <= 2**k: s < 2**64.
    heads.append(s >> k)
    remainder = (r_hi << k) | (s & (2**k - 1))
    out.append((quotient << bits) + remainder.astype(jnp.int64))
  # head = floor(s / 2**k) >= head' * L / 2**k - 1.
  bound = (stack.bound * (min_base / 2.0**k) - 1) * (1 - _SLACK)
  stack = stack._replace(head=heads, bound=bound)
  # A lane spilled in the forward step exactly when its head is now below B.
  stack = _at_most_once(bound < 2.0**k,
                        lambda st: _refill(st, [h < 2**k for h in st.head]), stack)
  return stack, out


def stored_bits(stack, k=HEAD_LOW_BITS, shards=None):
  """Information held by the stack, in bits: 32 per tail chunk plus log2(head / B) per lane.

  Sharded: summed over the devices, so the copies of replicated lanes count once each.
  """
  if shards is not None:
    return jnp.sum(_per_device_value(lambda st: stored_bits(st, k), shards, stack))
  # An empty lane holds exactly 0 bits; a fused log2 need not return exactly k for B.
  in_heads = sum(jnp.sum(jnp.where(h == 2**k, 0.0, jnp.log2(h.astype(jnp.float64)) - k))
                 for h in stack.head)
  return stack.ptr.astype(jnp.float64) * CHUNK_BITS + in_heads


def is_empty(stack, k=HEAD_LOW_BITS, shards=None):
  """True when every head is back at ``B = 2**k`` and the tail holds nothing (every device)."""
  if shards is not None:
    return jnp.all(_per_device_value(lambda st: is_empty(st, k), shards, stack))
  empty_heads = [jnp.all(h == 2**k) for h in stack.head]
  return functools.reduce(jnp.logical_and, empty_heads, stack.ptr == 0)


def information_bits(numerators, denominator_bits=DENOMINATOR_BITS):
  """``log2(d / n)``: the bits one multiply by ``n / d`` must store, per lane (numpy)."""
  return denominator_bits - np.log2(np.asarray(numerators, np.float64))


def max_chunks_per_lane(numerators, denominator_bits=DENOMINATOR_BITS):
  """A deterministic upper bound on the chunks one lane spills over a schedule of multiplies.

  A multiply by ``n / 2**D`` pops a base ``L >= L_min = head_bases(n, D)`` (``n`` when
  ``D = 16``) and grows ``log2(head) + 32 * spills`` by less than
  ``log2(2**k / L_min) + log2(1 + 1 / head_before)``, ``k = head_bits(D)``.
  ``head_before >= B = 2**k`` except just after a spill, where ``head_before >= L`` and the
  excess is at most ``log2(1 + 1 / min_t L_min)``, and the final head is at least ``B``. With
  ``S = sum_t log2(2**k / L_min_t)`` and K spills:
  ``32 K <= S + T * log2(1 + 2**-k) + K * log2(1 + 1 / min_t L_min_t)``.

  Args:
    numerators: ints, the numerators ``n_t`` of the schedule, one lane's, in
      ``[2**(D - 16), 2**D]``.
    denominator_bits: ``D``.

  Returns:
    int, K_max.
  """
  numerators = np.asarray(numerators, np.int64).reshape(-1)
  if numerators.size == 0:
    return 0
  k = head_bits(denominator_bits)
  bases = head_bases(numerators, denominator_bits).astype(np.float64)
  total = information_bits(bases, k).sum() + numerators.size * np.log2(1 + 2.0**-k)
  per_spill = CHUNK_BITS - np.log2(1 + 1 / bases.min())
  # A tiny slack guards the float evaluation of the bound itself.
  return int(np.floor(total / per_spill + 1e-9))


def bucket(chunks):
  """Rounds a capacity up to 2**k or 3 * 2**(k - 1), so small schedule changes reuse a program."""
  if chunks <= 2:
    return int(chunks)
  power = 1 << (int(chunks) - 1).bit_length()
  three_quarters = 3 * power // 4
  return three_quarters if chunks <= three_quarters else power
