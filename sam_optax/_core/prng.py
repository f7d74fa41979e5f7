"""PRNG keys kept in a transform's state, so that every step draws afresh."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

KeyLike = Union[int, jax.Array]


class RandomKeyState(NamedTuple):
  """The state of a part that draws random numbers.

  Attributes:
    key: raw ``uint32`` data of the PRNG key for the next step (see
      ``jax.random.key_data``). It is advanced at every ``update``, so every
      step draws fresh random numbers. Stored raw, it checkpoints and passes
      through ``jax.tree`` utilities like any other array.
  """

  key: jax.Array


class PRNG(NamedTuple):
  """How a factory's ``key`` argument is turned into state (internal)."""

  caller: str
  key: Any
  impl: Optional[Any]

  @classmethod
  def of(cls, caller: str, key: KeyLike) -> PRNG:
    """Checks ``key``: a non-negative int seed, a typed key or a raw uint32 key."""
    if isinstance(key, bool) or key is None:
      raise ValueError(_bad_key(caller, key))
    if isinstance(key, int):
      if key < 0:
        raise ValueError(_bad_key(caller, key))
      return cls(caller, key, None)
    dtype = getattr(key, "dtype", None)
    if dtype is None:
      raise ValueError(_bad_key(caller, key))
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      if jnp.shape(key) != ():
        raise ValueError(_bad_key(caller, key))
      return cls(caller, key, jax.random.key_impl(key))
    if np.issubdtype(dtype, np.integer):
      shape = jnp.shape(key)
      if shape == ():  # an int seed as an array (optax.inject_hyperparams)
        return cls(caller, key, None)
      if dtype == np.uint32 and len(shape) == 1:  # legacy raw key
        return cls(caller, key, None)
    raise ValueError(_bad_key(caller, key))

  def init(self) -> RandomKeyState:
    key = self.key
    if not jax.dtypes.issubdtype(
        getattr(key, "dtype", np.int32), jax.dtypes.prng_key
    ):
      if jnp.shape(key) == ():
        key = jax.random.key(key)
      else:
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    return RandomKeyState(key=jax.random.key_data(key))

  def split(
      self, state: RandomKeyState, num: int
  ) -> tuple[RandomKeyState, jax.Array]:
    """Advances the state and returns ``num`` fresh keys for this step.

    The keys depend on ``state`` only: called twice with the same state (as
    several ascent steps do), it returns the same keys.
    """
    key = jax.random.wrap_key_data(state.key, impl=self.impl)
    key, sub = jax.random.split(key)
    return RandomKeyState(key=jax.random.key_data(key)), jax.random.split(
        sub, num
    )


def _bad_key(caller: str, key: Any) -> str:
  return (
      f"`{caller}`: `key` must be a non-negative int seed or a JAX PRNG key"
      " (`jax.random.key(seed)`, or a legacy uint32 key from"
      f" `jax.random.PRNGKey`); got key={key!r}."
  )
