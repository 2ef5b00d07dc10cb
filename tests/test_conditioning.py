"""The user-conditioned LM (userlens.llm.conditioning) on a tiny randomly initialised llama and
a tiny user encoder: shapes, masks, and the cross-attention gates at 0 leaving the LM exact."""

from __future__ import annotations

import pytest
import torch

from userlens.config import ModelParams, UserLLMParams
from userlens.data import Batch
from userlens.llm.conditioning import PerceiverResampler, UserConditionedLM
from userlens.model import UserEncoder

N_ITEMS, N_CATEGORIES, MAX_LENGTH = 20, 4, 8


def tiny_llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_encoder() -> UserEncoder:
    torch.manual_seed(1)
    return UserEncoder(ModelParams(d_model=16, n_layers=1, n_heads=2), N_ITEMS, N_CATEGORIES, MAX_LENGTH).eval()


def batch_of(lengths: list[int]) -> Batch:
    """Right-padded histories of the given lengths (the encoder's layout)."""
    B = len(lengths)
    items = torch.zeros(B, MAX_LENGTH, dtype=torch.long)
    padding = torch.ones(B, MAX_LENGTH, dtype=torch.bool)
    for row, n in enumerate(lengths):
        items[row, :n] = torch.arange(3, 3 + n)
        padding[row, :n] = False
    zeros = torch.zeros(B, MAX_LENGTH)
    return Batch(items=items, padding=padding, ratings=zeros, has_rating=~padding, gaps=zeros)


def text(B: int = 2, L: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 50, (B, L), generator=torch.Generator().manual_seed(2))
    return ids, torch.ones(B, L, dtype=torch.long)


def test_the_resampler_gives_k_latents_and_ignores_padded_events():
    resampler = PerceiverResampler(dim=16, k=3, layers=2).eval()
    states = torch.randn(2, 5, 16)
    real = torch.tensor([[True] * 5, [False, False, True, True, True]])
    out = resampler(states, real)
    assert out.shape == (2, 3, 16)
    changed = states.clone()
    changed[1, :2] = 100.0  # padded positions of user 1
    again = resampler(changed, real)
    assert torch.allclose(again[1], out[1], atol=1e-6) and torch.equal(again[0], out[0])


def test_cross_attention_with_its_gates_at_zero_is_exactly_the_lm():
    lm = tiny_llama()
    ids, mask = text()
    plain = lm(input_ids=ids, attention_mask=mask).logits
    model = UserConditionedLM(lm, tiny_encoder(), UserLLMParams(mode="cross_attention", cross_attention_every=2))
    assert len(model.blocks) == 2  # before layers 2 and 4
    conditioned = model(batch_of([3, 5]), ids, mask).logits
    assert torch.equal(conditioned, plain)
    with torch.no_grad():
        model.blocks[0].attend_gate.fill_(0.5)
    opened = model(batch_of([3, 5]), ids, mask).logits
    assert not torch.allclose(opened, plain)
    assert not torch.allclose(opened[0], model(batch_of([1, 5]), ids, mask).logits[0])  # it reads the user


def test_a_soft_prompt_puts_k_user_vectors_before_the_text_and_masks_their_labels():
    lm = tiny_llama()
    model = UserConditionedLM(lm, tiny_encoder(), UserLLMParams(mode="soft_prompt", latents=3))
    ids, mask = text()
    labels = ids.clone()
    labels[:, :4] = -100  # the answer is the last two tokens
    out = model(batch_of([3, 5]), ids, mask, labels)
    assert out.logits.shape == (2, 3 + 6, 50) and model.prefix_length(batch_of([1])) == 3
    answer = out.logits[:, 3 + 3 : 3 + 5].log_softmax(-1).gather(-1, ids[:, 4:, None]).squeeze(-1)
    assert torch.allclose(out.loss, -answer.mean(), atol=1e-5)  # only the answer tokens count
    assert model(None, ids, mask).logits.shape == (2, 6, 50)  # no user: the plain LM


def test_only_the_new_parts_train_and_the_lm_is_not_in_the_state():
    lm = tiny_llama()
    model = UserConditionedLM(lm, tiny_encoder(), UserLLMParams(mode="cross_attention", cross_attention_every=2))
    trainable = {name for name, weight in model.named_parameters() if weight.requires_grad}
    assert trainable and all(name.startswith(("resampler.", "blocks.")) for name in trainable)
    assert not any(name.startswith("lm.") for name in model.state_dict())
    assert not any(weight.requires_grad for weight in lm.parameters())
    tuned = UserConditionedLM(tiny_llama(), tiny_encoder(), UserLLMParams(tune_encoder=True))
    assert any(name.startswith("encoder.") and w.requires_grad for name, w in tuned.named_parameters())


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="pooled embedding"):
        UserConditionedLM(tiny_llama(), tiny_encoder(), UserLLMParams(perceiver=False, latents=4))
    pooled = UserConditionedLM(tiny_llama(), tiny_encoder(), UserLLMParams(perceiver=False, latents=1))
    assert pooled.user_latents(batch_of([2, 4])).shape == (2, 1, 16)
