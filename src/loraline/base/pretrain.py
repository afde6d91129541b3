"""Pretraining the offline base model: a Llama-architecture causal LM and a plain torch loop.

Plain on purpose: AdamW, linear warmup then cosine decay, gradient clipping, fixed-length packed
sequences. No Trainer, so every step that decides the weights is visible here and deterministic:
same corpus, params and seed -> same weights, bit for bit (on the same thread count and library
versions, which the record keeps).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loraline.base.corpus import Corpus
from loraline.config import BuildParams
from loraline.modelling.chat import DOC_SEPARATOR, IM_END, IM_START
from loraline.modelling.constants import IGNORE_INDEX


def make_model(p: BuildParams, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model whose shape comes from `p` and whose special ids from the tokenizer."""
    sep = tokenizer.convert_tokens_to_ids(DOC_SEPARATOR)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=p.tie_word_embeddings,
        bos_token_id=sep,
        eos_token_id=eos,
        pad_token_id=sep,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Greedy by default: later stages evaluate exact match, which sampling would make random.
    model.generation_config = GenerationConfig(
        bos_token_id=sep,
        eos_token_id=eos,
        pad_token_id=sep,
        do_sample=False,
        max_new_tokens=256,
    )
    return model


TokenLists = tuple[list[list[int]], list[list[int]]]


def tokenize_corpus(tokenizer: PreTrainedTokenizerFast, corpus: Corpus) -> tuple[dict[str, TokenLists], dict]:
    """Token ids and labels of every text by source, and tokens per source.

    Labels equal the ids (loss on every token) except in exercises and drills, where everything
    before the answer is IGNORE_INDEX: their prompts are random words, and the skill to learn is the
    answer. Without this, answers are a few percent of the loss and a small model never learns to copy.
    """
    by_source: dict[str, TokenLists] = {}
    composition: dict[str, dict[str, int]] = {}
    for name, texts in corpus.sources().items():
        if not texts:
            by_source[name] = ([], [])
            composition[name] = {"texts": 0, "chars": 0, "tokens": 0, "loss_tokens": 0}
            continue
        starts = corpus.answer_starts_of(name)
        # split_special_tokens=False (the default) turns '<|im_start|>' in exercises into its one id.
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=starts is not None)
        ids_all, labels_all, loss_tokens = [], [], 0
        for i, ids in enumerate(enc["input_ids"]):
            if starts is not None:
                labels = [
                    t if s >= starts[i] else IGNORE_INDEX
                    for t, (s, _) in zip(ids, enc["offset_mapping"][i], strict=True)
                ]
            else:
                labels = list(ids)
            loss_tokens += sum(x != IGNORE_INDEX for x in labels)
            ids_all.append(ids)
            labels_all.append(labels)
        by_source[name] = (ids_all, labels_all)
        composition[name] = {
            "texts": len(texts),
            "chars": sum(map(len, texts)),
            "tokens": sum(map(len, enc["input_ids"])),
            "loss_tokens": loss_tokens,
        }
    return by_source, composition


