"""rayfed: personalized federated learning of transformers on Ray.

Example:
    >>> from rayfed import Federation, load_config
    >>> cfg = load_config(None, ["algorithm.name=fedper", "rounds=5"])
    >>> result = Federation(cfg).fit()    # doctest: +SKIP
"""

from rayfed.algorithms import Algorithm, available, register_algorithm
from rayfed.clients import ClientSpec, Structure
from rayfed.config import FederationConfig, dump_config, from_dict, load_config, to_dict
from rayfed.errors import ClientError, ConfigError
from rayfed.federation import ComparisonResult, Federation, FederationResult, run_comparison
from rayfed.roles import Role, RoleMap, assign_roles
from rayfed.tensors import SparseTensor

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "ClientError",
    "ClientSpec",
    "ComparisonResult",
    "ConfigError",
    "Federation",
    "FederationConfig",
    "FederationResult",
    "Role",
    "RoleMap",
    "SparseTensor",
    "Structure",
    "assign_roles",
    "available",
    "dump_config",
    "from_dict",
    "load_config",
    "register_algorithm",
    "run_comparison",
    "to_dict",
]
