"""The state types as ``jax.export`` serializes them, registered once when jaxbn is imported.

``jax.export`` serializes pytrees of lists, tuples, dicts and ``None`` by itself; a
NamedTuple in a function's inputs or outputs needs a registered name, under which
deserialization finds the type again. The names are stable (``"jaxbn.<Type>"``), independent
of the module a type is defined in, so that serialized functions stay loadable when the code
moves.

Example:

>>> import jax, jax.numpy as jnp, jaxbn
>>> params, stats = jaxbn.init(3)
>>> f = jax.jit(lambda x, p, s: jaxbn.batch_norm(x, p, s, training=True))
>>> blob = jax.export.export(f)(jnp.ones((4, 3)), params, stats).serialize()
>>> y, new = jax.export.deserialize(blob).call(jnp.ones((4, 3)), params, stats)
>>> type(new).__name__
'BatchStats'
"""

from __future__ import annotations

from jax import export

from jaxbn.core import BatchNormParams, BatchStats, Moments, Renorm
from jaxbn.precise import Population

#: Every public state NamedTuple and the name it is serialized under.
SERIALIZED_NAMES = {cls: f"jaxbn.{cls.__name__}"
                    for cls in (BatchNormParams, BatchStats, Moments, Renorm, Population)}

for _cls, _name in SERIALIZED_NAMES.items():
    export.register_namedtuple_serialization(_cls, serialized_name=_name)
