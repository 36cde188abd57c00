"""SFT's collation with ``trim_logits``: the head runs on the target positions only, and the loss and the LoRA
gradients are those of the full-logits forward (rows of different prompt and target lengths, right padding)."""

from __future__ import annotations

import torch

from harness.config import RunConfig
from harness.training import accepts_logits_to_keep, pad_right, tokenize_prompt_target, trainable_model


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trimmed_logits_give_the_full_loss_and_gradients(tiny):
    lm = tiny(0)
    tok = lm.tokenizer
    model = trainable_model(lm.model, RunConfig(model="tiny-random"), "sft")
    with torch.no_grad():  # a non-zero adapter, so the gradients reach every LoRA matrix
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    assert accepts_logits_to_keep(model)
    rows = [tokenize_prompt_target(tok, p, t, 256) for p, t in [
        ("What is 2 + 3?", "5"), ("Reverse these words for me: a b c d e f", "f e d c b a"),
        ("Hi", "Hello there, how are you today?")]]
    full = pad_right(rows, tok.pad_token_id)
    trim = pad_right(rows, tok.pad_token_id, trim_logits=True)
    start = min(r["prompt_len"] for r in rows) - 1
    assert trim["logits_to_keep"] == full["input_ids"].shape[1] - start
    assert torch.equal(trim["labels"], full["labels"][:, start:])
    assert bool((full["labels"][:, :start + 1] == -100).all())  # only prompt labels were cut
    model.train(False)  # no dropout: the two forwards must see the same function
    loss_full, g_full = _loss_and_grads(model, full)
    loss_trim, g_trim = _loss_and_grads(model, trim)
    torch.testing.assert_close(loss_trim, loss_full, rtol=1e-6, atol=1e-6)
    assert g_full.keys() == g_trim.keys() and g_full
    for n in g_full:
        torch.testing.assert_close(g_trim[n], g_full[n], rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_cpu_training_runs_eager_attention_and_a_contiguous_head_input(tiny):
    """``training_attention``: eager attention inside (bf16 on CPU only), sdpa again after, the same loss and LoRA
    gradients up to bf16 rounding; the head's pre-hook gives the same logits as without it."""
    from harness.training import training_attention

    lm = tiny(0)
    tok = lm.tokenizer
    model = trainable_model(lm.model, RunConfig(model="tiny-random"), "sft")
    with training_attention(model):  # fp32: nothing switches
        assert model.get_base_model().config._attn_implementation == "sdpa"
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    rows = [tokenize_prompt_target(tok, p, t, 256) for p, t in [("What is 2 + 3?", "5"), ("Hi", "Hello there, friend")]]
    batch = pad_right(rows, tok.pad_token_id, trim_logits=True)
    model.train(False)
    loss_sdpa, g_sdpa = _loss_and_grads(model, batch)
    base = model.get_base_model()
    with training_attention(model, base):  # the same base twice: switched once, restored once
        assert base.config._attn_implementation == "eager" and base.model.config._attn_implementation == "eager"
        loss_eager, g_eager = _loss_and_grads(model, batch)
    assert base.config._attn_implementation == "sdpa"
    torch.testing.assert_close(loss_eager, loss_sdpa, rtol=2e-2, atol=2e-2)
    for n in g_sdpa:
        assert torch.nn.functional.cosine_similarity(g_eager[n].float().flatten(), g_sdpa[n].float().flatten(),
                                                     dim=0) > 0.99, n
    head = base.get_output_embeddings()
    assert head._memgen_contiguous_input  # load_model registered the pre-hook
    h = torch.randn(2, 6, head.in_features, dtype=torch.bfloat16)[:, -3:]  # a strided slice, as logits_to_keep makes
    assert not h.is_contiguous()
    assert torch.equal(head(h), torch.nn.functional.linear(h.contiguous(), head.weight))
