"""Stop tokens: the union of the tokenizer's EOS, the model's ``generation_config.eos_token_id`` and the chat
template's end-of-turn token, for tokenizers of different families that arrive offline (SmolLM2's ChatML, and
Gemma- and Llama-3-style tokenizers built here); SFT targets end with the same end-of-turn token; generation stops
there (a real tiny model whose output head is set to prefer one token)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from harness.generation import end_of_turn_id, end_of_turn_token, generate_greedy, stop_token_ids
from harness.models import load_tokenizer
from harness.training import tokenize_prompt_target
from tasks.base import render_prompt

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
FAMILIES = {  # name: (template, EOS, end-of-turn, the other special tokens)
    "gemma": (GEMMA_TEMPLATE, "<eos>", "<end_of_turn>", ["<start_of_turn>"]),
    "llama3": (LLAMA3_TEMPLATE, "<|end_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
}


def family_tokenizer(name: str):
    """SmolLM2's vocabulary with another family's special tokens, EOS and chat template."""
    template, eos, eot, others = FAMILIES[name]
    tok = load_tokenizer("smollm2-135m")
    tok.add_special_tokens({"eos_token": eos, "additional_special_tokens": [eot, *others]})
    tok.chat_template = template
    return tok


def test_smollm2_chatml():
    tok = load_tokenizer("smollm2-135m")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_token(tok) == "<|im_end|>" and end_of_turn_id(tok) == im_end == tok.eos_token_id
    assert stop_token_ids(tok) == [im_end]
    # the model's own list is kept whole (int or list), not replaced
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=0)) == sorted({0, im_end})
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=[0, 7])) == sorted({0, 7, im_end})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_families_end_of_turn_from_the_template(family):
    tok = family_tokenizer(family)
    _, eos, eot, _ = FAMILIES[family]
    eos_id, eot_id = tok.convert_tokens_to_ids(eos), tok.convert_tokens_to_ids(eot)
    assert tok.eos_token_id == eos_id != eot_id
    assert end_of_turn_token(tok) == eot and end_of_turn_id(tok) == eot_id
    assert stop_token_ids(tok) == sorted({eos_id, eot_id})
    # Llama-3 / Gemma ship generation_config.eos_token_id as a list: the union
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=[eos_id, eot_id, 5])) == sorted({eos_id, eot_id, 5})
    # SFT targets end with the end-of-turn token, not the EOS
    prompt = render_prompt("What is 2+2?", tok)
    row = tokenize_prompt_target(tok, prompt, "Answer: 4", max_length=128)
    assert row["input_ids"][-1] == eot_id and row["labels"][-1] == eot_id


def test_no_chat_template_falls_back_to_eos():
    tok = load_tokenizer("smollm2-135m")
    tok.chat_template = None
    assert end_of_turn_token(tok) is None and end_of_turn_id(tok) == tok.eos_token_id
    assert stop_token_ids(tok) == [tok.eos_token_id]


def prefer(model, token_id: int) -> None:
    """Replace the output head by one whose logits are 10 at ``token_id`` and 0 elsewhere (greedy picks it)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    head = torch.nn.Linear(model.config.hidden_size, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head


def test_generate_greedy_stops_on_the_models_own_eos_ids(tiny):
    """generate_greedy passes the model's generation_config: a plain token declared as an EOS there ends the
    completion after one token; undeclared, the model repeats it up to the budget."""
    lm = tiny()
    hello = lm.tokenizer.convert_tokens_to_ids("Hello")
    prefer(lm.model, hello)
    prompt = render_prompt("Say hi.", lm.tokenizer)
    lm.model.generation_config.eos_token_id = lm.tokenizer.eos_token_id
    assert generate_greedy(lm.model, lm.tokenizer, [prompt], max_new_tokens=5) == ["Hello" * 5]
    lm.model.generation_config.eos_token_id = [lm.tokenizer.eos_token_id, hello]
    assert generate_greedy(lm.model, lm.tokenizer, [prompt], max_new_tokens=5) == ["Hello"]


def test_generation_stops_at_another_familys_end_of_turn(tiny):
    lm = tiny()
    tok = family_tokenizer("gemma")
    lm.model.resize_token_embeddings(len(tok))
    eot_id = tok.convert_tokens_to_ids("<end_of_turn>")
    prefer(lm.model, eot_id)
    enc = tok([render_prompt("Say hi.", tok)], return_tensors="pt", add_special_tokens=False)
    n = enc["input_ids"].shape[1]
    out = lm.model.generate(**enc, max_new_tokens=5, do_sample=False, eos_token_id=stop_token_ids(tok),
                            pad_token_id=tok.pad_token_id)
    assert out[0, n:].tolist() == [eot_id]  # stopped at once
    out = lm.model.generate(**enc, max_new_tokens=5, do_sample=False, eos_token_id=[tok.eos_token_id],
                            pad_token_id=tok.pad_token_id)
    assert out[0, n:].tolist() == [eot_id] * 5  # the tokenizer's EOS alone would not stop it
    assert generate_greedy(lm.model, tok, [render_prompt("Say hi.", tok)], max_new_tokens=5) == [""]
