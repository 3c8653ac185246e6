"""Train and evaluate any attention variant on any LRA task.

    python train.py --config=configs/listops.py:performer --workdir=runs/listops_performer
    python train.py --config=configs/listops.py:dense,tiny --workdir=/tmp/tiny \\
        --config.train.steps=50

Outputs in --workdir: metrics.jsonl, results.json, config.json, tensorboard/, checkpoints/.
Re-running the same command resumes from the latest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from training.loop import train_and_evaluate  # noqa: F401  (the API tests and tools call)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Task config file and its argument, e.g. configs/listops.py:performer,tiny",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
