"""Generate replies with a causal LM (the packaged SmolLM2 or a fine-tuned version): whole, or streamed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from tuneloop.models.lm import load_generator

Message = dict[str, str]
# Seconds to wait for the next token before giving up on a generation thread that stopped answering.
STREAM_TIMEOUT = 120.0


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy, the same answer every time
    top_p: float = 0.9
    stop: list[str] = field(default_factory=list)


def cut_at_stop(text: str, stop: list[str]) -> str:
    positions = [text.find(s) for s in stop if s and s in text]
    return text[: min(positions)] if positions else text


class StopOnText(StoppingCriteria):
    """Stop once the decoded continuation contains a stop string.

    transformers' own stop_strings needs a token-to-text table some tokenizers cannot give (word-level ones
    fail with "substring not found"); decoding the few new tokens each step works with any tokenizer.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], prompt_length: int) -> None:
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=False)
        return torch.tensor([any(s in text for s in self.stop) for text in texts])


class StopWhenSet(StoppingCriteria):
    """Stop generating once nobody reads the stream any more."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set())


class ReplyModel:
    """A loaded causal LM that answers chat messages with its chat template."""

    def __init__(self, folder: Path) -> None:
        self.model, self.tokenizer = load_generator(folder)

    def _inputs(self, messages: list[Message]) -> dict[str, torch.Tensor]:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )

    def _options(self, settings: GenerationSettings, prompt_length: int) -> dict:
        sampling = settings.temperature > 0
        options = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": sampling,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        if sampling:
            options.update(temperature=settings.temperature, top_p=settings.top_p)
        if settings.stop:
            stop = StopOnText(self.tokenizer, settings.stop, prompt_length)
            options["stopping_criteria"] = StoppingCriteriaList([stop])
        return options

    @torch.inference_mode()
    def generate(self, messages: list[Message], settings: GenerationSettings = GenerationSettings()) -> str:
        inputs = self._inputs(messages)
        output = self.model.generate(**inputs, **self._options(settings, inputs["input_ids"].shape[1]))
        text = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return cut_at_stop(text, settings.stop).strip()

    def stream(self, messages: list[Message], settings: GenerationSettings = GenerationSettings()) -> Iterator[str]:
        """Text pieces as the model produces them (generation runs on its own thread)."""
        inputs = self._inputs(messages)
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT
        )
        failure: list[BaseException] = []
        abandoned = threading.Event()

        def run() -> None:
            try:
                with torch.inference_mode():
                    options = self._options(settings, inputs["input_ids"].shape[1])
                    stops = options.setdefault("stopping_criteria", StoppingCriteriaList())
                    stops.append(StopWhenSet(abandoned))
                    self.model.generate(**inputs, **options, streamer=streamer)
            except BaseException as exc:  # handed to the reader below; the streamer must still be closed
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True, name="generate")
        worker.start()
        produced, sent = "", 0
        try:
            for piece in streamer:
                produced += piece
                kept = cut_at_stop(produced, settings.stop)
                if len(kept) > sent:
                    yield kept[sent:]
                    sent = len(kept)
                if kept != produced:  # a stop string appeared
                    break
        finally:  # also when the reader stops early (a client that hung up): the model stops too
            abandoned.set()
        worker.join()
        if failure:
            raise failure[0]