def pack(
    token_lists: list[list[int]], label_lists: list[list[int]], separator: int, seq_len: int, seed: int, epoch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the texts (seeded per epoch), join them with the separator, cut into seq_len rows.

    Returns (input_ids, labels). The tail shorter than seq_len is dropped (with a new shuffle each
    epoch a different tail is lost), and so are rows without a single token to take loss on.
    """
    order = list(range(len(token_lists)))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    flat: list[int] = []
    flat_labels: list[int] = []
    for i in order:
        flat.extend(token_lists[i])
        flat.append(separator)
        flat_labels.extend(label_lists[i])
        flat_labels.append(separator)
    n = len(flat) // seq_len
    ids = torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)
    labels = torch.tensor(flat_labels[: n * seq_len], dtype=torch.long).view(n, seq_len)
    # A row that is all exercise prompt has nothing to learn from; a batch of such rows would give
    # a NaN loss (a mean over zero tokens) and poison the weights.
    keep = (labels[:, 1:] != IGNORE_INDEX).any(dim=1)
    return ids[keep], labels[keep]


def lr_at(step: int, p: BuildParams) -> float:
    """Linear warmup to p.learning_rate, then cosine decay to 10% of it at p.max_steps."""
    if step < p.warmup_steps:
        return p.learning_rate * (step + 1) / p.warmup_steps
    progress = (step - p.warmup_steps) / max(1, p.max_steps - p.warmup_steps)
    return p.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class PretrainResult:
    losses: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    epochs: float = 0.0  # of the main corpus
    drill_steps: int = 0
    wall_s: float = 0.0


class _Batches:
    """Endless batches of packed rows from one set of texts: a fresh shuffle and packing each epoch."""

    def __init__(self, lists: TokenLists, separator: int, seq_len: int, seed: str) -> None:
        self.lists, self.separator, self.seq_len, self.seed = lists, separator, seq_len, seed
        self.epoch, self.cursor = 0, 0
        self.rows, self.labels = pack(*lists, separator, seq_len, seed, 0)
        if len(self.rows) == 0:
            raise ValueError(f"the pretraining corpus is shorter than one sequence of seq_len={seq_len} tokens")

    def next(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, batch_labels = [], []
        while len(batch) < size:
            if self.cursor == len(self.rows):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.rows, self.labels = pack(*self.lists, self.separator, self.seq_len, self.seed, self.epoch)
            take = min(size - len(batch), len(self.rows) - self.cursor)
            batch.extend(self.rows[self.cursor : self.cursor + take])
            batch_labels.extend(self.labels[self.cursor : self.cursor + take])
            self.cursor += take
        return torch.stack(batch), torch.stack(batch_labels)

    @property
    def epochs(self) -> float:
        return self.epoch + self.cursor / max(1, len(self.rows))


def pretrain(
    model: LlamaForCausalLM,
    corpus: TokenLists,
    separator: int,
    p: BuildParams,
    seed: int,
    progress: bool = False,
    drills: TokenLists | None = None,
) -> PretrainResult:
    """Train `model` in place for exactly p.max_steps steps of p.batch_size packed sequences: the
    first p.copy_drill_steps on `drills`, the rest on `corpus`."""
    if not corpus[0]:
        raise ValueError("the pretraining corpus is empty: add documents, stdlib docstrings or exercises")
    # Weight decay on matrices only: decaying norms' gains and embeddings hurts small models.
    decay = [t for n, t in model.named_parameters() if t.ndim >= 2 and "embed" not in n]
    no_decay = [t for n, t in model.named_parameters() if not (t.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p.learning_rate,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    result = PretrainResult()
    main = _Batches(corpus, separator, p.seq_len, str(seed))
    drill_steps = min(p.copy_drill_steps, p.max_steps) if drills and drills[0] else 0
    drill = _Batches(drills, separator, p.seq_len, f"{seed}-drills") if drill_steps else None
    bar = None
    if progress:
        from loraline.progress import progress_bar

        bar = progress_bar(total=p.max_steps, desc="pretrain base", unit="step")
    start = time.perf_counter()
    model.train()
    for step in range(p.max_steps):
        source = drill if drill is not None and step < drill_steps else main
        ids, labels = source.next(p.batch_size)
        input_ids = ids.to(model.device)  # CPU here; a caller may have moved the model
        labels = labels.to(model.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, p)
        loss = next_token_loss(model, input_ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        result.tokens_seen += input_ids.numel()
        if bar is not None:
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}", refresh=False)  # update() draws, at its pace
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    result.epochs = main.epochs
    result.drill_steps = drill_steps
    result.wall_s = time.perf_counter() - start
    return result


def next_token_loss(model: LlamaForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not IGNORE_INDEX: the loss
    transformers computes from `labels`, with the output head applied to those positions only. Drills
    and exercises take loss on their answers alone, so most positions need no logits; skipping them
    makes a drill step about 15% cheaper on CPU."""
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[keep]).float()
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in (DOC_SEPARATOR, IM_START, IM_END)}
