"""Fast kernels behind the backend registry, installed as ``arrayattn.backends``.

Each subpackage (``numba``, ``cupy``, ``numba_cuda``) exposes ``KERNELS: dict[op name, Kernel]``
and is imported only when a call could run on it, so importing arrayattn imports none of numba,
cupy or numba-cuda.

The public function ``arrayattn.backends()`` and this subpackage share one name (both are fixed by
the design), so the subpackage is callable: ``arrayattn.backends()`` reports every backend, whether
it is available here and why not (see :func:`arrayattn._registry.backends`).
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self):
        from arrayattn._registry import backends

        return backends()


sys.modules[__name__].__class__ = _CallableModule
