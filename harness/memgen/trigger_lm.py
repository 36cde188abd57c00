"""The LoRA memory trigger: the shared base with its own adapter, reading the reasoner's states so far.

``TriggerLM`` adds a second peft adapter (``trigger``) to the base the reasoner and the weaver already share, so
no weights are copied. It reads the reasoner's last-layer states (latents included, the paper's input; the public
code's trigger re-reads token ids and never sees latents) through an input projection, exactly as the weaver's
``hidden`` input path does, and a 2-way head (``TriggerHead``, zero-initialised: p(insert) = 0.5 at the start) on
its own last state gives p(insert) at a delimiter.

During decoding a ``TriggerSession`` keeps the trigger's own KV cache: ``WovenState`` hands it every chunk the
reasoner is fed (``observe``), and at a query it reads only the states added since its last query. For training
it also keeps the whole state sequence, and ``TriggerLM.decision_logits`` recomputes the decisions' logits with
gradients in one forward over it (same positions and masks as the cached decoding, so the same numbers up to
float rounding; tested).

Adapter switching: the LoRA layers' active adapter and disabled flag are set directly (``trigger_mode``) and
restored afterwards, instead of peft's ``set_adapter``, which would also flip ``requires_grad`` on the weaver's
adapter (the weaver's own on/off switch, ``MemGenModel._set_adapter``, never touches ``requires_grad`` either).
The trigger's own parameters (projection, head) are fp32 whatever the model dtype. The reasoner (adapters off) and the weaver (adapter ``default``) never see the trigger's adapter.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from transformers import DynamicCache

from harness.memgen.weaver import MemGenModel, _embedding_rms, _final_norm_rms, positions

ADAPTER = "trigger"


class TriggerHead(nn.Module):
    """p(insert) from a state: LayerNorm then Linear(d, 2) (0 = skip, 1 = insert), zero-initialised (p = 0.5)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, 2)
        nn.init.zeros_(self.out.weight)  # p = 0.5 everywhere at the start: maximal exploration
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(hidden.to(self.out.weight.dtype)))  # (..., 2) logits


