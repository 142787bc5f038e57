"""Word embeddings of which only the rows of tokens in the training texts are trained (and their merge back
into a plain embedding matrix for saving)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tuneloop.models.classifier import TorchEncoder


class TrainedRowsEmbedding(nn.Module):
    """A word-embedding matrix of which only the rows of the given token ids are trained.

    A row whose token never occurs in the training texts gets no gradient, so Adam would leave it alone anyway;
    training the others alone gives the same updates. It matters for e5: its 250k-row matrix is 80% of the
    model, and stepping AdamW over all of it took 0.6 s of a 1.1 s step on 2 cores (a few thousand Chinese
    reviews use about 5k rows).
    """

    # Buffers (not saved): each token id's row among the trained ones (-1 for none), and the trained token ids.
    slot: torch.Tensor
    token_ids: torch.Tensor

    def __init__(self, full: nn.Embedding, token_ids: list[int]) -> None:
        super().__init__()
        full.weight.requires_grad_(False)
        self.full = full
        self.rows = nn.Parameter(full.weight[token_ids].clone())
        slot = torch.full((full.num_embeddings,), -1, dtype=torch.long)
        slot[token_ids] = torch.arange(len(token_ids))
        self.register_buffer("slot", slot, persistent=False)
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        slot = self.slot[input_ids]
        trained = F.embedding(slot.clamp(min=0), self.rows)
        return torch.where((slot >= 0).unsqueeze(-1), trained, self.full(input_ids))

    @torch.no_grad()
    def merged(self) -> nn.Embedding:
        """The full matrix with the trained rows written into it."""
        self.full.weight[self.token_ids] = self.rows.to(self.full.weight.dtype)
        return self.full


def train_only_used_rows(encoder: TorchEncoder, train_ids: list[list[int]]) -> None:
    """Swap the encoder's trainable word embeddings for a TrainedRowsEmbedding over the tokens in `train_ids`."""
    embeddings = encoder.get_input_embeddings()
    if isinstance(embeddings, nn.Embedding) and embeddings.weight.requires_grad:
        encoder.set_input_embeddings(TrainedRowsEmbedding(embeddings, sorted({t for ids in train_ids for t in ids})))


@contextmanager
def plain_embeddings(encoder: TorchEncoder) -> Iterator[None]:
    """Within it the encoder holds an ordinary nn.Embedding (trained rows merged in), as saved models must."""
    current = encoder.get_input_embeddings()
    if not isinstance(current, TrainedRowsEmbedding):
        yield
        return
    encoder.set_input_embeddings(current.merged())
    try:
        yield
    finally:
        encoder.set_input_embeddings(current)
