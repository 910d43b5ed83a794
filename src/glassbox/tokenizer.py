"""Byte-level BPE tokenizer (trained with `tokenizers`), special tokens, chat encoding.

Every string round-trips exactly: text is first mapped to UTF-8 bytes, each byte has
a token, and merges only ever join bytes. Special tokens mark document boundaries,
padding and chat roles; the chat format itself lives in :mod:`glassbox.conversation`.

Two kinds of tokenizer are wrapped:

- **ours**, trained by :meth:`Tokenizer.train`: it holds :data:`SPECIAL_TOKENS`.
  ``eot_id`` (``<|endoftext|>``) separates documents and starts every sequence,
  ``pad_id`` is ``<|pad|>``, ``end_id`` (``<|end|>``) ends a chat turn, and generation
  stops at either (``stop_ids``).
- **foreign**, an imported model's tokenizer (Llama, SmolLM, TinyLlama...): it keeps
  its own special tokens and Jinja chat template, read from ``tokenizer_config.json``
  (and ``chat_template.jinja``) beside ``tokenizer.json``. We map them onto the same
  attributes: ``eot_id`` is the BOS its own post-processor puts before a sequence
  (Llama's ``<s>``, ``<|begin_of_text|>``), so prompts start the way the model was
  trained, or else its EOS (GPT-2-style models separate documents with it);
  ``end_id`` is the token its template writes after an assistant reply
  (``<|im_end|>``, ``<|eot_id|>``...) or else EOS; ``pad_id`` is its pad token or else
  EOS; ``stop_ids`` are EOS, any extra stop tokens (the model's generation_config), and
  ``end_id``.

A tokenizer directory is ours when its vocabulary holds all of :data:`SPECIAL_TOKENS`
(our exports, imported back, stay ours), foreign otherwise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from glassbox.errors import GlassboxError

EOT = "<|endoftext|>"  # separates documents; also starts every sequence
PAD = "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [EOT, PAD, SYSTEM, USER, ASSISTANT, END]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB = 1 << 20

# tokenizer_config.json keys a foreign tokenizer keeps; "stop_tokens" is ours (extra
# tokens that end generation, e.g. from the model's generation_config.json).
NAMED_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
CONFIG_KEYS = (*NAMED_TOKENS, "chat_template", "stop_tokens")
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _bytes_of_token_strings() -> dict[str, int]:
    """The ByteLevel alphabet: printable stand-in character -> raw byte value."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps bytes to unicode as in GPT-2: printable bytes map to themselves,
    # the rest to code points 256+; invert that table.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    assert set(table) == set(alphabet)
    return table


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_tokenizer_config(directory: str | Path) -> dict[str, Any] | None:
    """The parts of a Hugging Face tokenizer directory's config we use (None if it has
    none): named special tokens, the chat template, our extra stop tokens.

    Reads special_tokens_map.json, then tokenizer_config.json over it; the chat
    template comes from tokenizer_config.json, else chat_template.jinja (where
    transformers 5 writes it).
    """
    from glassbox.checkpoint import load_json

    directory = Path(directory)
    files = [directory / "special_tokens_map.json", directory / "tokenizer_config.json"]
    jinja = directory / "chat_template.jinja"
    if not any(f.is_file() for f in files):
        return None
    raw: dict[str, Any] = {}
    for f in files:
        if f.is_file():
            data = load_json(f)
            if not isinstance(data, dict):
                raise GlassboxError(f"{f} is not a JSON object; the tokenizer files are corrupted.")
            raw |= data
    config: dict[str, Any] = {k: _token_text(raw.get(k)) for k in NAMED_TOKENS}
    template = raw.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if not isinstance(template, str) and jinja.is_file():
        template = jinja.read_text()
    config["chat_template"] = template if isinstance(template, str) else None
    stops = raw.get("stop_tokens") or []
    config["stop_tokens"] = [s for s in stops if isinstance(s, str)]
    return config


def _with_special_parsing(hf: HFTokenizer, parse_special: bool) -> HFTokenizer:
    """A private copy of ``hf`` that parses special-token text (or treats it as text).

    ``encode_special_tokens`` is a flag on the tokenizer object; flipping one shared
    object per call races between threads, so each mode gets its own configured-once copy.
    """
    copy = HFTokenizer.from_str(hf.to_str())
    copy.encode_special_tokens = not parse_special
    return copy


