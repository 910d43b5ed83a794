import pytest
import torch

from glassbox import checkpoint as ckpt
from glassbox.config import ModelConfig
from glassbox.interop.hf import export_hf, import_hf
from glassbox.model import Transformer

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(n_kv_head=2, tie_embeddings=False), dict(n_kv_head=1, rope_theta=500000.0)],
)
def test_export_matches_transformers_llama_and_imports_back(tmp_path, tokenizer, overrides):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("test", vocab_size=tokenizer.vocab_size, **overrides)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mix-up would show
        for layer in model.layers:
            layer.attn_norm.weight.uniform_(0.5, 1.5)
    ckpt.save_model_dir(tmp_path / "ours", model, tokenizer, "test")
    export_hf(tmp_path / "ours", tmp_path / "hf")

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)  # ünïcode"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)

    import_hf(tmp_path / "hf", tmp_path / "back")
    back, _, record = ckpt.load_model_dir(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours, rtol=0, atol=0)
    assert record["stage"] == "import"


def test_import_rejects_other_architectures(tmp_path):
    from glassbox.checkpoint import save_json
    from glassbox.errors import GlassboxError

    save_json({"model_type": "gpt2"}, tmp_path / "config.json")
    with pytest.raises(GlassboxError, match="model_type='gpt2'"):
        import_hf(tmp_path, tmp_path / "out")
