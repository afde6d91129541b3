"""The OpenAI-compatible teacher (`synthesize.generator: openai`): the prompt of prompt.py sent to the
endpoint through the shared client (modelling/endpoint.py: key handling, rate limit, retries, cache)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from loraline.config import SynthesizeParams
from loraline.modelling.endpoint import ChatClient, EndpointError
from loraline.synthesize.base import SynthesizeError
from loraline.synthesize.prompt import ModelGenerator


class EndpointGenerator(ModelGenerator):
    name = "openai"

    def __init__(
        self, params: SynthesizeParams, cache_dir: Path | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        super().__init__(params)
        self.model = params.model
        try:
            self.client = ChatClient.from_params(params.endpoint, "synthesize.endpoint", cache_dir, sleep=sleep)
        except EndpointError as e:
            raise SynthesizeError(str(e)) from None

    def complete(self, messages: list[dict[str, str]], seed: int) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.params.temperature,
            "max_tokens": self.params.max_new_tokens,
            "seed": seed,
            "n": 1,
        }
        try:
            return self.client.chat(body)
        except EndpointError as e:
            raise SynthesizeError(str(e)) from None

    def usage(self) -> dict:
        return dict(self.client.counts)
