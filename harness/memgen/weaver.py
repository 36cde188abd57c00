"""The memory weaver and the woven sequence state shared by generation and training.

``MemGenModel`` holds a frozen reasoner and a weaver. The weaver is a LoRA'd LM: by default the reasoner's own
base model with a peft adapter (reasoner forwards run with the adapter switched off, so the reasoner is the
frozen base bit for bit and no second copy of the weights exists), or a separate model whose hidden size may
differ. Around it sit ``WeaverHeads``: the input projection (reasoner -> weaver), the output projection
(weaver -> reasoner embedding space) and two sets of K learned queries (prompt / in-decoding), each with a
LayerNorm and a learned scalar scale.

``WovenState`` is one batch of reasoner sequences with latents woven in. The reasoner keeps one KV cache; a
chunk fed to it may mask some rows out entirely (attention mask 0, position ids not advanced), which is how only
the rows that insert receive latents while the others are left exactly as they were. The weaver keeps its own KV
cache aligned slot for slot with the reasoner's: at an insertion it reads only the states added since the last
insertion plus the K queries, and the query positions are cropped from its cache afterwards.
Prefill computes once what rows share (``feed_prompt``): identical prompts, and the head all prompts start with.
With retrieval (``w_prefix``), the weaver's sequence starts with the token embeddings of the retrieved text
(read by its first call, before the reasoner's states); the reasoner never sees it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from harness.generation import stop_token_ids
from harness.memgen import kv
from harness.memgen.options import MemGenOptions
from harness.models import LoadedModel

WEAVER_ADAPTER = "default"  # peft's name for the first adapter; the LoRA trigger adds its own ("trigger")


def _decoder(model: nn.Module) -> nn.Module:
    """The transformer stack without the LM head (``LlamaModel`` inside ``LlamaForCausalLM``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder() if hasattr(base, "get_decoder") else base.model


def _final_norm_rms(model: nn.Module) -> float:
    """Typical per-dimension size of the last-layer states (= RMS of the final RMSNorm weight), 1.0 if unknown."""
    norm = getattr(_decoder(model), "norm", None)
    w = getattr(norm, "weight", None)
    return float(w.detach().float().pow(2).mean().sqrt()) if w is not None else 1.0


def _embedding_rms(model: nn.Module) -> float:
    return float(model.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())


class QueryBlock(nn.Module):
    """K learned query vectors fed to the weaver after its input: ``scale * LayerNorm(queries)``."""

    def __init__(self, k: int, width: int, init_scale: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(k, width))
        self.norm = nn.LayerNorm(width)
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))

    def forward(self, batch: int) -> torch.Tensor:
        return (self.scale * self.norm(self.queries)).unsqueeze(0).expand(batch, -1, -1)  # (B, K, d_w)


class WeaverHeads(nn.Module):
    """Everything the weaver learns besides its LoRA adapter."""

    def __init__(self, d_reasoner: int, d_weaver: int, k_prompt: int, k_infer: int, scales: dict[str, float]):
        super().__init__()
        self.proj_in = nn.Linear(d_reasoner, d_weaver)
        self.proj_out = nn.Linear(d_weaver, d_reasoner)
        # Start both projections at the scale of the space they write into, so the untrained weaver neither
        # swamps the weaver's input nor inserts latents far larger than the reasoner's token embeddings.
        nn.init.normal_(self.proj_in.weight, std=scales["weaver_emb"] / (scales["in"] * math.sqrt(d_reasoner)))
        nn.init.normal_(self.proj_out.weight, std=scales["reasoner_emb"] / (scales["weaver_out"] * math.sqrt(d_weaver)))
        nn.init.zeros_(self.proj_in.bias)
        nn.init.zeros_(self.proj_out.bias)
        self.prompt = QueryBlock(k_prompt, d_weaver, scales["weaver_emb"])
        self.infer = QueryBlock(k_infer, d_weaver, scales["weaver_emb"])


