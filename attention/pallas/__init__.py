"""Pallas kernels (GPU through the Triton lowering; interpret mode on a CPU).

Importing this package registers each kernel as the `impl="pallas"` implementation of its
variant (attention.register_pallas), with the variant's own signature plus kernel tile sizes:
  block_sparse  one block-sparse flash attention for dense, local, strided, sparse,
                sparse_fixed, longformer, bigbird (block lists from block_mask)
  linear        chunked linear attention for linear and performer
  gla           chunked gated linear attention (per-channel decay) for gla
  delta         the chunked delta rule (WY form) for deltanet and gated_deltanet
  diff          differential attention as two dense flash calls
  selected      sliding_sink (static layout + learned sink), moba (per-row block selection),
                nsa (moba's + local's kernels) and mixture (members' kernels)
"""

from attention.pallas import (block_mask, block_sparse, delta, diff, gla,  # noqa: F401
                              linear, selected)
