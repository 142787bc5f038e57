"""Reply generators: the step that turns what a turn understood into the words sent back.

`TemplateGenerator` composes from the FAQ answer or the intent's template with a tone set by the
user's sentiment. `LocalGenerator` has a small causal LM on this machine (the packaged SmolLM2 or a
version fine-tuned with `tuneloop sft`) write the reply, grounded in the same material;
`OpenAICompatibleGenerator` asks any server that speaks the OpenAI chat API (vLLM, llama.cpp's server,
...). Both fall back to the template when the model fails or says nothing, so a turn never ends
without an answer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import httpx

from tuneloop.config import PrivacyConfig
from tuneloop.models.lm import GenerationSettings
from tuneloop.models.reply_worker import ReplyWorker
from tuneloop.privacy.mask import Masker, masker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplyRequest:
    message: str
    lang: str
    intent: str | None
    sentiment: str
    faq_answer: str | None
    template: str  # the intent's template in the user's language (or the fallback)
    tone: str  # an opening line for the sentiment ("" for neutral)
    history: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant) pairs, oldest first


class ReplyGenerator(Protocol):
    name: str

    def generate(self, request: ReplyRequest) -> str: ...

    def stream(self, request: ReplyRequest) -> Iterator[str]: ...

    def close(self) -> None:
        """Let go of what writes the replies (a worker process, connections) when the server stops."""


# Role and control markers of common chat templates (ChatML as SmolLM2 and Qwen write it, Llama 3, Mistral,
# Gemma). Written into a user's text, they would let the user open a system or assistant turn of their own.
CONTROL_MARKERS = re.compile(
    r"<\|[A-Za-z0-9_]+\|>|\[/?INST\]|<</?SYS>>|</?s>|<(?:start|end)_of_turn>",
)


def without_control_markers(text: str, special: frozenset[str] = frozenset()) -> str:
    """`text` with chat-template role and control markers taken out: the common ones, and `special`, the
    tokenizer's own special tokens when the model is local."""
    for token in sorted(special, key=len, reverse=True):
        text = text.replace(token, " ")
    return CONTROL_MARKERS.sub(" ", text)


def grounded_messages(request: ReplyRequest, special: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """Chat messages for an LM: what the turn understood and the FAQ answer in the system message, a few
    earlier turns, the user's message. What users wrote goes in without role or control markers."""
    language = "Chinese (Simplified)" if request.lang == "zh" else "English"
    facts = (
        f"Answer from this FAQ entry, and do not invent policies: {request.faq_answer}"
        if request.faq_answer
        else f"No FAQ entry matched; the standard reply is: {request.template}"
    )
    system = (
        f"You are a customer-service assistant. Reply in {language}, in at most three sentences. "
        f"The customer's intent is {request.intent or 'unclear'} and their mood is {request.sentiment}"
        f"{'; start by acknowledging their frustration' if request.sentiment == 'negative' else ''}. "
        f"{facts}"
    )
    chat = [{"role": "system", "content": system}]
    for user, assistant in request.history[-4:]:
        chat += [
            {"role": "user", "content": without_control_markers(user, special)},
            {"role": "assistant", "content": without_control_markers(assistant, special)},
        ]
    return chat + [{"role": "user", "content": without_control_markers(request.message, special)}]


def compose(request: ReplyRequest) -> str:
    """The tone line, then the FAQ answer when one was found, else the intent's template."""
    body = request.faq_answer or request.template
    separator = "" if request.lang == "zh" else " "
    return f"{request.tone}{separator}{body}".strip() if request.tone else body


class TemplateGenerator:
    name = "template"

    def generate(self, request: ReplyRequest) -> str:
        return compose(request)

    def stream(self, request: ReplyRequest) -> Iterator[str]:
        yield compose(request)

    def close(self) -> None:
        pass  # nothing is held


class LocalGenerator:
    """A causal LM on this machine, in a worker process of its own at a lower CPU priority (ReplyWorker says
    why); replies stream token by token."""

    name = "local"

    def __init__(self, folder: Path, max_new_tokens: int = 160, temperature: float = 0.0) -> None:
        self.model = ReplyWorker(folder)
        self.special = self.model.special_tokens
        # Stop where a model would start writing the customer's next line itself.
        self.settings = GenerationSettings(
            max_new_tokens=max_new_tokens, temperature=temperature, stop=["<|im_start|>", "\nUser:", "\nCustomer:"]
        )

    def generate(self, request: ReplyRequest) -> str:
        return "".join(self.stream(request)).strip()

    def stream(self, request: ReplyRequest) -> Iterator[str]:
        produced = False
        try:
            for piece in self.model.stream(grounded_messages(request, self.special), self.settings):
                produced = produced or bool(piece.strip())
                yield piece
        except Exception as exc:  # a reply must come: the template takes over (and the log says why)
            log.warning("local generator failed (%s); using the template", exc)
        if not produced:
            yield compose(request)

    def close(self) -> None:
        self.model.close()


def _masked(request: ReplyRequest, mask: Masker) -> ReplyRequest:
    """What a generator on another machine may see: the user's words with personal data masked."""
    history = [(mask(user), mask(assistant)) for user, assistant in request.history]
    return replace(request, message=mask(request.message), history=history)


class OpenAICompatibleGenerator:
    """POST {base_url}/chat/completions; the FAQ answer and the user's mood go into the system prompt.

    The text leaves this machine, so the user's message and the recalled turns are sent with personal data masked
    (`mask`: every kind privacy.mask knows, by default), whatever the server keeps."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 10.0,
        max_tokens: int = 200,
        temperature: float = 0.3,
        client: httpx.Client | None = None,
        mask: Masker | None = None,
    ) -> None:
        self.mask = mask or masker(PrivacyConfig())
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout, headers=headers)

    def generate(self, request: ReplyRequest) -> str:
        try:
            response = self.client.post(
                self.url,
                json={
                    "model": self.model,
                    "messages": grounded_messages(_masked(request, self.mask) if self.mask else request),
                    "max_tokens": self.max_tokens,
                    "temperature": self.temperature,
                },
            )
            response.raise_for_status()
            content = response.json()["choices"][0]["message"]["content"]
            if isinstance(content, str) and content.strip():
                return content.strip()
            log.warning("generator %s returned an empty reply; using the template", self.url)
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
            log.warning("generator %s failed (%s); using the template", self.url, exc)
        return compose(request)

    def stream(self, request: ReplyRequest) -> Iterator[str]:
        yield self.generate(request)

    def close(self) -> None:
        self.client.close()