class MemGenModel(nn.Module):
    """Frozen reasoner + weaver (LoRA LM and heads). Only weaver parameters require gradients."""

    def __init__(self, reasoner: LoadedModel, opts: MemGenOptions, weaver: LoadedModel | None = None):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.opts = opts
        self.tokenizer = reasoner.tokenizer
        self.weaver_tokenizer = reasoner.tokenizer if weaver is None else weaver.tokenizer  # reads retrieved text
        lora = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                          target_modules=list(opts.lora_targets), task_type="CAUSAL_LM")
        for p in reasoner.model.parameters():
            p.requires_grad_(False)
        self.shared = weaver is None
        if self.shared:
            # One set of base weights: the adapter lives on the reasoner's modules and is switched off for it.
            self.peft = get_peft_model(reasoner.model, lora)
            self.reasoner_lm: PreTrainedModel = self.peft.get_base_model()
        else:
            self.reasoner_lm = reasoner.model
            self.peft = get_peft_model(weaver.model, lora)
        self.reasoner = _decoder(self.reasoner_lm)
        self.weaver = _decoder(self.peft)
        self.lm_head = self.reasoner_lm.get_output_embeddings()
        self.embed = self.reasoner_lm.get_input_embeddings()
        self.weaver_embed = self.peft.get_input_embeddings()  # = ``embed`` for the shared base (frozen, no LoRA)
        d_r = self.reasoner_lm.config.hidden_size
        d_w = self.peft.get_base_model().config.hidden_size
        weaver_base = self.peft.get_base_model()
        scales = {
            "in": _final_norm_rms(self.reasoner_lm) if opts.weaver_input == "hidden" else _embedding_rms(self.reasoner_lm),
            "weaver_emb": _embedding_rms(weaver_base),
            "weaver_out": _final_norm_rms(weaver_base),
            "reasoner_emb": _embedding_rms(self.reasoner_lm),
        }
        # The heads stay fp32 whatever the model dtype (cast at use, as peft keeps LoRA weights fp32): an Adam step
        # of about lr is below bf16's spacing for N(0,1) queries and LayerNorm weights of 1.0, which would never move.
        self.heads = WeaverHeads(d_r, d_w, opts.k_prompt, opts.k_infer, scales).to(device=self.embed.weight.device,
                                                                                dtype=torch.float32)
        self._lora_layers = [m for m in self.peft.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]
        self.eval()  # peft creates its LoRA dropout modules in training mode; training switches them on explicitly

    def stop_ids(self) -> list[int]:
        """Where completions end: the tokenizer's EOS, the reasoner's ``generation_config`` EOS ids and the chat
        template's end-of-turn token (the set evaluation, SFT targets and every RL rollout use)."""
        return stop_token_ids(self.tokenizer, getattr(self.reasoner_lm, "generation_config", None))

    # -- which parameters learn ---------------------------------------------------------------------------
    def weaver_parameters(self) -> list[nn.Parameter]:
        """The weaver's LoRA weights (adapter ``default``, selected by name, not by ``requires_grad``) and heads."""
        lora = [p for n, p in self.peft.named_parameters() if "lora_" in n and f".{WEAVER_ADAPTER}." in n]
        return lora + list(self.heads.parameters())

    def check_trainable(self, label: str) -> None:
        """Before a backward: every weaver parameter requires grad and no reasoner weight does (a peft call that
        flips ``requires_grad`` would otherwise silently freeze the weaver or train the reasoner)."""
        lost = [n for n, p in self.peft.named_parameters() if "lora_" in n and f".{WEAVER_ADAPTER}." in n
                and not p.requires_grad] + [n for n, p in self.heads.named_parameters() if not p.requires_grad]
        leaked = [n for n, p in self.reasoner_lm.named_parameters() if p.requires_grad and "lora_" not in n]
        if lost or leaked:
            raise RuntimeError(f"{label}: weaver parameters without grad {lost[:3]} / reasoner weights with grad "
                               f"{leaked[:3]}; something toggled requires_grad (use weaver_mode/reasoner_mode)")

    def lora_dropout_modules(self, adapter: str = "default") -> list[nn.Module]:
        """The dropout modules of one LoRA adapter: the only modules training ever switches to train mode."""
        return [m.lora_dropout[adapter] for m in self._lora_layers if adapter in m.lora_dropout]

    @contextlib.contextmanager
    def weaver_dropout(self, on: bool = True) -> Iterator[None]:
        """Inside: the weaver's LoRA dropout in train mode (``on``), everything else in eval mode.

        ``peft.train()`` would also switch the reasoner's own modules (attention / hidden dropout of models that
        have it) to train mode, and the frozen reasoner would then no longer be deterministic."""
        mods = self.lora_dropout_modules()
        saved = [m.training for m in mods]
        self.eval()
        for m in mods:
            m.train(on)
        try:
            yield
        finally:
            for m, was in zip(mods, saved, strict=True):
                m.train(was)

    def reasoner_state(self) -> dict[str, torch.Tensor]:
        """The reasoner's own weights (LoRA excluded), for checks that they never change."""
        return {k: v for k, v in self.reasoner_lm.state_dict().items() if "lora_" not in k}

    # -- adapter switching ----------------------------------------------------------------------------------
    def _set_adapter(self, enabled: bool) -> None:
        # The disabled flag of the ~2 LoRA modules per layer is set directly: cheaper than peft's
        # ``disable_adapter()``, which walks every module (this runs twice per insertion while decoding), and unlike
        # peft's ``enable_adapters`` it never touches ``requires_grad`` (which peft flips off on disable and, on
        # enable, sets for the active adapter only), so the weaver's and the trigger's trainable sets stay put.
        for m in self._lora_layers:
            m._disable_adapters = not enabled
        self._adapter_on = enabled

    @contextlib.contextmanager
    def _adapter(self, enabled: bool) -> Iterator[None]:
        if not self.shared or getattr(self, "_adapter_on", True) == enabled:
            yield
            return
        self._set_adapter(enabled)
        try:
            yield
        finally:
            self._set_adapter(not enabled)

    def reasoner_mode(self) -> contextlib.AbstractContextManager[None]:
        """Inside: the shared base runs as the frozen reasoner (adapter off). No-op for a separate weaver."""
        return self._adapter(False)

    def weaver_mode(self) -> contextlib.AbstractContextManager[None]:
        """Inside: the shared base runs as the weaver (adapter on)."""
        return self._adapter(True)


