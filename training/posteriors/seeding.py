"""Rows of a batch grouped by seed, for methods that draw whole weight matrices per seed.

A draw of weights belongs to one (seed, draw index) pair, so rows that share a seed must be
multiplied by the same weights and rows with different seeds by independent ones. Grouping the
rows into a padded [U, R] layout (U unique seeds, R the most rows any seed has) turns that into
one batched matmul over [n, U] weight draws, with no per-row copy of a weight matrix and no
Python loop; `gather` puts the results back in batch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeedGroups:
    unique: torch.Tensor  # [U] distinct seeds, ascending
    group: torch.Tensor  # [B] which seed each row has (index into `unique`)
    slot: torch.Tensor  # [B] the row's position within its group
    rows: torch.Tensor  # [U, R] batch row at each (group, slot); padding repeats row 0

    @classmethod
    def of(cls, seeds: torch.Tensor) -> SeedGroups:
        unique, group = torch.unique(seeds, return_inverse=True)
        counts = torch.bincount(group, minlength=len(unique))
        order = torch.argsort(group, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(group)
        slot[order] = torch.arange(len(group), device=seeds.device) - starts[group[order]]
        rows = torch.zeros(len(unique), int(counts.max()), dtype=torch.long, device=seeds.device)
        rows[group, slot] = torch.arange(len(group), device=seeds.device)
        return cls(unique, group, slot, rows)

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """Rows [B, ...] -> grouped [U, R, ...]."""
        return x[self.rows]

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """Grouped results [n, U, R, ...] -> batch order [n, B, ...]."""
        return y[:, self.group, self.slot]
