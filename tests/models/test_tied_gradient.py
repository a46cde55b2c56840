"""A tied embedding / lm_head weight's gradient: folded into one dense buffer during training (the
head's gradient moved into .grad when it is ready, the embedding's added as its looked-up rows), with
the values autograd computes when the two dense gradients are summed."""

from __future__ import annotations

import copy

import pytest
import torch

from dpo_fast import hf

pytestmark = pytest.mark.usefixtures("single_thread")


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def autograd_logps(model, b) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"]).logits[:, :-1].float()
    labels = b["labels"][:, 1:]
    tok = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (tok * (labels != -100)).sum(-1)


def test_tied_gradient_equals_autograds_and_arrives_as_rows():
    model, plain = tied_llama(), None
    plain = copy.deepcopy(model)
    weight = model.get_input_embeddings().weight
    assert model.lm_head.weight is weight
    arriving = []
    weight.register_hook(lambda g: arriving.append(g.layout))
    for k in range(2):  # two micro-batches: the second accumulates into the first's .grad
        (hf.sequence_logps(hf.lm_head_parts(model), batch(k)).sum() * (k + 1)).backward()
        (autograd_logps(plain, batch(k)).sum() * (k + 1)).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert weight.grad.layout == torch.strided
    # what reached the parameter through autograd: the embedding's rows only (the head's dense
    # gradient went through the alias), once per micro-batch
    assert arriving == [torch.sparse_coo, torch.sparse_coo]
    assert model.get_input_embeddings().sparse is False  # restored after each forward


def test_no_fold_without_grad_or_untied():
    model = tied_llama()
    with torch.no_grad():
        hf.sequence_logps(hf.lm_head_parts(model), batch(0))
    assert model.get_input_embeddings().weight.grad is None
    untied = tied_llama()
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    arriving = []
    untied.lm_head.weight.register_hook(lambda g: arriving.append(g.layout))
    hf.sequence_logps(hf.lm_head_parts(untied), batch(0)).sum().backward()
    assert arriving == [torch.strided]
    assert untied.get_input_embeddings().weight.grad.layout == torch.strided
