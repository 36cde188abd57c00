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
