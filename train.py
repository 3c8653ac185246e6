"""Train and evaluate any attention variant on any LRA task.

    python train.py --config=configs/listops.py:performer --workdir=runs/listops_performer
    python train.py --config=configs/listops.py:dense,tiny --workdir=/tmp/tiny \\
        --config.train.steps=50

Outputs in --workdir: metrics.jsonl, results.json, config.json, tensorboard/, checkpoints/.
Re-running the same command resumes from the newest good checkpoint. A config file is Python
that runs when it is loaded: use config files you trust.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from training.checkpoint import CheckpointError
from training.loop import ConfigError, NonFiniteError, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Task config file and its argument, e.g. configs/listops.py:performer,tiny",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, NonFiniteError, CheckpointError) as e:
        # Expected ways for a run to stop: the message says what happened and what to do.
        print(f"train.py: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
