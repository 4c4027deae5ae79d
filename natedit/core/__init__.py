"""The sans-I/O core: bytes, a direction and ``now`` in; a verdict and events out.

Nothing here imports anything outside :mod:`natedit.core` but the pure
modules of the standard library: no sockets, threads, clocks, files or YAML.
The edges (:mod:`natedit.worker`, :mod:`natedit.policyfile`, ...) do the I/O.
"""
