"""A teacher model run locally with transformers (`synthesize.generator: hf`).

`synthesize.model` is a Hugging Face model id or a local folder. Remote code stays off unless
`synthesize.trust_remote_code` says otherwise. The tokenizer's chat template is used when it has
one (a plain "role: content" transcript otherwise). Sampling is seeded per passage, so a re-run on
the same machine and library versions gives the same rows.
"""

from __future__ import annotations

from typing import Any

from loraline.config import SynthesizeParams
from loraline.synthesize.prompt import ModelGenerator


class HFGenerator(ModelGenerator):
    name = "hf"

    def __init__(self, params: SynthesizeParams) -> None:
        super().__init__(params)
        self.model = params.model
        self._tokenizer: Any = None
        self._model: Any = None
        self.calls = 0

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        trust = self.params.trust_remote_code
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model, trust_remote_code=trust)
            self._model = AutoModelForCausalLM.from_pretrained(self.model, trust_remote_code=trust)
        except OSError as exc:
            raise FileNotFoundError(
                f"synthesize.model {self.model!r}: cannot load it with transformers: {exc}"
            ) from exc
        self._model.eval()

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text the model sees."""
        self._load()
        if getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: "

    def complete(self, messages: list[dict[str, str]], seed: int) -> str:
        import torch
        from transformers import set_seed

        prompt = self.render(messages)
        enc = self._tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        set_seed(seed)
        sample = self.params.temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=self.params.max_new_tokens, do_sample=sample)
        if sample:
            kwargs["temperature"] = self.params.temperature
        pad = (
            self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self._tokenizer.eos_token_id
        )
        with torch.no_grad():
            out = self._model.generate(**enc, **kwargs, pad_token_id=pad)
        self.calls += 1
        return self._tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    def usage(self) -> dict:
        return {"generate_calls": self.calls}
