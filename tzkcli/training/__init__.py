"""Training: the configuration, the loop, checkpoints, the data order, distributed set-up.

``start_run(store, run, config)`` trains a new run; ``resume_run(run, flags)`` continues one.
See ``docs/training.md``.
"""

from tzkcli.training.config import TrainConfig, read_config_file, resolve
from tzkcli.training.loop import TrainResult, resume_run, start_run

__all__ = ["TrainConfig", "TrainResult", "read_config_file", "resolve", "resume_run",
           "start_run"]
