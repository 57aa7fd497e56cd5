"""Inference from prior log-densities: posteriors within a kind, single-condition existence.

Both take log-densities of the residuals already computed (``ConditionPriors.log_prob``), so
they add no flow pass. The flow's ladj is shared by every prior and cancels here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def posterior_logits(
    log_prior: Tensor, log_rates: Tensor, admissible: Tensor | None = None
) -> Tensor:
    """Unnormalised ``log pi_k + log p_k(r)`` over a kind's values, ``-inf`` where inadmissible.

    Args:
        log_prior: ``[B, V]`` ``log p_k(r)`` of the kind's conditions, in value order.
        log_rates: ``[V]`` ``log pi`` of the kind (``KnowledgeRates.log_categorical``).
        admissible: bool ``[B, V]`` values each image may take (its dataset's domain row);
            None allows every value.
    """
    logits = log_prior + log_rates.to(log_prior)
    if admissible is not None:
        logits = logits.masked_fill(~admissible, float("-inf"))
    return logits


def posterior(log_prior: Tensor, log_rates: Tensor, admissible: Tensor | None = None) -> Tensor:
    """``p(k | x) ∝ pi_k p_k(r)`` within one kind, restricted to admissible values, ``[B, V]``.

    Each row sums to one, except rows with no admissible value (the kind does not apply to
    that image), which are all zero.
    """
    logits = posterior_logits(log_prior, log_rates, admissible)
    applies = torch.isfinite(logits).any(dim=1, keepdim=True)
    safe = torch.where(applies, logits, torch.zeros_like(logits))
    return torch.where(applies, torch.softmax(safe, dim=1), torch.zeros_like(logits))


def existence(log_prior: Tensor, log_base: Tensor, rate: Tensor) -> Tensor:
    """``p(e_k = 1 | x) = sigmoid(logit pi_k + log p_k(r) - log p_0(r))``, ``[B, K]``.

    Args:
        log_prior: ``[B, K]`` ``log p_k(r)``; log_base: ``[B]`` ``log p_0(r)``;
        rate: ``[K]`` prior existence probabilities (``KnowledgeRates.existence``).
    """
    rate = rate.to(log_prior)
    return torch.sigmoid(torch.logit(rate) + log_prior - log_base[:, None])