def positions(start: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a chunk: ``start`` (B,) plus the count of unmasked slots before each one.

    Masked slots (padding, rows that skip an insertion) do not advance the position, so a row that receives
    nothing keeps exactly the positions it would have had without the chunk.
    """
    return start[:, None] + (mask.cumsum(1) - 1).clamp(min=0)  # (B, T)


MIN_SHARED_PREFIX = 8
"""Shortest common prompt prefix ``WovenState.feed_prompt`` feeds once (below it the extra forward costs more)."""


def _common_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Tokens every left-padded row of ``ids``/``mask`` (B, P) starts with, at most the shortest row's length - 1
    (every row keeps a last token of its own)."""
    lengths = mask.sum(1)  # (B,)
    shortest = int(lengths.min())
    if shortest < 2:
        return 0
    width = ids.shape[1]
    starts = width - lengths  # (B,) first real slot (left padding)
    cols = starts[:, None] + torch.arange(shortest - 1, device=ids.device)[None, :]  # (B, shortest - 1)
    heads = ids.gather(1, cols)  # (B, shortest - 1): each row's first tokens
    same = (heads == heads[:1]).all(0)  # (shortest - 1,)
    return int(same.long().cumprod(0).sum())


def _drop_prefix(ids: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The left-padded rows (B, P) without their first ``n`` real tokens: (B, P') ids and mask, P' = the longest
    rest (the freed slots become left padding)."""
    lengths = mask.sum(1) - n  # (B,)
    width = int(lengths.max())
    mask = mask.clone()
    starts = mask.shape[1] - mask.sum(1)  # (B,)
    cols = starts[:, None] + torch.arange(n, device=ids.device)[None, :]  # (B, n) the prefix's slots
    mask.scatter_(1, cols, 0)
    return ids[:, -width:], mask[:, -width:]


def _as_they_lie(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unread span from the first column any row has unread, dead slots included, padding zeroed."""
    cols = mask.any(0).nonzero()
    start = int(cols[0]) if len(cols) else mask.shape[1]
    states, mask = states[:, start:], mask[:, start:]
    return torch.where(mask[..., None].bool(), states, torch.zeros((), dtype=states.dtype,
                                                                   device=states.device)), mask


def _packed(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The states the weaver has not read (B, T, d_r) with their mask (B, T), each row's live ones packed to the
    right in order (B, T', d_r) / (B, T'), padding zeroed.

    Unread spans are full of slots a row does not have: the K latent slots of every insertion other rows made, a
    round's right padding. Packed, the weaver computes only live slots plus the padding of the row with the most
    (measured on a trained weaver's ``quick`` evaluation row: 70% of the slots it was handed were dead). Positions
    come from the mask, so they do not change; outputs are the same up to float summation order. Decoding only
    (no gradients); see below."""
    if bool(mask.all()):
        return states, mask
    if torch.is_grad_enabled():
        # Training's replay (weaver SFT, the GRPO recompute) has little to pack (a round's padding), and there the
        # gather and its backward may cost more than they save: with packing the default run's weaver SFT took
        # 622 s against 508 s without (one run each, not an A/B). So with gradients the states go as they lie.
        return _as_they_lie(states, mask)
    index, packed = kv.right_aligned(mask)  # (B, T'), (B, T')
    states = states.gather(1, index[..., None].expand(*index.shape, states.shape[2]))
    # Padding may hold garbage (even NaN for fully padded rows); zero it so 0-weight attention stays 0.
    return torch.where(packed[..., None].bool(), states, torch.zeros((), dtype=states.dtype,
                                                                      device=states.device)), packed


def _distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For a (B, T) tensor: the index of the first copy of each distinct row (U,) and each row's copy (B,) in
    it; (None, arange) when every row differs."""
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if len(uniq) == len(rows):
        return None, torch.arange(len(rows), device=rows.device)
    first = torch.full((len(uniq),), len(rows), device=rows.device).scatter_reduce(
        0, inverse, torch.arange(len(rows), device=rows.device), "amin")  # (U,) in sorted-row order
    return first, inverse


@dataclass
class WovenState:
    """A batch of reasoner sequences with latents, their KV caches and the states the weaver has not read yet."""

    mm: MemGenModel
    cache: DynamicCache = field(default_factory=DynamicCache)
    mask: torch.Tensor | None = None  # (B, L) reasoner attention mask over every cached slot
    next_pos: torch.Tensor | None = None  # (B,) position id of each row's next real slot
    w_cache: DynamicCache = field(default_factory=DynamicCache)
    w_mask: torch.Tensor | None = None  # (B, L_w) the part of ``mask`` the weaver has read
    w_next_pos: torch.Tensor | None = None  # (B,)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # [(states (B,T,d_r), mask (B,T))]
    w_prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, R) weaver-token ids + mask, read before anything
    observer: Callable[[torch.Tensor, torch.Tensor], None] | None = None  # sees every fed chunk: (states, mask)

    def feed(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the reasoner (adapter off: call inside ``mm.reasoner_mode()``) on a chunk; returns (B, T, d_r).

        ``embeds`` (B, T, d_r) are input embeddings (tokens or latents); ``mask`` (B, T) is 1 where a row really
        has that slot.
        """
        mask = mask.to(torch.long)
        B = embeds.shape[0]
        if self.mask is None:
            self.mask = mask.new_zeros((B, 0))
            self.next_pos = mask.new_zeros(B)
            self.w_mask = mask.new_zeros((B, 0))
            self.w_next_pos = mask.new_zeros(B)
        full = torch.cat([self.mask, mask], dim=1)  # (B, L + T)
        out = self.mm.reasoner(inputs_embeds=embeds, attention_mask=full, position_ids=positions(self.next_pos, mask),
                               cache=self.cache, use_cache=True)
        hidden = out.last_hidden_state  # (B, T, d_r)
        self.mask = full
        self.next_pos = self.next_pos + mask.sum(1)
        src = hidden if self.mm.opts.weaver_input == "hidden" else embeds
        self.pending.append((src, mask))
        if self.observer is not None:  # e.g. the LoRA trigger (trigger_lm.py) reads every reasoner state
            self.observer(hidden, mask)
        return hidden

    def weave(self, kind: str) -> torch.Tensor:
        """Latents (B, K, d_r) for every row from the sequence so far (rows that will not insert are discarded)."""
        mm = self.mm
        block = mm.heads.prompt if kind == "prompt" else mm.heads.infer
        states, mask = _packed(torch.cat([s for s, _ in self.pending], dim=1),
                               torch.cat([m for _, m in self.pending], dim=1))  # (B, T, d_r), (B, T)
        self.pending = []
        # Heads run in fp32 (their parameters are fp32); the weaver LM in its own dtype.
        w_dtype = mm.weaver_embed.weight.dtype
        q = block(mask.shape[0])  # (B, K, d_w) fp32
        B, K = q.shape[:2]
        x = torch.cat([mm.heads.proj_in(states.float()), q], dim=1).to(w_dtype)  # (B, T + K, d_w)
        if self.w_prefix is not None:  # retrieved text: the weaver reads its token embeddings first (once)
            p_ids, p_mask = self.w_prefix
            self.w_prefix = None
            x = torch.cat([mm.weaver_embed(p_ids).to(w_dtype), x], dim=1)  # (B, R + T + K, d_w)
            mask = torch.cat([p_mask.to(mask.dtype), mask], dim=1)  # (B, R + T)
        qmask = mask.new_ones((B, K))
        full = torch.cat([self.w_mask, mask, qmask], dim=1)  # (B, L_w + T + K)
        pos = positions(self.w_next_pos, torch.cat([mask, qmask], dim=1))
        with mm.weaver_mode():
            out = mm.weaver(inputs_embeds=x, attention_mask=full, position_ids=pos, cache=self.w_cache,
                            use_cache=True).last_hidden_state  # (B, T + K, d_w)
        self.w_cache.crop(-K)  # the queries are not part of the sequence the weaver reads next time
        self.w_mask = torch.cat([self.w_mask, mask], dim=1)
        self.w_next_pos = self.w_next_pos + mask.sum(1)
        return mm.heads.proj_out(out[:, -K:].float()).to(mm.embed.weight.dtype)  # (B, K, d_r)

    def feed_prompt(self, ids: torch.Tensor, mask: torch.Tensor, weave: bool,
                    share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefill left-padded prompts ``ids``/``mask`` (B, P) into an empty state (inside ``mm.reasoner_mode()``)
        and, with ``weave``, weave the prompt latents. Returns the states of the prompts' last slots (B, T, d_r),
        T <= P (``[:, -1]`` is each row's last prompt state), and the latents (B, K_p, d_r) or None.

        Two kinds of repeated work are done once (gradients reach the weaver through the copies, summed):
        - identical rows (a GRPO group: one prompt, ``group`` rollouts) are computed once and copied;
        - with ``share_prefix``, the tokens every distinct prompt starts with (the chat template's system turn and
          a task's fixed instruction: about half of a ``quick`` prompt) are fed once, as a batch of one, to the
          reasoner and read once by the weaver; each row's cache then holds [shared prefix | padding | its rest].
        Keys sit elsewhere in the cache but carry their own positions, so the result is the one of feeding every
        row up to float summation order (``tests/test_grpo_memgen.py``, ``tests/test_memgen_generation.py``). Not
        with an observer (it must see every row), a retrieved-text prefix or caches the row operations do not
        support: then every row is fed."""
        if self.observer is not None or self.w_prefix is not None or self.mask is not None:
            hidden = self.feed(self.mm.embed(ids), mask)
            return hidden, self.weave("prompt") if weave else None
        first, inverse = _distinct_rows(torch.cat([ids, mask.to(ids.dtype)], dim=1))
        u_ids, u_mask = (ids, mask) if first is None else (ids[first], mask[first])  # (U, P)
        n = _common_prefix(u_ids, u_mask) if share_prefix and len(u_ids) > 1 else 0
        if n >= MIN_SHARED_PREFIX:
            start = int((u_mask[0] == 0).sum())  # row 0's first real slot
            self.feed(self.mm.embed(u_ids[:1, start:start + n]), u_mask.new_ones((1, n)))
            self.read_pending()
            if kv.supports(self.cache) and kv.supports(self.w_cache):
                self.repeat_rows(torch.zeros(len(u_ids), dtype=torch.long, device=ids.device))
                u_ids, u_mask = _drop_prefix(u_ids, u_mask, n)
            else:  # layer types are known only once filled (e.g. sliding windows): start again, every row fed
                self._reset()
                first, inverse = None, torch.arange(len(ids), device=ids.device)
                u_ids, u_mask = ids, mask
        hidden = self.feed(self.mm.embed(u_ids), u_mask)  # (U, T, d_r)
        lat = self.weave("prompt") if weave else None  # (U, K_p, d_r)
        if first is None:
            return hidden, lat
        if kv.supports(self.cache) and kv.supports(self.w_cache):
            self.repeat_rows(inverse)
            return hidden[inverse], None if lat is None else lat[inverse]
        self._reset()  # the caches' layer types are known only once filled: start again, every row fed
        hidden = self.feed(self.mm.embed(ids), mask)
        return hidden, self.weave("prompt") if weave else None

    def _reset(self) -> None:
        self.cache, self.w_cache, self.pending = DynamicCache(), DynamicCache(), []
        self.mask = self.next_pos = self.w_mask = self.w_next_pos = None

    def read_pending(self) -> None:
        """The weaver reads every pending state now, without queries (what its next ``weave`` would read first)."""
        mm = self.mm
        states, mask = _packed(torch.cat([s for s, _ in self.pending], dim=1),
                               torch.cat([m for _, m in self.pending], dim=1))  # (B, T, d_r), (B, T)
        self.pending = []
        x = mm.heads.proj_in(states.float()).to(mm.weaver_embed.weight.dtype)  # (B, T, d_w)
        with mm.weaver_mode():
            mm.weaver(inputs_embeds=x, attention_mask=torch.cat([self.w_mask, mask], dim=1),
                      position_ids=positions(self.w_next_pos, mask), cache=self.w_cache, use_cache=True)
        self.w_mask = torch.cat([self.w_mask, mask], dim=1)
        self.w_next_pos = self.w_next_pos + mask.sum(1)

    def repeat_rows(self, index: torch.Tensor) -> None:
        """Make row b a copy of row ``index[b]`` (B_new,) of the present batch: both caches, masks, positions and
        unread states (autograd follows the copies)."""
        self.cache = kv.select_rows(self.cache, index)
        self.w_cache = kv.select_rows(self.w_cache, index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.w_mask, self.w_next_pos = self.w_mask[index], self.w_next_pos[index]
        self.pending = [(x[index], m[index]) for x, m in self.pending]
        if self.w_prefix is not None:
            self.w_prefix = (self.w_prefix[0][index], self.w_prefix[1][index])

    # -- rows that insert alone (decoding) ------------------------------------------------------------------------
    def _unread(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pending state (B, T, d_r) and its mask (B, T): 1 where a row has not had the weaver read it."""
        if len(self.pending) > 1:
            self.pending = [(torch.cat([x for x, _ in self.pending], 1), torch.cat([m for _, m in self.pending], 1))]
        return self.pending[0]

    def _set_unread(self, states: torch.Tensor, mask: torch.Tensor) -> None:
        keep = mask.any(0).nonzero()  # drop the leading columns every row has read
        start = int(keep[0]) if len(keep) else mask.shape[1]
        self.pending = [(states[:, start:], mask[:, start:])] if start < mask.shape[1] else []

    def drop_pending(self, rows: torch.Tensor) -> None:
        """Rows (B,) bool that will never insert again (finished, or at the cap): forget their unread states."""
        if self.pending and bool(rows.any()):
            states, mask = self._unread()
            self._set_unread(states, mask * (~rows)[:, None].to(mask.dtype))

    def weave_rows(self, kind: str, rows: torch.Tensor) -> torch.Tensor:
        """Latents (n, K, d_r) for ``rows`` (n,) only: the weaver reads just their unread states, on a cache
        restricted to them; the other rows keep theirs for later. Same latents as ``weave`` gives those rows."""
        mm = self.mm
        if self.w_prefix is not None or not (kv.supports(self.w_cache) and kv.supports(self.cache)):
            return self.weave(kind)[rows]  # the retrieved-text prefix is read once, by every row together
        block = mm.heads.prompt if kind == "prompt" else mm.heads.infer
        all_states, all_mask = self._unread()  # (B, T, d_r), (B, T)
        states, mask = _packed(all_states[rows], all_mask[rows])  # (n, T', d_r), (n, T')
        q = block(len(rows))  # (n, K, d_w) fp32
        K = q.shape[1]
        x = torch.cat([mm.heads.proj_in(states.float()), q], dim=1).to(mm.weaver_embed.weight.dtype)
        w_mask = self.w_mask[rows]  # (n, L_w)
        full = torch.cat([w_mask, mask, mask.new_ones((len(rows), K))], dim=1)  # (n, L_w + T' + K)
        pos = positions(self.w_next_pos[rows], torch.cat([mask, mask.new_ones((len(rows), K))], dim=1))
        sub = kv.select_rows(self.w_cache, rows)
        with mm.weaver_mode():
            out = mm.weaver(inputs_embeds=x, attention_mask=full, position_ids=pos, cache=sub,
                            use_cache=True).last_hidden_state  # (n, T' + K, d_w)
        sub.crop(-K)
        width = mask.shape[1]
        if width:  # the states just read join the weaver's cache of these rows; the other rows get dead slots
            kv.append_rows(self.w_cache, sub, rows, width)
            grown = self.w_mask.new_zeros((self.w_mask.shape[0], width))
            grown[rows] = mask
            self.w_mask = torch.cat([self.w_mask, grown], dim=1)
            self.w_next_pos = self.w_next_pos.index_add(0, rows, mask.sum(1))
            read = all_mask.clone()
            read[rows] = 0
            self._set_unread(all_states, read)
        return mm.heads.proj_out(out[:, -K:].float()).to(mm.embed.weight.dtype)  # (n, K, d_r)

    def feed_rows(self, embeds: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the reasoner on a chunk (n, T, d_r) for ``rows`` (n,) only (inside ``mm.reasoner_mode()``); the other
        rows get masked slots without any compute. ``mask`` (n, T): 1 where a row really has the slot (default:
        all). Returns the rows' states (n, T, d_r)."""
        B, (n, T) = self.mask.shape[0], embeds.shape[:2]
        part = self.mask.new_ones((n, T)) if mask is None else mask.to(self.mask.dtype)  # (n, T)
        chunk = self.mask.new_zeros((B, T))
        chunk[rows] = part
        if not kv.supports(self.cache):  # e.g. sliding-window layers: every row gets the chunk, masked where absent
            full_embeds = embeds.new_zeros((B, T, embeds.shape[2]))
            full_embeds[rows] = embeds
            return self.feed(full_embeds, chunk)[rows]
        sub = kv.select_rows(self.cache, rows)
        hidden = self.mm.reasoner(inputs_embeds=embeds, attention_mask=torch.cat([self.mask[rows], part], dim=1),
                                  position_ids=positions(self.next_pos[rows], part), cache=sub,
                                  use_cache=True).last_hidden_state  # (n, T, d_r)
        kv.append_rows(self.cache, sub, rows, T)
        self.mask = torch.cat([self.mask, chunk], dim=1)
        self.next_pos = self.next_pos.index_add(0, rows, part.sum(1))
        full = hidden.new_zeros((B, T, hidden.shape[2]))
        full[rows] = hidden
        if self.mm.opts.weaver_input == "hidden":
            self.pending.append((full, chunk))
        else:
            src = embeds.new_zeros((B, T, embeds.shape[2]))
            src[rows] = embeds
            self.pending.append((src, chunk))
        if self.observer is not None:
            self.observer(full, chunk)
        return hidden

    def compact(self, min_dead: int = 32) -> None:
        """Drop the dead slots of the reasoner's and the weaver's caches once at least ``min_dead`` (and a quarter of
        the cache) have piled up: each row's slots move right, padding goes left, outputs stay the same."""
        for cache_name, mask_name in (("cache", "mask"), ("w_cache", "w_mask")):
            cache, mask = getattr(self, cache_name), getattr(self, mask_name)
            if mask is None or not kv.supports(cache):
                continue
            dead = kv.dead_slots(mask)
            if dead >= min_dead and 4 * dead >= mask.shape[1]:
                setattr(self, mask_name, kv.compact(cache, mask))
