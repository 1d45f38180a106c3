"""Training: :func:`train` (also ``pyens.train``), the methods of Table 6, configs, runs.

The trainer lives in ``pyens.training`` so that ``pyens.train`` can be the function users
call: ``pyens.train("mat", dataset="mnist", epochs=5)``.
"""
from pyens.training.config import TrainConfig, config_names, load_config
from pyens.training.counting import count_passes
from pyens.training.loop import TrainResult, train
# Both method families register themselves in method_base.METHODS on import.
from pyens.training import dml_methods, methods  # noqa: F401
from pyens.training.method_base import METHODS, get_method
from pyens.training.run import Run, build_network, classifier, load_run

__all__ = ["METHODS", "Run", "TrainConfig", "TrainResult", "build_network", "classifier", "config_names",
           "count_passes", "get_method", "load_config", "load_run", "train"]
