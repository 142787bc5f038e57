"""Sentence embeddings from a packaged encoder, for retrieval: mean-pooled and L2-normalised."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from tuneloop.models.classifier import load_encoder, mean_pool
from tuneloop.models.encoders import EncoderSource


class SentenceEmbedder:
    """texts → unit vectors; cosine similarity is then a dot product."""

    def __init__(self, source: EncoderSource, max_length: int = 128, batch_size: int = 64) -> None:
        self.source = source
        self.tokenizer = AutoTokenizer.from_pretrained(source.path)
        self.model = load_encoder(source.path).eval()
        # Never longer than the encoder's positions: a long message would not fit a small encoder's table.
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings", max_length))
        self.batch_size = batch_size

    @property
    def name(self) -> str:
        return self.source.name

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        # e5 marks symmetric tasks (a message against an FAQ question) with "query: " on both sides.
        prefixed = [self.source.text_prefix + t for t in texts]
        order = np.argsort([len(t) for t in prefixed], kind="stable")
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            chosen = order[start : start + self.batch_size]
            batch = self.tokenizer(
                [prefixed[i] for i in chosen],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            out[chosen] = F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1).numpy()
        return out
