"""Byte-level BPE tokenizer (trained with `tokenizers`), special tokens, chat template.

Every string round-trips exactly: text is first mapped to UTF-8 bytes, each byte has
a token, and merges only ever join bytes. Special tokens mark document boundaries,
padding and chat roles; the chat template here is the one SFT, the server and the CLI
all use.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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


class Tokenizer:
    """A thin, typed wrapper around a `tokenizers` byte-level BPE model."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise GlassboxError(
                f"Tokenizer lacks special tokens {missing}; train one with "
                "`glassbox tokenizer train`."
            )
        self.eot_id = hf.token_to_id(EOT)
        self.pad_id = hf.token_to_id(PAD)
        self.end_id = hf.token_to_id(END)
        self.special_ids = {hf.token_to_id(t) for t in SPECIAL_TOKENS}

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
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise GlassboxError(f"Missing tokenizer file {path}.")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise GlassboxError(f"Cannot read tokenizer {path}: {e}") from e

    def save(self, path: str | Path) -> None:
        from glassbox.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, self.to_json().encode())

    def to_json(self) -> str:
        return self.hf.to_str(pretty=True)

    # -- encoding -----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids for ``text``. Special-token strings inside ``text`` are plain text
        unless ``allow_special`` (so user data can never forge a role marker)."""
        self.hf.encode_special_tokens = not allow_special
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.hf.encode_special_tokens = True
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each token stands for (special tokens count 0), for bits/byte."""
        table = _bytes_of_token_strings()
        lengths = [0] * self.vocab_size
        for tok, idx in self.hf.get_vocab().items():
            if idx in self.special_ids:
                continue
            lengths[idx] = len(tok) if all(c in table for c in tok) else len(tok.encode())
        return lengths

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    # -- chat ---------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render messages as ``<|role|>\\ncontent<|end|>\\n`` turns.

        With ``add_generation_prompt`` the text ends with ``<|assistant|>\\n`` so the
        model continues as the assistant and stops at ``<|end|>``.
        """
        parts = []
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ROLE_TOKENS:
                raise GlassboxError(
                    f"messages[{i}].role={role!r} is not one of {sorted(ROLE_TOKENS)}."
                )
            parts.append(f"{ROLE_TOKENS[role]}\n{m.get('content', '')}{END}\n")
        if add_generation_prompt:
            parts.append(f"{ASSISTANT}\n")
        return "".join(parts)

    def encode_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of :meth:`apply_chat_template`; role markers come only from roles,
        never from message content."""
        self.apply_chat_template(messages)  # validates roles
        ids = [self.eot_id]
        for m in messages:
            ids.append(self.hf.token_to_id(ROLE_TOKENS[m["role"]]))
            ids += self.encode("\n" + m.get("content", ""))
            ids.append(self.end_id)
            ids += self.encode("\n")
        if add_generation_prompt:
            ids.append(self.hf.token_to_id(ASSISTANT))
            ids += self.encode("\n")
        return ids


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a character."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece
