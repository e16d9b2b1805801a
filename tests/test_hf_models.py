"""HF transformers causal-LM losses as the library ships them (small random configs, nothing
downloaded): a compiled training step that returns the loss is rewritten and equals eager."""
import pytest
import torch

from helpers import compile_recorded, rewrites, saved_numels, skips

transformers = pytest.importorskip("transformers")

V, T = 257, 16
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, final_logit_softcapping=30.0, query_pre_attn_scalar=16, sliding_window=8)),
}


def _model(name):
    config_cls, model_cls, extra = MODELS[name]
    config = getattr(transformers, config_cls)(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config)


def _check(name, num_items_in_batch):
    model = _model(name)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    kw = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}

    def train_step(ids, labels):
        return model(input_ids=ids, labels=labels, **kw).loss

    compiled, rec = compile_recorded(train_step)
    loss = compiled(ids, labels)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = train_step(ids, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    return rec


@pytest.mark.parametrize("num_items_in_batch", [None, 20])
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma2"])
def test_causal_lm_loss_rewritten(name, num_items_in_batch):
    """Gemma2: the final logit soft-capping (tanh(x / 30) * 30) between lm_head and loss is fused too."""
    rec = _check(name, num_items_in_batch)
    assert rewrites() == 1, skips()
    assert not skips()
    assert max(saved_numels(rec["post_grad"])) < 2 * T * V
