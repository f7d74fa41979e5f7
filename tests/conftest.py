"""Eight fake CPU devices for the data-parallel tests.

Set before any backend is initialized; single-device tests run on the first.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
