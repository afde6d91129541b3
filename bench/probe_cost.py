"""What merge.probes costs the merge stage on a GPU: one `run_probes` pass (prompt logits + greedy
generation, as the merge stage runs it for base + adapter, the merged model and the 4-bit reference) on
the built-in probes alone, then with N tenant-sized prompts added.

The model is Llama-3-8B-shaped with random weights (seed 0) at float32, merge.dtype's default; random
weights never emit eos, so every probe generates all max_new_tokens (the worst case). The tenant prompts
are random token ids of lengths spread evenly up to merge.probe_max_tokens. Each setting is timed after
one warm-up pass; the peak GPU memory is that of the timed pass.

    python bench/probe_cost.py                         (a CUDA machine; about a minute after the model is built)
    python bench/probe_cost.py --shape tiny            (the CPU: a quick check of the script itself)

Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass

import torch

from loraline.modelling import parity

SHAPES = {
    "llama-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "tiny": dict(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
BUILTIN_LENGTHS = (14, 34, 31, 36)  # the built-in probes' prompt tokens with loraline's own base tokenizer


@dataclass
class StubTokenizer:
    """What run_probes asks of a tokenizer: pad and eos ids and decode."""

    pad_token_id: int = 0
    eos_token_id: int = 1

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="llama-8b")
    ap.add_argument("--tenant", type=int, nargs="+", default=[0, 8, 16])
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[parity.CUDA_PROBE_BATCH])
    args = ap.parse_args()
    model = build(args.shape)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    builtin = [[rng.randrange(2, vocab) for _ in range(n)] for n in BUILTIN_LENGTHS]
    for batch in args.batch:
        for n in args.tenant:
            lengths = [args.max_prompt_tokens * (i + 1) // n for i in range(n)]
            prompts = builtin + [[rng.randrange(2, vocab) for _ in range(k)] for k in lengths]
            print(
                json.dumps(
                    {
                        "shape": args.shape,
                        "device": str(model.device),
                        "batch": batch,
                        "builtin": len(builtin),
                        "tenant": n,
                        **timed(model, prompts, args.max_new_tokens, batch),
                    }
                ),
                flush=True,
            )


def build(shape: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)).to(torch.float32)
    return model.eval()


def timed(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, batch: int) -> dict[str, float]:
    tok = StubTokenizer()
    parity.run_probes(model, tok, prompts, max_new_tokens, batch)  # warm-up: kernels, allocator
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = parity.run_probes(model, tok, prompts, max_new_tokens, batch)
    if cuda:
        torch.cuda.synchronize()
    logits_gib = sum(t.numel() * t.element_size() for t in out.logits) / 2**30
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "prompt_tokens": sum(map(len, prompts)),
        "kept_logits_gib": round(logits_gib, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else 0.0,
    }


if __name__ == "__main__":
    main()
