"""Batched greedy generation with left padding, on top of ``transformers``' ``generate``.

``generate`` already stops each row at EOS (later positions are padding) and keeps a KV cache, so we do not
re-implement decoding here; we only batch, sort by length to cut padding, and decode the new tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so left padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy completions for ``prompts`` (already chat-formatted), in input order."""
    tokenizer.padding_side = "left"
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    out: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    eos = stop_token_ids(tokenizer)
    for idx in length_sorted_batches(lengths, batch_size):
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            # transformers turns this on for FSDP/ZeRO-3 models (every process decodes until all are done); our
            # processes generate their own shards with whole weights (harness.sharded.gather_weights), and the
            # lock-step would hang when they make different numbers of generate calls.
            synced_gpus=False,
        )  # (B, T_prompt + T_new)
        new = gen[:, enc["input_ids"].shape[1] :]
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(new[row], skip_special_tokens=True)
        if progress is not None:
            progress(len(idx))
    return out
