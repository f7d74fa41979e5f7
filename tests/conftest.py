"""Eight fake CPU devices for the data-parallel tests, and fast compiles.

Set before any backend is initialized; single-device tests run on the first.

The suite compiles thousands of small programs and runs each a few times, so
LLVM's optimization passes cost more than they save: they are turned off
(``--xla_backend_optimization_level=0``, about half the suite's time). XLA's
graph-level passes still run and floating-point semantics are unchanged
(fast math stays off), so results are those of an optimized build; FLOP
counts and buffer sizes come from the graph and do not change either.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    filter(None, (os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"))
)

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_num_cpu_devices", 8)
