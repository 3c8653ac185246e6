"""Records of a tfds dataset under tfds.testing.mock_data (no TensorFlow, no download)."""

import tensorflow_datasets as tfds


def mocked_records(dataset: str, num_examples: int):
    """Generator for a fixture: yields {split: records} inside mock_data, so that the task
    reads the same generated records through tfds.data_source."""
    with tfds.testing.mock_data(num_examples=num_examples):
        yield {s: [tfds.data_source(dataset, split=s)[i] for i in range(num_examples)]
               for s in ("train", "test")}


def tiny_data(config_module, **over):
    """The data part of a task's `tiny` config, with fields `over` changed."""
    c = config_module.get_config("tiny").data
    c.update(over)
    return c
