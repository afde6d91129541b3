"""Generation with plain onnxruntime over an exported folder (model.onnx + tokenizer), reusing the KV cache."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
# export.graphs: each precision's file in an export folder (weights past 1 GiB in <file>.data beside it).
GRAPH_FILES = {"fp32": MODEL_FILE, "fp16": "model.fp16.onnx", "int8": INT8_FILE, "int4": "model.int4.onnx"}
GRAPHS = tuple(GRAPH_FILES)


def eos_ids(folder: Path, tok: Any) -> list[int]:
    """Stop ids: generation_config.json's eos_token_id (int or list) plus the tokenizer's eos."""
    ids: set[int] = set()
    path = Path(folder) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    return sorted(ids)


class OnnxGenerator:
    """Greedy or sampled generation from an export folder with onnxruntime's CPUExecutionProvider.

    The prompt runs once with empty past tensors; every later step feeds one token plus the previous
    step's present.* outputs as past_key.* / past_value.* (the cache is never recomputed).
    """

    def __init__(self, onnx_dir: str | Path, model_file: str = MODEL_FILE, threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.folder = Path(onnx_dir)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.folder / model_file), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        self.eos_ids = eos_ids(self.folder, self.tokenizer)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        if len(self.past_names) != len(self.present_names) or not self.past_names:
            raise ValueError(f"{model_file}: expected matching past_*/present.* tensors, got {list(inputs)}")
        shape = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.past_dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32

    # --- low level ---------------------------------------------------------------------------------

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.past_dtype) for _ in self.past_names]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step: logits [B, S, V] and the present cache (to feed as the next step's past)."""
        feed = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
        }
        feed.update(zip(self.past_names, past, strict=True))
        outputs = self.session.run(["logits", *self.present_names], feed)
        return outputs[0], list(outputs[1:])

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --- generation --------------------------------------------------------------------------------

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[int]:
        """New token ids (prompt excluded), stopping after an eos token or max_new_tokens."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        if do_sample and temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        if not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        rng = np.random.default_rng(seed)
        ids = np.asarray([list(prompt_ids)], dtype=np.int64)
        mask = np.ones_like(ids)
        past = self.empty_past(1)
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits, past = self.forward(ids, mask, past)
            token = self._pick(logits[0, -1].astype(np.float64), do_sample, temperature, top_p, rng)
            new.append(token)
            if token in self.eos_ids:
                break
            ids = np.asarray([[token]], dtype=np.int64)
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        return new

    def generate(
        self,
        prompt: Sequence[dict[str, str]] | Sequence[int],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> str:
        """`prompt`: chat messages (rendered with the saved chat template) or prompt token ids."""
        prompt = list(prompt)
        ids = self.encode(prompt) if prompt and isinstance(prompt[0], dict) else [int(i) for i in prompt]
        new = self.generate_ids(ids, max_new_tokens, do_sample, temperature, top_p, seed)
        return self.tokenizer.decode(new, skip_special_tokens=True)

    @staticmethod
    def _pick(logits: np.ndarray, do_sample: bool, temperature: float, top_p: float, rng: np.random.Generator) -> int:
        if not do_sample:
            return int(np.argmax(logits))
        z = logits / temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, top_p)) + 1]  # smallest set with mass >= top_p
            filtered = np.zeros_like(probs)
            filtered[keep] = probs[keep]
            probs = filtered / filtered.sum()
        return int(rng.choice(len(probs), p=probs))
