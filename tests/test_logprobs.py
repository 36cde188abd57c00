"""Chunked selected-token log-probs (harness/logprobs.py) equal the full log-softmax, values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.logprobs import token_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_full_log_softmax_values_and_gradients(temperature):
    torch.manual_seed(0)
    head = nn.Linear(16, 301, bias=False)
    head.weight.requires_grad_(False)  # a frozen LM head, as the reasoner's
    h = torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 301, (37,))
    full = torch.log_softmax(head(h).float() / temperature, -1).gather(1, y[:, None]).squeeze(1)
    (g_full,) = torch.autograd.grad((full * torch.arange(37.0)).sum(), h)
    chunked = token_logprobs(h, head, y, temperature, chunk_size=8)  # 5 chunks, the last one ragged
    (g_chunk,) = torch.autograd.grad((chunked * torch.arange(37.0)).sum(), h)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_chunk, g_full, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(h, head, y, temperature, chunk_size=4), full, atol=1e-5, rtol=0)


def test_empty_input_gives_empty_output():
    head = nn.Linear(4, 10)
    assert token_logprobs(torch.zeros(0, 4), head, torch.zeros(0, dtype=torch.long)).shape == (0,)
