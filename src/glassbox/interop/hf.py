"""Hugging Face interop: export to / import from the Llama layout of transformers.

Our parameter names map one-to-one onto ``LlamaForCausalLM``'s, and our rotary
embedding uses the same half-split rotation, so weights move without permutation.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from glassbox import checkpoint as ckpt
from glassbox.config import ModelConfig
from glassbox.errors import GlassboxError
from glassbox.model import Transformer
from glassbox.tokenizer import ASSISTANT, EOT, PAD, Tokenizer

_RENAMES = [  # (ours, transformers') as regular expressions over parameter names
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^layers\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^layers\.(\d+)\.mlp_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^layers\.(\d+)\.attn\.(\w_proj)\.weight$", r"model.layers.\1.self_attn.\2.weight"),
    (r"^layers\.(\d+)\.mlp\.(\w+_proj)\.weight$", r"model.layers.\1.mlp.\2.weight"),
]

# Jinja rendering of Tokenizer.apply_chat_template, for transformers' apply_chat_template.
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] "
    "+ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _rename(name: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise GlassboxError(f"No Hugging Face name for parameter {name!r}.")


def to_hf_state(model: Transformer) -> dict[str, torch.Tensor]:
    return {_rename(k, _RENAMES): v for k, v in ckpt.model_state(model).items()}


def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": tok.eot_id,
        "eos_token_id": tok.eot_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": "float32",
    }


def export_hf(run_dir: str | Path, out: str | Path) -> Path:
    """Write ``out`` with config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json for ``LlamaForCausalLM`` and ``AutoTokenizer``."""
    model, tok, _ = ckpt.load_model_dir(run_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_tensors(to_hf_state(model), out / "model.safetensors", metadata={"format": "pt"})
    ckpt.save_json(hf_config(model.cfg, tok), out / "config.json")
    tok.save(out / "tokenizer.json")
    ckpt.save_json(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOT,
            "eos_token": EOT,
            "pad_token": PAD,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": model.cfg.context_length,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
        out / "tokenizer_config.json",
    )
    ckpt.save_json(
        {
            "bos_token": EOT,
            "eos_token": EOT,
            "pad_token": PAD,
            "additional_special_tokens": [ASSISTANT],
        },
        out / "special_tokens_map.json",
    )
    return out


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Read a Llama-layout Hugging Face directory into a glassbox checkpoint."""
    hf_dir = Path(hf_dir)
    conf = ckpt.load_json(hf_dir / "config.json")
    if conf.get("model_type") != "llama":
        raise GlassboxError(
            f"{hf_dir / 'config.json'} has model_type={conf.get('model_type')!r}; only "
            "'llama' checkpoints can be imported."
        )
    unsupported = [
        k
        for k in ("rope_scaling", "attention_bias", "mlp_bias")
        if conf.get(k) not in (None, False)
    ]
    if conf.get("hidden_act", "silu") != "silu":
        unsupported.append("hidden_act")
    if unsupported:
        raise GlassboxError(f"{hf_dir / 'config.json'} uses unsupported settings: {unsupported}.")
    n_head = conf["num_attention_heads"]
    cfg = ModelConfig(
        vocab_size=conf["vocab_size"],
        context_length=conf.get("max_position_embeddings", 2048),
        n_layer=conf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=conf.get("num_key_value_heads", n_head),
        d_model=conf["hidden_size"],
        ffn_hidden=conf["intermediate_size"],
        rope_theta=conf.get("rope_theta", 10000.0),
        norm_eps=conf.get("rms_norm_eps", 1e-6),
        tie_embeddings=conf.get("tie_word_embeddings", False),
        init_std=conf.get("initializer_range", 0.02),
        name="imported",
    )
    if conf.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise GlassboxError(f"head_dim={conf['head_dim']} != hidden_size / heads; unsupported.")
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise GlassboxError(f"{hf_dir} has no .safetensors weights (pickled .bin is not loaded).")
    hf_state: dict[str, torch.Tensor] = {}
    for f in files:
        hf_state |= ckpt.load_tensors(f)
    model = Transformer(cfg)
    ours = {_rename(k, _RENAMES): k for k in model.state_dict()}  # theirs -> ours
    state = {}
    for theirs, tensor in hf_state.items():
        if theirs.endswith("rotary_emb.inv_freq"):
            continue
        if theirs not in ours:
            raise GlassboxError(f"{hf_dir}: unexpected weight {theirs!r} for the Llama layout.")
        state[ours[theirs]] = tensor.float()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing:
        raise GlassboxError(f"{hf_dir}: weights missing for {missing[:5]}.")
    tok = Tokenizer.load(hf_dir / "tokenizer.json")
    ckpt.save_model_dir(out, model, tok, "import", {"source": str(hf_dir)})
    return Path(out)
