"""Options of the ``memgen`` method (``--set method_options.memgen.<name>=<value>``)."""

from __future__ import annotations

from dataclasses import dataclass

WEAVER_INPUTS = ("hidden", "embeddings")


@dataclass(frozen=True)
class MemGenOptions:
    """How the memory weaver is built, where it inserts latents and how it is trained."""

    weaver_model: str | None = None
    """Weaver LM: None = the reasoner's own base with a LoRA adapter (no second copy); else a model name."""
    k_prompt: int = 8
    """Latent tokens inserted after the prompt."""
    k_infer: int = 8
    """Latent tokens inserted at each delimiter during decoding."""
    weaver_input: str = "hidden"
    """What the weaver reads: ``hidden`` (reasoner last-layer states, the paper) or ``embeddings`` (public code)."""
    delimiters: tuple[str, ...] = (",", ".", "\n")
    """A generated token whose text ends with one of these may trigger an insertion."""
    max_insertions: int = 5
    """Cap on insertions during decoding per row (the prompt insertion does not count)."""
    sft_insertions: int = -1
    """Delimiter insertions inside the target during weaver SFT: the first N; -1 = every one up to max_insertions."""
    insert_before_training: bool = False
    """Row 0 (``init``): False = no insertion before the first training stage (the frozen reasoner, as vanilla)."""
    lora_r: int = 16
    """Weaver LoRA rank."""
    lora_alpha: int = 32
    """Weaver LoRA scaling numerator."""
    lora_dropout: float = 0.1
    """Dropout on the weaver's LoRA branch."""
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Weaver modules that get LoRA."""
    lr: float | None = None
    """Weaver learning rate; None = ``train.lr``."""
    temperature: float = 0.0
    """Sampling temperature at evaluation; 0 = greedy."""

    def check(self) -> MemGenOptions:
        if self.weaver_input not in WEAVER_INPUTS:
            raise ValueError(f"memgen option weaver_input={self.weaver_input!r}: use one of {', '.join(WEAVER_INPUTS)}")
        for key in ("k_prompt", "k_infer", "lora_r"):
            if getattr(self, key) < 1:
                raise ValueError(f"memgen option {key} must be >= 1, got {getattr(self, key)}")
        if self.max_insertions < 0:
            raise ValueError(f"memgen option max_insertions must be >= 0, got {self.max_insertions}")
        if self.sft_insertions < -1:
            raise ValueError(f"memgen option sft_insertions must be >= 0 or -1 (up to the cap), got {self.sft_insertions}")
        if not self.delimiters or any(not d for d in self.delimiters):
            raise ValueError(f"memgen option delimiters must be non-empty strings, got {self.delimiters!r}")
        if self.temperature < 0:
            raise ValueError(f"memgen option temperature must be >= 0, got {self.temperature}")
        return self
