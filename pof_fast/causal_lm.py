"""Search rows of a causal language model: its final hidden states against the next token's label.

Framework-free (plain tensors), so a custom training loop uses it without Transformers; the Transformers
callback (:mod:`pof_fast.integrations.transformers`) calls it too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _validate as check

__all__ = ["causal_lm_rows"]


def causal_lm_rows(hidden_states: Tensor, labels: Tensor, *, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """``(features, target)`` for :meth:`pof_fast.PoF.perturb` from a causal LM's hidden states and labels.

    hidden_states: ``[B, T, D]`` (or ``[..., T, D]``), the decoder's final hidden states **after** its last
    norm (what the LM head reads: ``last_hidden_state`` in Transformers). labels: ``[B, T]`` token ids, with
    ``ignore_index`` (-100) on the tokens the loss skips (padding, prompts), as a Transformers data collator
    writes them: **unshifted**, ``labels[b, t]`` is token t itself.

    Position t predicts token t + 1, exactly as the models' own loss pairs them: the target is ``labels``
    shifted left by one, with ``ignore_index`` at the last position of each sequence, so no row pairs across
    sequences and every ignored token stays ignored. Returns ``hidden_states`` itself (no copy; its rows are
    searched over its leading dimensions) and the ``[B, T]`` int64 target (a new tensor; ``labels`` is not
    modified). No host synchronisation.
    """
    check.row_features("hidden_states", hidden_states)
    if hidden_states.dim() < 3:
        raise ValueError(f"hidden_states must have shape [B, T, D] (batch, tokens, hidden size), got "
                         f"{tuple(hidden_states.shape)}")
    check.integer("ignore_index", ignore_index)
    tokens = tuple(hidden_states.shape[:-1])
    check.target_tensor(labels, tokens)  # integer labels of the hidden states' leading shape
    check.same_device(hidden_states=hidden_states, labels=labels)
    labels = labels.long()
    last = labels.new_full(tokens[:-1] + (1,), ignore_index)
    return hidden_states, torch.cat([labels[..., 1:], last], dim=-1)
