"""Hugging Face interop: export to / import from the Llama layout of transformers.

Our parameter names map one-to-one onto ``LlamaForCausalLM``'s, and our rotary
embedding uses the same half-split rotation, so weights move without permutation.

Export writes what transformers (and vLLM) need to use the model the way glassbox
does: ``tokenizer.json`` with a post-processor that prepends ``<|endoftext|>`` (our
BOS), so ``AutoTokenizer(text)`` gives the ids our prompts start with;
``tokenizer_config.json`` with the chat template from :mod:`glassbox.conversation`
(which writes the BOS itself; ``apply_chat_template`` adds no second one); and
``eos_token_id`` = [end-of-text, end-of-turn] in config.json and generation_config.json,
so ``generate`` on a chat model stops at ``<|end|>``.

Import reads any Llama-architecture checkpoint (ours, or SmolLM-, TinyLlama-,
Llama-shaped ones saved as safetensors with a ``tokenizer.json``). A model keeps its
own tokenizer, special tokens and chat template: we do not add our special tokens,
because new embedding rows would be untrained and the model's chat format is the one
it learned. The checkpoint then holds ``tokenizer_config.json`` beside
``tokenizer.json`` (see :class:`glassbox.tokenizer.Tokenizer`), and the model's stop ids
(eos ids from its config and generation_config.json, and its template's end-of-turn
token) end generation.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from glassbox import checkpoint as ckpt
from glassbox.config import ModelConfig
from glassbox.errors import GlassboxError
from glassbox.model import Transformer
from glassbox.tokenizer import EOT, Tokenizer

_RENAMES = [  # (ours, transformers') as regular expressions over parameter names
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^layers\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^layers\.(\d+)\.mlp_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^layers\.(\d+)\.attn\.(\w_proj)\.weight$", r"model.layers.\1.self_attn.\2.weight"),
    (r"^layers\.(\d+)\.mlp\.(\w+_proj)\.weight$", r"model.layers.\1.mlp.\2.weight"),
]

# Files transformers would read from a directory; stale ones are removed before an
# export with force=True (an old weight shard or index would be loaded with the new ones).
_HF_STALE = [
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "tokenizer.model",
    "chat_template.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
]
# Tokenizer side files a glassbox checkpoint reads (see Tokenizer.load); stale ones from
# an older run are removed by an import with force=True.
_RUN_STALE = ["tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]


def _rename(name: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise GlassboxError(f"No Hugging Face name for parameter {name!r}.")


def to_hf_state(model: Transformer) -> dict[str, torch.Tensor]:
    return {_rename(k, _RENAMES): v for k, v in ckpt.model_state(model).items()}


def _eos_ids(tok: Tokenizer) -> int | list[int]:
    ids = sorted(tok.stop_ids)
    return ids[0] if len(ids) == 1 else ids


def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict:
    """config.json for ``LlamaForCausalLM``."""
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
        "bos_token_id": tok.bos_id,
        "eos_token_id": _eos_ids(tok),
        "pad_token_id": tok.pad_id,
        "torch_dtype": "float32",
    }


def generation_config(tok: Tokenizer) -> dict:
    """generation_config.json: ``generate`` stops at any of the tokenizer's stop ids."""
    return {"bos_token_id": tok.bos_id, "eos_token_id": _eos_ids(tok), "pad_token_id": tok.pad_id}


def tokenizer_json(tok: Tokenizer) -> str:
    """tokenizer.json for transformers. Ours gains a post-processor that prepends
    ``<|endoftext|>`` (what glassbox prompts start with); a foreign tokenizer keeps its
    own, which already adds its BOS the way the model was trained."""
    if tok.is_foreign:
        return tok.to_json()
    hf = HFTokenizer.from_str(tok.to_json())
    hf.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A",
        pair=f"{EOT} $A {EOT}:1 $B:1",
        special_tokens=[(EOT, tok.eot_id)],
    )
    return hf.to_str(pretty=True)


def tokenizer_config(tok: Tokenizer, context_length: int) -> dict:
    """tokenizer_config.json: named special tokens and the chat template."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tok.template_tokens,
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
    }
    if tok.chat_template:  # a base model may have none
        config["chat_template"] = tok.chat_template
    return config


def _check_out(source: Path, out: Path, force: bool) -> None:
    """Refuse to write over the source, or into a non-empty ``out`` without force."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise GlassboxError(
            f"--out {out} is the source directory {source} (or holds it); writing there would "
            "overwrite what is being read; choose another --out."
        )
    if dst.exists() and not dst.is_dir():
        raise GlassboxError(f"--out {out} is a file, not a directory; choose another --out.")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise GlassboxError(
            f"--out {out} already exists and is not empty; pass --force to overwrite it, or "
            "choose another --out."
        )


def _remove(directory: Path, patterns: list[str]) -> None:
    for pattern in patterns:
        for path in directory.glob(pattern):
            path.unlink()