def _zero_masked(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked slots may hold garbage (even NaN for fully padded rows); zero them so 0-weight attention stays 0."""
    return torch.where(mask[..., None].bool(), states, torch.zeros((), dtype=states.dtype, device=states.device))


class TriggerLM(nn.Module):
    """The trigger: LoRA adapter ``trigger`` on the shared base + input projection + 2-way head.

    Its own parameters (``proj_in``, ``head``) are submodules; the adapter lives in ``mm.peft``. ``parameters_to_train``
    lists both. The weaver's LoRA rank, alpha and target modules are reused; dropout is 0 so that the log-probs
    recomputed for training are those of the policy that sampled (one gradient step per batch, PPO ratio 1).
    """

    def __init__(self, mm: MemGenModel):
        super().__init__()
        from peft import LoraConfig

        if not mm.shared:
            raise ValueError("memgen option trigger_model=lora needs the shared base (weaver_model unset)")
        opts = mm.opts
        if ADAPTER not in mm.peft.peft_config:
            cfg = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=0.0,
                             target_modules=list(opts.lora_targets), task_type="CAUSAL_LM")
            mm.peft.add_adapter(ADAPTER, cfg)
        object.__setattr__(self, "mm", mm)  # not a submodule: the base model is not the trigger's to save
        self._layers = [m for m in mm.peft.modules() if hasattr(m, "lora_A") and hasattr(m, "enable_adapters")]
        d_r = mm.reasoner_lm.config.hidden_size
        base = mm.peft.get_base_model()
        self.proj_in = nn.Linear(d_r, d_r)
        # As the weaver's input projection: reasoner last-layer states -> the size of the base's token embeddings.
        nn.init.normal_(self.proj_in.weight, std=_embedding_rms(base) / (_final_norm_rms(base) * math.sqrt(d_r)))
        nn.init.zeros_(self.proj_in.bias)
        self.head = TriggerHead(d_r)
        # fp32 whatever the model dtype, cast at use (as peft keeps the adapter fp32): Adam steps of about lr are
        # below bf16's spacing for weights of order 1 and would be lost.
        self.to(device=mm.embed.weight.device, dtype=torch.float32)
        self.set_adapter_trainable(False)

    # -- parameters -------------------------------------------------------------------------------------------
    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.mm.peft.named_parameters() if f".{ADAPTER}." in n]

    def parameters_to_train(self) -> list[nn.Parameter]:
        return self.adapter_parameters() + list(self.parameters())

    def set_adapter_trainable(self, on: bool) -> None:
        """``requires_grad`` of the trigger adapter (off outside trigger training, so the weaver never lists it)."""
        for p in self.adapter_parameters():
            p.requires_grad_(on)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.mm.peft, adapter_name=ADAPTER)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.mm.peft, state, adapter_name=ADAPTER)

    # -- running ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def trigger_mode(self) -> Iterator[None]:
        """Inside: the shared base runs with the trigger adapter only (whatever mode it was in is restored)."""
        saved = [(m._active_adapter, m._disable_adapters) for m in self._layers]
        for m in self._layers:
            m._active_adapter = [ADAPTER]
            m._disable_adapters = False
        try:
            yield
        finally:
            for m, (active, disabled) in zip(self._layers, saved, strict=True):
                m._active_adapter = active
                m._disable_adapters = disabled

    def forward_states(self, states: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                       cache: DynamicCache | None = None) -> torch.Tensor:
        """The trigger LM's last-layer states (B, T, d) over reasoner states (B, T, d_r); ``mask`` covers the cache
        and the chunk (B, L + T), ``pos`` (B, T) the chunk's position ids."""
        T = states.shape[1]
        x = self.proj_in(_zero_masked(states, mask[:, -T:]).float()).to(self.mm.embed.weight.dtype)  # (B, T, d)
        with self.trigger_mode():
            return self.mm.weaver(inputs_embeds=x, attention_mask=mask, position_ids=pos, cache=cache,
                                  use_cache=cache is not None).last_hidden_state  # (B, T, d)

    def decision_logits(self, states: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits (B, J, 2) at slots ``index`` (B, J) of recorded reasoner states (B, L, d_r) / mask (B, L), with
        gradients: one forward over the whole recorded sequence."""
        pos = positions(mask.new_zeros(mask.shape[0]), mask)  # (B, L)
        out = self.forward_states(states, mask, pos)  # (B, L, d)
        picked = out.gather(1, index[..., None].expand(-1, -1, out.shape[-1]))  # (B, J, d)
        return self.head(picked).float()  # (B, J, 2)


class TriggerSession:
    """One decoding batch of the LoRA trigger: its KV cache over the reasoner states it has read so far."""

    def __init__(self, lm: TriggerLM, keep: bool):
        self.lm = lm
        self.keep = keep  # keep the whole state sequence (training recomputes the decisions from it)
        self.cache = DynamicCache()
        self.mask: torch.Tensor | None = None  # (B, L_read) over every slot the trigger has read
        self.next_pos: torch.Tensor | None = None  # (B,)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # [(states (B, T, d_r), mask (B, T))]
        self.seq: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.length = 0  # slots observed so far

    def observe(self, states: torch.Tensor, mask: torch.Tensor) -> None:
        item = (states.detach(), mask.to(torch.long))
        self.pending.append(item)
        if self.keep:
            self.seq.append(item)
        self.length += states.shape[1]

    @torch.no_grad()
    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        """p(insert) (B,) of every row at its latest slot, and that slot's index (B,) in the observed sequence."""
        states = torch.cat([s for s, _ in self.pending], dim=1)  # (B, T, d_r)
        mask = torch.cat([m for _, m in self.pending], dim=1)  # (B, T)
        self.pending = []
        B, T = mask.shape
        if self.mask is None:
            self.mask = mask.new_zeros((B, 0))
            self.next_pos = mask.new_zeros(B)
        full = torch.cat([self.mask, mask], dim=1)  # (B, L + T)
        out = self.lm.forward_states(states, full, positions(self.next_pos, mask), self.cache)  # (B, T, d)
        self.mask = full
        self.next_pos = self.next_pos + mask.sum(1)
        # The latest real slot of each row (the delimiter token just fed, for every row the trigger is asked about).
        last = T - 1 - mask.flip(1).argmax(1)  # (B,)
        h = out[torch.arange(B, device=out.device), last]  # (B, d)
        p = torch.softmax(self.lm.head(h).float(), -1)[:, 1]  # (B,)
        return p, self.length - T + last

    def sequence(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every observed state (B, L, d_r) and its mask (B, L) (only with ``keep``)."""
        return torch.cat([s for s, _ in self.seq], dim=1), torch.cat([m for _, m in self.seq], dim=1)
