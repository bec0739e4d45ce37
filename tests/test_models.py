import torch

from quantbridge.models import DEMO_CONFIG, build_demo, linear_layers


def test_demo_shape_contract(demo):
    cfg = demo.model.config
    assert type(demo.model).__name__ == "LlamaForCausalLM"
    assert cfg.num_hidden_layers >= 4 and cfg.hidden_size >= 256
    lins = linear_layers(demo.model)
    assert len(lins) == 7 * cfg.num_hidden_layers + 1
    assert all(m.in_features % 128 == 0 for m in lins.values())


def test_demo_is_deterministic_and_cache_matches(demo):
    model, tok = build_demo()
    for (n, a), (_, b) in zip(model.state_dict().items(), demo.model.state_dict().items()):
        assert torch.equal(a, b), n
    text = "The assert statement is a convenient way to insert debugging assertions."
    assert tok(text)["input_ids"] == demo.tokenizer(text)["input_ids"]
    assert len(tok) == DEMO_CONFIG["vocab_size"]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