def export_hf(run_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write ``out`` with config.json, generation_config.json, model.safetensors,
    tokenizer.json and tokenizer_config.json for ``LlamaForCausalLM`` and
    ``AutoTokenizer``. A non-empty ``out`` needs ``force``; ``out`` is never the source."""
    run_dir, out = Path(run_dir), Path(out)
    _check_out(run_dir, out, force)
    model, tok, _ = ckpt.load_model_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove(out, _HF_STALE)
    ckpt.save_tensors(to_hf_state(model), out / "model.safetensors", metadata={"format": "pt"})
    ckpt.save_json(hf_config(model.cfg, tok), out / "config.json")
    ckpt.save_json(generation_config(tok), out / "generation_config.json")
    ckpt.atomic_write_bytes(out / "tokenizer.json", tokenizer_json(tok).encode())
    ckpt.save_json(tokenizer_config(tok, model.cfg.context_length), out / "tokenizer_config.json")
    return out


# ---------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------


def _rope_theta(conf: dict, where: Path) -> float:
    """rope_theta from transformers 4 (``rope_theta``) or 5 (``rope_parameters``)."""
    params = conf.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise GlassboxError(
            f"{where} uses rope_type={params['rope_type']!r}; only the default rotary "
            "embedding can be imported."
        )
    return float(params.get("rope_theta", conf.get("rope_theta", 10000.0)))


def _model_config(conf: dict, where: Path) -> ModelConfig:
    if conf.get("model_type") != "llama":
        raise GlassboxError(
            f"{where} has model_type={conf.get('model_type')!r}; only 'llama' checkpoints "
            "can be imported."
        )
    unsupported = [
        k
        for k in ("rope_scaling", "attention_bias", "mlp_bias")
        if conf.get(k) not in (None, False)
    ]
    if conf.get("hidden_act", "silu") != "silu":
        unsupported.append("hidden_act")
    if unsupported:
        raise GlassboxError(f"{where} uses unsupported settings: {unsupported}.")
    n_head = conf["num_attention_heads"]
    cfg = ModelConfig(
        vocab_size=conf["vocab_size"],
        context_length=conf.get("max_position_embeddings", 2048),
        n_layer=conf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=conf.get("num_key_value_heads") or n_head,
        d_model=conf["hidden_size"],
        ffn_hidden=conf["intermediate_size"],
        rope_theta=_rope_theta(conf, where),
        norm_eps=conf.get("rms_norm_eps", 1e-6),
        tie_embeddings=conf.get("tie_word_embeddings", False),
        init_std=conf.get("initializer_range", 0.02),
        name="imported",
    )
    if (conf.get("head_dim") or cfg.head_dim) != cfg.head_dim:
        raise GlassboxError(
            f"{where}: head_dim={conf['head_dim']} != hidden_size / num_attention_heads "
            f"({cfg.head_dim}); such models cannot be imported."
        )
    return cfg


def _load_weights(hf_dir: Path, cfg: ModelConfig) -> Transformer:
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
    return model.eval()


def _config_eos_ids(hf_dir: Path, conf: dict) -> list[int]:
    """eos_token_id(s) from config.json and generation_config.json (int or list)."""
    ids: list[int] = []
    sources = [conf]
    if (hf_dir / "generation_config.json").is_file():
        sources.append(ckpt.load_json(hf_dir / "generation_config.json"))
    for src in sources:
        value = src.get("eos_token_id") if isinstance(src, dict) else None
        ids += [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]
    return ids


def _load_tokenizer(hf_dir: Path, conf: dict, cfg: ModelConfig) -> Tokenizer:
    if not (hf_dir / "tokenizer.json").is_file():
        raise GlassboxError(
            f"{hf_dir} has no tokenizer.json; save the model's fast tokenizer there first "
            "(transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir))."
        )
    tok = Tokenizer.load(hf_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise GlassboxError(
            f"{hf_dir / 'tokenizer.json'} has {tok.vocab_size} tokens but config.json's "
            f"vocab_size is {cfg.vocab_size}; the tokenizer belongs to another model."
        )
    stops = [tok.hf.id_to_token(i) for i in _config_eos_ids(hf_dir, conf)]
    return tok.with_stop_tokens(t for t in stops if t is not None)


def import_hf(hf_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Read a Llama-layout Hugging Face directory into a glassbox checkpoint ``out``.

    A non-empty ``out`` needs ``force``; then its old ``checkpoints/`` snapshots are
    removed too (a later ``--resume`` would otherwise bring back the old weights).
    """
    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise GlassboxError(
            f"{hf_dir} is not a directory; pass a Hugging Face model directory (config.json, "
            "*.safetensors, tokenizer.json)."
        )
    _check_out(hf_dir, out, force)
    conf = ckpt.load_json(hf_dir / "config.json")
    if not isinstance(conf, dict):
        raise GlassboxError(f"{hf_dir / 'config.json'} is not a JSON object.")
    cfg = _model_config(conf, hf_dir / "config.json")
    model = _load_weights(hf_dir, cfg)
    tok = _load_tokenizer(hf_dir, conf, cfg)
    if out.is_dir():  # force: drop what belongs to the run being replaced
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        _remove(out, _RUN_STALE)
    ckpt.save_model_dir(out, model, tok, "import", {"source": str(hf_dir)})
    return out