class Tokenizer:
    """A thin, typed wrapper around a `tokenizers` tokenizer: ours (byte-level BPE with
    :data:`SPECIAL_TOKENS`) or a foreign one with its own special tokens and template.

    Attributes: ``eot_id`` (document separator and the BOS prompts start with),
    ``pad_id``, ``end_id`` (end of a chat turn), ``special_ids`` (frozenset of special
    token ids), ``stop_ids`` (frozenset of ids that end generation), ``chat_template``
    (Jinja text; ours is :data:`glassbox.conversation.CHAT_TEMPLATE`), ``is_foreign``.
    """

    def __init__(self, hf: HFTokenizer, config: Mapping[str, Any] | None = None):
        """``config`` None wraps our own tokenizer (it must hold :data:`SPECIAL_TOKENS`);
        a dict with :data:`CONFIG_KEYS` (as from :func:`read_tokenizer_config`) wraps a
        foreign one."""
        self.hf = hf
        self._as_text = _with_special_parsing(hf, parse_special=False)
        self._parsing = _with_special_parsing(hf, parse_special=True)
        self.is_foreign = config is not None
        if config is None:
            self._init_ours()
        else:
            self._init_foreign(config)

    def _init_ours(self) -> None:
        missing = [t for t in SPECIAL_TOKENS if self.hf.token_to_id(t) is None]
        if missing:
            raise GlassboxError(
                f"Tokenizer lacks special tokens {missing}; train one with "
                "`glassbox tokenizer train`, or load a model's tokenizer directory with its "
                "tokenizer_config.json."
            )
        # conversation.py imports this module's token strings, so import it lazily.
        from glassbox.conversation import CHAT_TEMPLATE

        self.config: dict[str, Any] | None = None
        self.eot_id = self.token_to_id(EOT)
        self.pad_id = self.token_to_id(PAD)
        self.end_id = self.token_to_id(END)
        self.bos_id: int | None = self.eot_id
        self.special_ids = frozenset(self.token_to_id(t) for t in SPECIAL_TOKENS)
        self.stop_ids = frozenset({self.eot_id, self.end_id})
        self.chat_template: str | None = CHAT_TEMPLATE
        # What transformers calls the special tokens (for templates and export).
        self.template_tokens = {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD}

    def _init_foreign(self, config: Mapping[str, Any]) -> None:
        from glassbox.conversation import find_end_of_turn

        self.config = {k: config.get(k) for k in CONFIG_KEYS}
        self.config["stop_tokens"] = list(self.config["stop_tokens"] or [])
        if not self.config["eos_token"]:
            raise GlassboxError(
                "The tokenizer's config names no eos_token, so generation could never stop; "
                'add "eos_token": "<the end token>" to its tokenizer_config.json.'
            )
        self.template_tokens = {k: self.config[k] for k in NAMED_TOKENS if self.config[k]}
        named = {k: self.token_to_id(v) for k, v in self.template_tokens.items()}
        eos = named["eos_token"]
        self.bos_id = named.get("bos_token")
        added_bos = self._added_bos()
        self.eot_id = added_bos if added_bos is not None else eos
        self.pad_id = named.get("pad_token", eos)
        added = self.hf.get_added_tokens_decoder()
        self.special_ids = frozenset(
            {i for i, t in added.items() if t.special} | set(named.values())
        )
        self.chat_template = self.config["chat_template"]
        self.end_id = eos  # find_end_of_turn encodes with this tokenizer; set a default
        end = find_end_of_turn(self)
        self.end_id = eos if end is None else end
        extra = {self.token_to_id(t) for t in self.config["stop_tokens"]}
        self.stop_ids = frozenset({eos, self.end_id, *extra})

    def _added_bos(self) -> int | None:
        """The special token the tokenizer's post-processor puts first, if any."""
        with_specials = self._parsing.encode("a", add_special_tokens=True)
        plain = self._parsing.encode("a", add_special_tokens=False)
        first = with_specials.ids[0] if with_specials.ids else None
        if with_specials.special_tokens_mask[:1] == [1] and plain.ids[:1] != [first]:
            return first
        return None

    def token_to_id(self, token: str) -> int:
        """The id of ``token``; a token missing from the vocabulary raises GlassboxError."""
        idx = self.hf.token_to_id(token)
        if idx is None:
            raise GlassboxError(
                f"Token {token!r} is not in the tokenizer's vocabulary; its tokenizer_config.json "
                "names a token that tokenizer.json lacks. Fix the config or use the matching files."
            )
        return idx

    def special_tokens(self) -> list[str]:
        """The text of every special token (for checking user text against them)."""
        return [self.hf.id_to_token(i) for i in sorted(self.special_ids)]

    # -- construction -------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 4096,
        min_frequency: int = 2,
        show_progress: bool = True,
    ) -> Tokenizer:
        """Learn BPE merges on ``texts``. ``vocab_size`` counts the 256 byte tokens,
        the merges and the special tokens; 256 + specials means bytes only."""
        if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
            raise GlassboxError(
                f"vocab_size={vocab_size} is out of range; use {MIN_VOCAB}..{MAX_VOCAB} "
                f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens at least)."
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (or a directory holding it). A tokenizer without our
        special tokens is foreign: its tokenizer_config.json (and chat_template.jinja)
        beside it give its special tokens and chat template."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise GlassboxError(f"Missing tokenizer file {path}.")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise GlassboxError(f"Cannot read tokenizer {path}: {e}") from e
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if not missing:
            return cls(hf)
        config = read_tokenizer_config(path.parent)
        if config is None:
            raise GlassboxError(
                f"{path} lacks glassbox's special tokens {missing} and has no "
                f"tokenizer_config.json beside it naming its own (bos_token, eos_token); "
                "train a tokenizer with `glassbox tokenizer train`, or put the model's "
                f"tokenizer_config.json next to {path.name}."
            )
        return cls(hf, config)

    def with_stop_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        """A foreign tokenizer that also stops generation at ``tokens`` (our own already
        stops at its end-of-text and end-of-turn tokens)."""
        if not self.is_foreign:
            return self
        config = dict(self.config or {})
        config["stop_tokens"] = sorted(set(config["stop_tokens"]) | set(tokens))
        return Tokenizer(self.hf, config)

    def files(self) -> dict[str, bytes]:
        """The files that make up this tokenizer in a checkpoint directory (name ->
        bytes): tokenizer.json, plus tokenizer_config.json for a foreign one."""
        out = {"tokenizer.json": self.to_json().encode()}
        if self.config is not None:
            out["tokenizer_config.json"] = (json.dumps(self.config, indent=2) + "\n").encode()
        return out

    def save(self, path: str | Path) -> None:
        """Write ``path`` (tokenizer.json) atomically, and for a foreign tokenizer its
        tokenizer_config.json beside it, so :meth:`load` gets the same tokenizer back."""
        from glassbox.checkpoint import atomic_write_bytes

        path = Path(path)
        for name, data in self.files().items():
            atomic_write_bytes(path if name == "tokenizer.json" else path.parent / name, data)

    def to_json(self) -> str:
        return self.hf.to_str(pretty=True)

    # -- encoding -----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids for ``text``. Special-token strings inside ``text`` are plain text
        unless ``allow_special`` (so user data can never forge a role marker). No BOS is
        added: callers prepend ``eot_id`` where a sequence starts."""
        hf = self._parsing if allow_special else self._as_text
        return hf.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` (special-token text kept plain) and each token's character
        span ``(start, end)`` in ``text``."""
        enc = self._as_text.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._as_text.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each token stands for (special tokens count 0), for bits/byte.

        Byte-level tokens count their bytes exactly; SentencePiece-style pieces of a
        foreign tokenizer count ``<0xNN>`` as one byte and ``▁`` as a space.
        """
        table = _bytes_of_token_strings()
        lengths = [0] * self.vocab_size
        for tok, idx in self.hf.get_vocab().items():
            if idx in self.special_ids or idx >= len(lengths):
                continue
            if all(c in table for c in tok):
                lengths[idx] = len(tok)
            elif _BYTE_FALLBACK.fullmatch(tok):
                lengths[idx] = 1
            else:
                lengths[idx] = len(tok.replace("\u2581", " ").encode())
        return lengths

    # -- chat (thin wrappers over glassbox.conversation) ----------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as text (from the leading BOS on). With
        ``add_generation_prompt`` it ends with the assistant header, so the model
        continues as the assistant and stops at an id in :attr:`stop_ids`."""
        from glassbox.conversation import render_text

        return render_text(self, messages, add_generation_prompt)

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of :meth:`apply_chat_template`; role markers come only from roles,
        never from message content. For the loss mask use
        :func:`glassbox.conversation.encode_conversation`."""
        from glassbox.conversation import encode_conversation, encode_prompt

        if add_generation_prompt:
            return encode_prompt(self, messages)
        return encode_conversation(self, messages).ids
