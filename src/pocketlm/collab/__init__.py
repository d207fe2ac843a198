"""CoMiGS collaboration: devices (bi-level local update), the server, strategies, in-process simulation."""

from .client import Device, bound, cosine_factor
from .config import ConfigError, TrainConfig, load_config
from .experiment import Workspace, compare, run_strategy
from .server import RoundReport, Server, Upload
from .simulation import Simulation
from .strategies import STRATEGIES, Strategy, experts_per_user, get_strategy

__all__ = [
    "STRATEGIES", "ConfigError", "Device", "RoundReport", "Server", "Simulation", "Strategy", "TrainConfig",
    "Upload", "Workspace", "bound", "compare", "cosine_factor", "experts_per_user", "get_strategy",
    "load_config", "run_strategy",
]
