"""Sparse autoencoders (SAEs) over MLP activations: architectures, training, metrics.

An SAE writes an activation ``x [d_in]`` as a sparse, nonnegative code ``z [n_latents]`` over a
dictionary of unit-norm decoder rows: ``x ≈ z @ W_dec + b_dec``. Each latent is then mapped like
a neuron (statistics, top-k examples) by the flows.

Architectures live in a registry (:data:`ARCHITECTURES`, :func:`register`) and differ only in
the activation and the sparsity term of the loss:

- ``topk``: keep the k largest pre-activations per token (Gao et al. 2024), plus AuxK;
- ``batchtopk``: keep the ``B*k`` largest over the whole batch while training and a learned
  threshold at inference (Bussmann et al. 2024), plus AuxK;
- ``relu``: ReLU with an L1 penalty weighted by decoder-row norms;
- ``jumprelu``: per-latent thresholds trained through straight-through estimators with an L0
  penalty (Rajamanoharan et al. 2024).

Training needs no activation dump: :func:`train` consumes any iterable of batches, e.g. a
:class:`ShuffleBuffer` over activations streamed live from the model, or :func:`sample_batches`
over the stored activation sample. It checkpoints model, optimiser and dead-latent counters
together, and a resumed run equals an uninterrupted one on the same data order.

Losses are computed on inputs scaled to unit mean squared norm (``normalize_input``) so that
``l1_coef`` / ``jumprelu_l0_coef`` mean the same thing at every layer; :meth:`SAE.encode` takes
and :meth:`SAE.decode` returns activations in their original units.

TopK and BatchTopK train without a dense ``[B, n_latents]`` code: the selected latents are kept
as (row, latent, value) entries and decoded by :func:`sparse_decode`, which gathers their
decoder rows (forward), and in the backward pass takes the values' gradient as dot products
with the same rows and ``W_dec``'s as per-latent sums of gradient rows: ``O(B·k·d_in)`` instead
of ``O(B·n·d_in)``. AuxK decodes its dead latents the same way. On CUDA the forward runs under
bfloat16 autocast (``SAEConfig.autocast``) with float32 master weights.

The package, one job a module:

    sparse    the sparse decoder (TopK-style codes as entries, explicit backward)
    archs     the SAE base class, the registry and the registered kinds
    data      shuffle buffer, streamed batches, sample batches
    training  the loop, its state, checkpoints
    metrics   FVU, L0, dead fraction, CE loss recovered
"""

from ops.configs import ARCHITECTURES, SAEConfig
from ops.sae.archs import (
    CHECKPOINT_FORMAT,
    INIT_TOKENS,
    SAE,
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    TopKSAE,
    build_sae,
    geometric_median,
    jumprelu,
    register,
    step_fn,
)
from ops.sae.data import ShuffleBuffer, StreamBatches, sample_batches, shuffled
from ops.sae.metrics import ce_loss_recovered, ce_losses, metrics, splice, thin
from ops.sae.sparse import sparse_decode
from ops.sae.training import (
    TrainState,
    from_weights,
    load_checkpoint,
    save_checkpoint,
    train,
)

__all__ = [
    "ARCHITECTURES",
    "CHECKPOINT_FORMAT",
    "INIT_TOKENS",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAE",
    "SAEConfig",
    "ShuffleBuffer",
    "StreamBatches",
    "TopKSAE",
    "TrainState",
    "build_sae",
    "ce_losses",
    "from_weights",
    "ce_loss_recovered",
    "geometric_median",
    "jumprelu",
    "load_checkpoint",
    "metrics",
    "register",
    "sample_batches",
    "save_checkpoint",
    "shuffled",
    "splice",
    "sparse_decode",
    "step_fn",
    "thin",
    "train",
]
