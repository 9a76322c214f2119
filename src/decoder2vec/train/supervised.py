"""Supervised contrastive training on (query, positive[, hard negative]) rows, with GradCache.

Each query must find its positive among every document of the step: the positives and hard
negatives of its own batch and, with several processes, of every other process (gathered with a
differentiable ``all_gather``: the gradient every process's queries send into a document reaches the
process that embedded it). Instructions go on the query side only, so documents are embedded once for
any task.

:class:`GradCache` gives the same loss and gradients with large batches in little memory: it embeds
all texts in chunks without a graph, computes the loss and its gradient with respect to the cached
vectors, then re-embeds chunk by chunk with a graph and back-propagates those cached gradients.
Each chunk's random state is replayed, so dropout masks match between the two passes.

Reference: Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021.

Example::

    loss_fn = ContrastiveLoss(temperature=0.05)
    vectors = encoder(encoder.collate(queries + documents))  # queries first, then positives (+ negatives)
    loss = loss_fn(vectors[:n], vectors[n:])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ContrastiveLoss", "GradCache", "gather_with_grad"]


def gather_with_grad(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' rows concatenated in rank order, and this process's offset into them.

    Differentiable across processes: in backward, the gradients that every process's loss sends into
    this process's rows are summed (all-reduce) and flow into its graph, so process r's documents also
    learn from the other processes' queries. With the usual gradient averaging over processes (DDP,
    accelerate), the parameters then get the gradient of the mean loss over the global batch, exactly as
    one process would on all the queries and documents. Every process must call ``backward`` (as DDP
    requires anyway) and hold the same number of rows. One process: ``(local, 0)``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local, 0
    return _AllGather.apply(local), dist.get_rank() * len(local)


class _AllGather(torch.autograd.Function):
    """``all_gather`` whose backward all-reduces (sums) the gathered rows' gradients, then keeps this rank's.

    ``torch.distributed.nn.functional.all_gather`` does the same with a reduce-scatter, which gloo lacks.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rows, ctx.rank = len(local), rank
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)  # (world * rows, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place: not autograd's own buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class ContrastiveLoss(nn.Module):
    """InfoNCE of queries against positives and hard negatives, in-batch and across processes.

    ``queries`` (n, dim); ``documents`` (n, dim) positives, or (2n, dim) positives then hard negatives.
    Query i's positive is document i; every other document of every process is a negative.
    Returns the mean cross-entropy of cosine similarity / temperature.
    """

    def __init__(self, temperature: float = 0.05, gather_across_processes: bool = True):
        super().__init__()
        self.temperature = temperature
        self.gather_across_processes = gather_across_processes

    def forward(self, queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        offset = 0
        if self.gather_across_processes:
            documents, offset = gather_with_grad(documents)  # (processes * m, dim)
        scores = F.normalize(queries, dim=-1) @ F.normalize(documents, dim=-1).T  # (n, processes * m)
        labels = torch.arange(len(queries), device=queries.device) + offset
        return F.cross_entropy(scores / self.temperature, labels)


class GradCache:
    """Contrastive loss over a large batch, embedding ``chunk_size`` texts at a time.

    ``embed(batch) -> (k, dim)`` embeds a collated chunk (the training module), ``collate(features)``
    pads a chunk, ``loss_fn(queries, documents)`` is the contrastive loss. :meth:`step` fills the
    gradients exactly as ``backward(loss_fn(embed(all queries), embed(all documents)))`` would, in one
    process or several (the loss gathers documents with :func:`gather_with_grad`; the backward that
    reaches the cached vectors runs its all-reduce in every process).
    """

    def __init__(self, embed: Callable, collate: Callable, loss_fn: nn.Module, chunk_size: int):
        self.embed = embed
        self.collate = collate
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size

    def step(
        self,
        features: list,
        num_queries: int,
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
        no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> torch.Tensor:
        """``features``: queries then documents. Returns the loss (detached); gradients are accumulated."""
        chunks = [features[i : i + self.chunk_size] for i in range(0, len(features), self.chunk_size)]
        states, cached = [], []
        with torch.no_grad():  # pass 1: every vector, no graph
            for chunk in chunks:
                states.append(_rng_state())
                cached.append(self.embed(self.collate(chunk)).float())
        vectors = torch.cat(cached).requires_grad_()  # (len(features), dim) leaf
        loss = self.loss_fn(vectors[:num_queries], vectors[num_queries:])
        loss.backward()  # only down to the cached vectors
        grads = vectors.grad.split([len(c) for c in chunks])
        for index, (chunk, state, grad) in enumerate(
            zip(chunks, states, grads, strict=True)
        ):  # pass 2: graph per chunk
            _set_rng_state(state)
            sync = contextlib.nullcontext() if index == len(chunks) - 1 else no_sync()
            with sync:
                chunk_vectors = self.embed(self.collate(chunk)).float()
                backward((chunk_vectors * grad).sum())  # d(loss)/d(params) by the chain rule
        return loss.detach()


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
