"""Why a classifier said what it said: Integrated Gradients over the input embeddings (Captum), per word.

For a text and a label, IG (Sundararajan et al., 2017) integrates the gradient of the label's probability
along a straight line from a baseline (the same text with every word replaced by padding; [CLS]/[SEP] kept)
to the text's own embeddings. Each token's share is what it adds to the probability, and the shares sum to
the probability at the text minus at the baseline (completeness; `delta` is how far the numerical
integral is from that). Tokens are merged back into the words a person reads: sub-word pieces into their
word, and Chinese (which the multilingual tokenizer keeps as long runs) into jieba's words.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from tuneloop.errors import NotFound, TuneloopError
from tuneloop.models.classifier import TextClassifier, kept_tokens
from tuneloop.models.onnx_encoder import OnnxEncoder

# Steps of the integral: 50 keeps |delta| around 1e-2 of the probability on the packaged encoders.
STEPS = 50
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# A person's words: a run of CJK characters (cut further by jieba), a run of letters/digits (with inner
# apostrophes: "it's", "don't"), or one other visible character (punctuation and emoji count, since a "!" can
# carry a sentiment).
_WORD = re.compile(rf"[{_CJK}]+|[^\W_{_CJK}]+(?:['’][^\W_{_CJK}]+)*|[^\s\w]|_")


@dataclass(frozen=True)
class WordAttribution:
    word: str
    start: int  # character offsets in the text
    end: int
    score: float  # what the word adds to the label's probability (negative: takes away)


@dataclass(frozen=True)
class Explanation:
    text: str
    label: str  # the label explained (the predicted one unless another was asked for)
    probability: float  # of that label at the text
    baseline_probability: float  # at the all-padding baseline
    delta: float  # sum of attributions minus (probability - baseline_probability)
    words: list[WordAttribution]

    def as_dict(self) -> dict[str, Any]:
        """As JSON holds it (the report, the CLI's output, the server's answer)."""
        return asdict(self)


def words_of(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) for every word a reader sees; Chinese runs are cut into words by jieba."""
    import rjieba

    words = []
    for match in _WORD.finditer(text):
        if re.fullmatch(rf"[{_CJK}]+", match.group()) and len(match.group()) > 1:
            words += [(w, match.start() + s, match.start() + e) for w, s, e in rjieba.tokenize(match.group())]
        else:
            words.append((match.group(), match.start(), match.end()))
    return words


def merge_into_words(text: str, offsets: list[tuple[int, int]], scores: np.ndarray) -> list[WordAttribution]:
    """Token scores summed into the words whose characters they cover; a token spanning several words (a
    multilingual token covering two Chinese words) is shared between them by characters covered."""
    words = words_of(text)
    totals = np.zeros(len(words))
    starts = np.array([start for _, start, _ in words])
    ends = np.array([end for _, _, end in words])
    for (start, end), score in zip(offsets, scores, strict=True):
        if end <= start:
            continue  # special tokens and padding have empty offsets
        overlap = np.clip(np.minimum(ends, end) - np.maximum(starts, start), 0, None)
        if overlap.sum():
            totals += score * overlap / overlap.sum()
    return [
        WordAttribution(word, start, end, float(total)) for (word, start, end), total in zip(words, totals, strict=True)
    ]


def shaded_pieces(text: str, words: list[tuple[int, int, float]]) -> list[tuple[str, float | None, float]]:
    """The text cut into (piece, score, strength) for shading: each attributed word (start, end, score) with its
    strength relative to the strongest word in either direction (0..1), and the text between words with
    score None. How the terminal, the report and the admin page shade an explanation."""
    strongest = max((abs(score) for _, _, score in words), default=0.0) or 1.0
    pieces: list[tuple[str, float | None, float]] = []
    cursor = 0
    for start, end, score in words:
        pieces += [(text[cursor:start], None, 0.0), (text[start:end], score, min(abs(score) / strongest, 1.0))]
        cursor = end
    pieces.append((text[cursor:], None, 0.0))
    return pieces


def _gradient_path(model: TextClassifier) -> torch.nn.Module:
    if isinstance(model.encoder, OnnxEncoder):
        raise TuneloopError(
            "this model runs on ONNX Runtime, which gives no gradients to explain with: load it with "
            "runtime=torch (tuneloop explain does)"
        )
    return model.encoder.get_input_embeddings()


def explain(
    model: TextClassifier,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    labels: list[str | None] | None = None,
    steps: int = STEPS,
) -> list[Explanation]:
    """An explanation of each text's predicted label (or of `labels[i]` where given and not None), for texts
    cleaned as the model's inputs are (clean_text). A text without words gets an explanation without words
    (its input is the baseline)."""
    from captum.attr import LayerIntegratedGradients  # half a second to import: only when explaining

    embeddings = _gradient_path(model)
    if not tokenizer.is_fast:
        raise TuneloopError("explanations need a fast tokenizer (character offsets); this model's is not")
    index = {label: i for i, label in enumerate(model.spec.labels)}
    model.eval()

    def probability(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(input_ids, attention_mask), dim=-1)

    attributor = LayerIntegratedGradients(probability, embeddings)
    explanations = []
    for position, text in enumerate(texts):
        encoded = tokenizer(
            model.spec.text_prefix + text, return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False
        )
        # The tokens the classifier sees (tokenize's truncation), with their character offsets.
        kept = kept_tokens(encoded["special_tokens_mask"], model.spec.max_length, model.spec.truncation)
        input_ids = torch.tensor([[encoded["input_ids"][i] for i in kept]])
        special = torch.tensor([[encoded["special_tokens_mask"][i] for i in kept]], dtype=torch.bool)
        mask = torch.ones_like(input_ids)
        baseline = torch.where(special, input_ids, tokenizer.pad_token_id or 0)
        with torch.no_grad():
            probs = probability(input_ids, mask)[0]
            base_probs = probability(baseline, mask)[0]
        asked = labels[position] if labels else None
        if asked is not None and asked not in index:
            raise NotFound(f"'{asked}' is not one of this model's labels ({', '.join(model.spec.labels)})")
        target = index[asked] if asked is not None else int(probs.argmax())
        attributions, delta = attributor.attribute(
            input_ids,
            baselines=baseline,
            target=target,
            additional_forward_args=(mask,),
            n_steps=steps,
            internal_batch_size=steps,
            return_convergence_delta=True,
        )
        per_token = attributions.sum(dim=-1)[0].detach().numpy()
        prefix = len(model.spec.text_prefix)
        # Offsets are into prefix + text: shift them back onto the text (the prefix's tokens fall off).
        offsets = [(max(s - prefix, 0), max(e - prefix, 0)) for s, e in (encoded["offset_mapping"][i] for i in kept)]
        explanations.append(
            Explanation(
                text=text,
                label=model.spec.labels[target],
                probability=float(probs[target]),
                baseline_probability=float(base_probs[target]),
                delta=float(delta[0]),
                words=merge_into_words(text, offsets, per_token),
            )
        )
    return explanations
