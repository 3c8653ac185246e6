"""float64 numpy versions of the model's layers, read from a built NNX model (the references of
the global-token and Transformer-XL tests)."""

import numpy as np


def param(a):
    """An NNX variable's value as float64 numpy."""
    return np.asarray(a[...], np.float64)


def layer_norm(x, norm):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + norm.epsilon) * param(norm.scale) + param(norm.bias)


def linear(x, lin):
    y = x @ param(lin.kernel)
    return y + param(lin.bias) if lin.bias is not None else y


def gelu(x):
    """jax.nn.gelu's default (tanh approximation)."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
