"""MC dropout on an MLP, the fast path of `training.posteriors.dropout.DropoutNet`: the same
masks from the counter-based generator, its own kernels (addmm with the dropout scale as
alpha, masks ANDed into the activations' bits, cache-sized chunks of draws, per-request
products laid out as they are alone)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import rng, segments
from training.model import NoFeatures, PosteriorModel
from training.pointwise import ACTIVATIONS, IN_PLACE_ACTIVATIONS

_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
CHUNK_BYTES = 1 << 20  # per activation tensor, half a core's L2 on the benchmark machine


class MCDropoutMLP(PosteriorModel):
    """MLP with dropout kept on at prediction time (Gal & Ghahramani 2016).

    The prior length-scale l gives the weight decay l^2 (1 - p) / (2 N) per weight matrix on
    a per-example negative log-likelihood, which is Gal's l^2 (1 - p) / (2 N tau) on the
    squared-error scale.
    """

    method = "mc_dropout"

    def __init__(self, arch: dict, likelihood: dict, normalization: dict):
        super().__init__(arch, likelihood, normalization)
        widths = [arch["in_features"], *arch["hidden"], self.head.raw_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.p = float(arch["dropout"])
        self.input_dropout = bool(arch.get("input_dropout", False))
        self.lengthscale = float(arch.get("prior_lengthscale", 1e-2))
        self.activation_name = arch.get("activation", "relu")
        self.activation = ACTIVATIONS[self.activation_name]

    def _dropped(self, i: int) -> bool:
        return self.p > 0 and (i > 0 or self.input_dropout)

    def to_precision(self, dtype: torch.dtype) -> MCDropoutMLP:
        """Serve the layers' weights and activations in bfloat16 or float16 (products
        accumulate in float32 on AMX and tensor cores), not the normalization or the
        likelihood head, so inputs are standardized and draws rescaled in float32. Masks
        are the same bits."""
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(
                f"MC-dropout layers serve in float32, bfloat16 or float16, not {dtype}"
            )
        self.layers.to(dtype)
        return self

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's activations without dropout: [1, B, D]."""
        if len(self.layers) < 2:
            raise NoFeatures("a network without hidden layers has no feature layer to embed")
        h = z.to(self.layers[0].weight.dtype)
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        return h.float().unsqueeze(0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            if self._dropped(i):
                h = F.dropout(h, self.p, training=True)
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h

    def batch_draws(self, x: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        """The whole batch in each product, every row's masks made from its own seed. No
        step's size depends on the seeds' values or on the requests, so nothing waits for the
        device: this is what a CUDA graph can capture (service.cuda_graphs).

        Layers before the first dropout run once for all draws; the rest run on chunks of
        draws small enough that each layer's activations stay in a core's L2 cache."""
        z = self.normalizer.inputs(x)
        keep, activation = 1 - self.p, self.activation_name
        plan = [  # (layer, keys of its input's dropout masks or None)
            (layer, rng.draw_keys(seeds, n, stream=i) if self._dropped(i) else None)
            for i, layer in enumerate(self.layers)
        ]
        h = z.to(self.layers[0].weight.dtype)
        while plan and plan[0][1] is None:  # before the first dropout: the same for every draw
            layer, _ = plan.pop(0)
            h = _linear(h, layer, 1.0, activation if plan else None)
        if not plan:  # no dropout at all
            return h.unsqueeze(0).expand(n, *h.shape)
        widest = max(layer.in_features for layer, _ in plan)
        step = max(1, CHUNK_BYTES // (z.shape[0] * widest * h.element_size()))
        chunks = []
        for start in range(0, n, step):
            g = h.unsqueeze(0)  # [1, B, width]: broadcast to [draws, B, width] by the mask
            for j, (layer, keys) in enumerate(plan):
                scale = 1.0
                if keys is not None:
                    g = _dropout(g, keys[start : start + step], keep)
                    scale = 1 / keep
                g = _linear(g, layer, scale, activation if j < len(plan) - 1 else None)
            chunks.append(g)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def raw_draws_at(self, z: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Draw s on its own inputs z[s] ([n, B, D]) with the same masks, as plain
        differentiable ops (the fast paths AND masks into the activations' bits, which
        autograd cannot follow): for attributions, not for serving."""
        n, keep = z.shape[0], 1 - self.p
        h = z.to(self.layers[0].weight.dtype)
        for i, layer in enumerate(self.layers):
            scale = 1.0
            if self._dropped(i):
                keys = rng.draw_keys(seeds, n, stream=i)
                h = h * (rng.bernoulli_bits(keys, layer.in_features, keep) != 0)
                scale = 1 / keep
            h = F.linear(h, layer.weight) * scale + layer.bias
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h

    def request_draws(
        self, x: torch.Tensor, n: int, seeds: torch.Tensor, sizes: Sequence[int]
    ) -> torch.Tensor:
        """Every request's draws, with each product a call over one request's rows.

        The elementwise work (masks, their AND, activations) runs once over blocks of
        requests whose activations fit a core's L2 cache (a large model's masks and
        activations are several passes over megabytes each); only the products are per
        request. See `_RequestPlan` for how every request's rows stay aligned as they are
        alone."""
        dtype = self.layers[0].weight.dtype
        element = torch.empty((), dtype=dtype).element_size()
        first = next((i for i in range(len(self.layers)) if self._dropped(i)), len(self.layers))
        pre, post = self.layers[:first], self.layers[first:]
        pre_widths = [*(layer.in_features for layer in pre), pre[-1].out_features] if pre else []
        post_widths = [layer.in_features for layer in post]
        budget_rows = max(1, CHUNK_BYTES // (max(post_widths) * element)) if post else 0
        plan = _request_plan(
            tuple(sizes),
            n,
            segments.row_multiple(pre_widths, element),
            segments.row_multiple(post_widths, element),
            budget_rows,
            x.device,
        )
        rows = plan.rows
        h = rows.pad(self.normalizer.inputs(x).to(dtype))
        for i, layer in enumerate(pre):  # a request's rows in calls of their own
            h = rows.linear(h, layer.weight.t(), layer.bias)
            if i < len(pre) - 1 or post:
                h = IN_PLACE_ACTIVATIONS[self.activation_name](h)
        if not post:  # no dropout at all: every draw is the same
            return h[rows.real].unsqueeze(0).expand(n, -1, -1)
        request_seeds = seeds[rows.request_starts]
        keys = [
            rng.draw_keys(request_seeds, plan.draws, first + j).view(-1) for j in range(len(post))
        ]
        keep, word = 1 - self.p, _SAME_SIZE_INT[element]
        biases = [layer.bias for layer in post]
        weights = [layer.weight.t() for layer in post]
        last = len(post) - 1
        outputs: list[torch.Tensor] = []
        for block in plan.blocks:
            g = h[block.source_rows]
            for j, layer in enumerate(post):
                bits = rng.bernoulli_bits(keys[j][block.unit_keys], layer.in_features, keep)
                if block.unit_of_row is not None:
                    bits = bits[block.unit_of_row]
                g.view(word).bitwise_and_(bits.to(word))
                pieces = g.split(block.piece_rows)
                if j == last:  # fresh outputs, read only by `assemble`
                    outputs.extend(
                        torch.addmm(biases[j], piece, weights[j], alpha=1 / keep)
                        for piece in pieces
                    )
                    break
                out = g.new_empty(g.shape[0], layer.out_features)
                for piece, into in zip(pieces, out.split(block.piece_rows), strict=True):
                    torch.addmm(biases[j], piece, weights[j], alpha=1 / keep, out=into)
                g = IN_PLACE_ACTIVATIONS[self.activation_name](out)
        return plan.assemble(torch.cat(outputs) if len(outputs) > 1 else outputs[0], n)

    def penalty(self, num_train: int) -> torch.Tensor:
        total = torch.zeros(())
        for i, layer in enumerate(self.layers):
            keep = 1 - self.p if self._dropped(i) else 1.0
            total = total + self.lengthscale**2 * keep / (2 * num_train) * layer.weight.pow(2).sum()
        return total


@dataclass(frozen=True)
class _Block:
    """Consecutive pieces whose activations share the cache: elementwise work runs over the
    block at once, each piece's products on their own."""

    source_rows: torch.Tensor  # the first dropout's input row each of the block's rows takes
    unit_keys: torch.Tensor  # each unit's (request, draw) position in the keys [draws, requests]
    unit_of_row: torch.Tensor | None  # each row's unit; None when every unit is one row
    piece_rows: list[int]


class _RequestPlan:
    """How `MCDropoutMLP.request_draws` lays out a batch's requests, made once per shape.

    Every request's rows start at an ALIGN_BYTES boundary of their tensor, as they do alone.
    Before the first dropout they are laid out by `segments.RequestRows`. After it, request
    i's draws are units of its r_i rows (draw-major), and it computes its n draws rounded up
    so that its rows come to a multiple of `q_post`; the extra draws are dropped (mask keys
    depend on the draw index, so the first n are the draws). A request larger than the
    cache budget is cut into pieces of draws by its own size, the same pieces in any batch.
    """

    def __init__(
        self,
        sizes: tuple[int, ...],
        n: int,
        q_pre: int,
        q_post: int,
        budget_rows: int,
        device: torch.device,
    ):
        def tensor(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device)

        r = np.asarray(sizes)
        self.rows = segments.request_rows(sizes, q_pre, device)  # before the first dropout
        starts = np.asarray(self.rows.starts)
        self.sizes, self.blocks = list(sizes), []
        if budget_rows == 0:
            return
        unit = q_post // np.gcd(r, q_post)  # draws whose r rows fill aligned blocks
        self.padded = (-(-n // unit) * unit).tolist()
        self.draws = max(self.padded)
        pieces = []  # (request, first draw, end draw)
        for i, (rows, draws, u) in enumerate(zip(sizes, self.padded, unit, strict=True)):
            per_piece = max(int(u), budget_rows // rows // u * u)
            pieces.extend((i, d, min(draws, d + per_piece)) for d in range(0, draws, per_piece))
        current: list[tuple[int, int, int]] = []
        used = 0
        for piece in [*pieces, None]:
            rows = 0 if piece is None else (piece[2] - piece[1]) * sizes[piece[0]]
            if current and (piece is None or used + rows > budget_rows):
                self.blocks.append(self._block(current, starts, len(sizes), tensor))
                current, used = [], 0
            if piece is not None:
                current.append(piece)
                used += rows
        self._assembly = self._assembly_index(n, tensor)

    def _block(self, pieces, starts, requests, tensor) -> _Block:
        request, d0, d1 = (np.asarray(column) for column in zip(*pieces, strict=True))
        length = d1 - d0
        # unit u of the block: draw d0 + (u - first unit of its piece) of its piece's request
        unit_request = np.repeat(request, length)
        first = np.repeat(np.cumsum(length) - length, length)
        unit_draw = np.arange(length.sum()) - first + np.repeat(d0, length)
        rows = np.asarray(self.sizes)[unit_request]
        row_unit = np.repeat(np.arange(len(unit_request)), rows)
        row_in_unit = np.arange(rows.sum()) - np.repeat(np.cumsum(rows) - rows, rows)
        return _Block(
            source_rows=tensor(starts[unit_request][row_unit] + row_in_unit),
            unit_keys=tensor(unit_draw * requests + unit_request),
            unit_of_row=None if (rows == 1).all() else tensor(row_unit),
            piece_rows=(length * np.asarray(self.sizes)[request]).tolist(),
        )

    def _assembly_index(self, n: int, tensor) -> torch.Tensor | None:
        """Where draw s of batch row b sits in the pieces' concatenated outputs; None when a
        view does it (one request, or one-row requests all padded alike)."""
        sizes, padded = self.sizes, self.padded
        if len(sizes) == 1 or (all(r == 1 for r in sizes) and len(set(padded)) == 1):
            return None
        r = np.asarray(sizes)
        starts = np.asarray(segments.offsets((np.asarray(padded) * r).tolist())[:-1])
        row_in_request = np.arange(r.sum()) - np.repeat(np.cumsum(r) - r, r)
        base = np.repeat(starts, r) + row_in_request
        return tensor(base[None, :] + np.arange(n)[:, None] * np.repeat(r, r)[None, :])

    def assemble(self, out: torch.Tensor, n: int) -> torch.Tensor:
        """The pieces' outputs, in order, as [n, B, features]: the first n draws of each."""
        if self._assembly is not None:
            return out[self._assembly]
        if len(self.sizes) == 1:
            return out.view(self.padded[0], self.sizes[0], -1)[:n]
        return out.view(len(self.sizes), self.padded[0], -1)[:, :n].transpose(0, 1)


@functools.lru_cache(maxsize=256)
def _request_plan(
    sizes: tuple[int, ...], n: int, q_pre: int, q_post: int, budget_rows: int, device: torch.device
) -> _RequestPlan:
    """Plans are a function of the batch's shape alone, and a server sees few shapes."""
    return _RequestPlan(sizes, n, q_pre, q_post, budget_rows, device)


def _linear(
    h: torch.Tensor, layer: nn.Linear, scale: float, activation: str | None
) -> torch.Tensor:
    """`layer` at inference on [..., in] with its product scaled (addmm's alpha: free, where
    scaling the weights is one more pass over them), then the activation (if any) in place:
    the output is fresh."""
    flat = h if h.dim() == 2 else h.reshape(-1, h.shape[-1])
    y = torch.addmm(layer.bias, flat, layer.weight.t(), alpha=scale)
    y = IN_PLACE_ACTIVATIONS[activation](y) if activation else y
    return y if h.dim() == 2 else y.view(*h.shape[:-1], -1)


def _dropout(h: torch.Tensor, keys: torch.Tensor, keep: float) -> torch.Tensor:
    """h [1 or n, B, W] times the keep masks [n, B, W] of the keys.

    The masks' words (all ones or zeros) AND the activations' bits: one pass, no multiply.
    """
    bits = rng.bernoulli_bits(keys, h.shape[-1], keep)
    word = _SAME_SIZE_INT[h.element_size()]
    return bits.to(word).bitwise_and_(h.view(word)).view(h.dtype)
