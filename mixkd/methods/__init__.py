"""The built-in KD methods, one module each (see :mod:`mixkd.distiller` for the contract): importing
this package registers them in :data:`mixkd.registry.KD_METHODS`, in this order (the order of
``--help``, of the report's columns and of the claims)."""

# isort: skip_file
from mixkd.methods import alone, kd, std, dkd, lskd, lsdkd, dist, fitnet  # noqa: F401, I001  (each registers itself)
# mdistiller's feature methods (distillers/*.py) and CTKD
from mixkd.methods import at, nst, sp, pkt, rkd, kdsvd, vid, ofd, reviewkd, crd, ctkd  # noqa: F401, I001
# MLKD (its weak and strong views: Distiller.inputs)
from mixkd.methods import mlkd  # noqa: F401, I001
