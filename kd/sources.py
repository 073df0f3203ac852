"""The target-source contract: every teacher emits a B x K probability matrix for a batch.

A source is an ``nn.Module`` so that learnable sources (LS++'s C logits) live inside the
module that accelerate prepares. Label-only sources are a K x K table T: integer labels y
give T[y], soft labels m (mixup, cutmix) give m @ T.
"""
from __future__ import annotations

import torch
from torch import nn

from kd.losses import soft_cross_entropy


class TargetSource(nn.Module):
    """Base class. Subclasses implement :meth:`targets`; :meth:`loss_terms` trains on them."""

    #: True when the source needs the batch inputs (a network teacher).
    needs_inputs: bool = False
    #: True when the source needs the sample indices (cached teacher outputs).
    needs_index: bool = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)

    def targets(
        self,
        labels: torch.Tensor,
        *,
        inputs: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return B x K target probabilities (no gradient) for a batch."""
        raise NotImplementedError

    def loss_terms(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        inputs: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Named loss terms for the trainer to sum and log; default: CE against the targets."""
        t = self.targets(labels, inputs=inputs, index=index)
        return {"ce": soft_cross_entropy(logits, t)}


class TableSource(TargetSource):
    """A label-only source given by a fixed K x K row-stochastic table T (targets = T[y])."""

    def __init__(self, table: torch.Tensor):
        table = torch.as_tensor(table, dtype=torch.float32)
        if table.ndim != 2 or table.shape[0] != table.shape[1]:
            raise ValueError(f"a target table must be K x K, got shape {tuple(table.shape)}")
        super().__init__(table.shape[0])
        self.register_buffer("table", table, persistent=False)

    def targets(self, labels, *, inputs=None, index=None):
        if labels.is_floating_point():  # soft labels m: B x K
            return labels.to(self.table.dtype) @ self.table
        return self.table.index_select(0, labels)  # a row gather; cheaper than table[labels]


def one_hot_table(num_classes: int) -> torch.Tensor:
    return torch.eye(num_classes)


def smoothing_table(num_classes: int, alpha: float) -> torch.Tensor:
    """(1 - alpha) * I + alpha / K: alpha spread uniformly over all K classes."""
    return (1.0 - alpha) * torch.eye(num_classes) + alpha / num_classes


def proxy_table(c_matrix: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * I + alpha * C: row y is the PT-LS++ target for class y."""
    c = torch.as_tensor(c_matrix, dtype=torch.float32)
    return (1.0 - alpha) * torch.eye(c.shape[0]) + alpha * c
