"""Batched greedy generation with left padding, on top of ``transformers``' ``generate``.

``generate`` already stops each row at EOS (later positions are padding) and keeps a KV cache, so we do not
re-implement decoding here; we only batch, sort by length to cut padding, and decode the new tokens. The stop set
(``stop_token_ids``) is the model's own: EOS, its generation config's EOS ids and its chat template's end-of-turn
token; evaluation, SFT targets (``end_of_turn_id``), MemGen decoding and the RL rollouts use the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from harness.progress import advance as cell_advance


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so left padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


_PROBE = "memgen-bench end-of-turn probe"  # assistant text to find in the rendered template


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token that closes an assistant turn in the tokenizer's chat template: ``<|im_end|>`` (ChatML,
    SmolLM2, Qwen), ``<|eot_id|>`` (Llama-3), ``<end_of_turn>`` (Gemma), ``<|end|>`` (Phi-3), ``</s>`` (Mistral).

    Found by rendering one user/assistant exchange and taking the first special token after the assistant's text
    (templates differ too much to list). None without a chat template or when nothing special closes the turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(convo, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this exchange names no end-of-turn token
        return None
    at = text.rfind(_PROBE) if isinstance(text, str) else -1
    if at < 0:
        return None
    tail = text[at + len(_PROBE):]
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials |= set(tokenizer.all_special_tokens)
    found = [(tail.find(s), -len(s), s) for s in specials if s and s in tail]
    return min(found)[2] if found else None  # the earliest; the longest where two start at the same place


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of ``end_of_turn_token`` (what SFT targets end with), else the tokenizer's EOS."""
    tok = end_of_turn_token(tokenizer)
    return tokenizer.convert_tokens_to_ids(tok) if tok is not None else tokenizer.eos_token_id


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> list[int]:
    """Token ids that end a completion: the union of the tokenizer's EOS, the model's
    ``generation_config.eos_token_id`` (an int, or a list as for Llama-3, Gemma, Phi-3) and the chat template's
    end-of-turn token, so the model's own stops are kept and none is replaced by a guess. Pass the model's
    ``generation_config`` where the model is at hand."""
    ids: set[int | None] = {tokenizer.eos_token_id}
    declared = getattr(generation_config, "eos_token_id", None)
    ids.update([declared] if isinstance(declared, int) else list(declared or []))
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        ids.add(tokenizer.convert_tokens_to_ids(eot))
    return sorted(i for i in ids if i is not None)


# eval.backend=vllm (harness/vllm_backend.py) registers a generator here: it answers for the models its engine
# serves and returns None for any other, which transformers then decodes.
_greedy_backend: Callable[..., list[str] | None] | None = None


def set_greedy_backend(fn: Callable[..., list[str] | None] | None) -> None:
    """Route ``generate_greedy`` through ``fn(model, tokenizer, prompts, max_new_tokens)`` (None: transformers)."""
    global _greedy_backend
    _greedy_backend = fn


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
    if _greedy_backend is not None and (done := _greedy_backend(model, tokenizer, prompts, max_new_tokens)) is not None:
        if progress is not None:
            progress(len(prompts))
        cell_advance(len(prompts), sum(len(ids) for ids in tokenizer(list(done), add_special_tokens=False).input_ids))
        return done
    tokenizer.padding_side = "left"
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    out: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    eos = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
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
        cell_advance(len(idx), int((new != tokenizer.pad_token_id).sum()))  # the cell's progress (harness/progress.py)
    return out
