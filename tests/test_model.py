import pytest

from common.config import FedLoraConfig
from common.errors import FedLoraError
from common.model import build_lora_model, load_model_config, resolve_model_path


def test_default_model_trains_lora_on_query_value_and_the_head():
    lora = build_lora_model(FedLoraConfig(), labels=[f"intent{i}" for i in range(77)])
    state = lora.trainable_state()
    assert sum(t.numel() for t in state.values()) == 103_373
    lora_names = [n for n in state if "lora_" in n]
    assert len(lora_names) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    assert all(".query." in n or ".value." in n for n in lora_names)
    assert any("classifier" in n for n in state)


def test_same_config_builds_the_same_initial_adapter():
    a = build_lora_model(FedLoraConfig(seed=3), labels=["a", "b"]).trainable_state()
    b = build_lora_model(FedLoraConfig(seed=3), labels=["a", "b"]).trainable_state()
    assert all((a[n] == b[n]).all() for n in a)


def test_llama_defaults_target_q_and_v(tiny_llama_dir):
    lora = build_lora_model(FedLoraConfig(model=str(tiny_llama_dir), task="causal-lm", lora_r=4))
    names = list(lora.trainable_state())
    assert names and all(".q_proj." in n or ".v_proj." in n for n in names)


@pytest.mark.parametrize("name, fragment", [
    ("./no/such/model", "model folder './no/such/model' does not exist"),
    ("no-such-org/no-such-model", "unknown model 'no-such-org/no-such-model'"),
])
def test_unknown_models_are_named(name, fragment):
    with pytest.raises(FedLoraError, match=fragment):
        load_model_config(FedLoraConfig(model=name))


def test_a_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(FedLoraError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_unknown_target_modules_are_refused():
    with pytest.raises(FedLoraError, match="cannot apply LoRA"):
        build_lora_model(FedLoraConfig(lora_target_modules="no_such_proj"), labels=["a", "b"])


def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(tiny_llama_dir):
    """Recomputing activations in backward changes memory, not the math."""
    import torch

    grads = {}
    for checkpointing in (False, True):
        cfg = FedLoraConfig(model=str(tiny_llama_dir), task="causal-lm", lora_r=4,
                            lora_dropout=0.0, gradient_checkpointing=checkpointing)
        lora = build_lora_model(cfg)
        lora.model.train()
        assert lora.model.base_model.model.is_gradient_checkpointing == checkpointing
        ids = torch.arange(5, 37).reshape(2, 16)
        loss = lora.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        grads[checkpointing] = (loss.item(), {n: p.grad.clone() for n, p in
                                              lora.model.named_parameters() if p.requires_grad})
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    assert grads[True][1].keys() == grads[False][1].keys() and grads[True][1]
    for name, grad in grads[False][1].items():
        assert torch.allclose(grads[True][1][name], grad, atol=1e-6), name
    assert any(g.abs().max() > 0 for g in grads[True][1].values())
