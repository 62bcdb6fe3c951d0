"""Tokenizers: char and byte. Torch-free, so exported bundles load them without torch.

A tokenizer is fitted on the training text, then saved in a folder as ``tokenizer.gptkit.json``
(its spec and fitted state) plus any files of its own; :func:`load_tokenizer` reads it back.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from gptkit.components.base import TokenizerSpec
from gptkit.errors import DataError, EncodeError, GptkitError, RunError
from gptkit.registry.hookspecs import hookimpl

TOKENIZER_FILE = "tokenizer.gptkit.json"
EOT = "<|endoftext|>"


class Tokenizer:
    """Base tokenizer. Subclasses set ``vocab_size``/``eot_id`` and implement the hooks."""

    spec: TokenizerSpec
    vocab_size: int
    eot_id: int
    #: The id standing for text the vocabulary leaves out (a vocabulary cut by frequency), or
    #: None when every text encodes exactly (or is refused). With it set, the contract's round
    #: trip holds on fitted text without the characters that encode to it.
    unk_id: int | None = None

    def __init__(self, spec: TokenizerSpec) -> None:
        self.spec = spec

    @property
    def chat_template(self) -> str | None:
        """The spec's chat template (see ``TokenizerSpec.chat_template``), if any."""
        return getattr(self.spec, "chat_template", None)

    @property
    def pad_id(self) -> int:
        """Padding shares the end-of-text id; padded positions are masked out anyway."""
        return self.eot_id

    def fit(self, text: str) -> None:
        """Learn the vocabulary from training text (a no-op for fixed vocabularies)."""

    def encode(self, text: str) -> list[int]:
        """Text to ids; text the vocabulary cannot encode raises :class:`EncodeError` (with
        ``unk_id`` set, its id stands for such text instead)."""
        raise NotImplementedError

    def encode_lenient(self, text: str) -> list[int]:
        """Encode, dropping what the vocabulary cannot represent (for held-out text)."""
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def stop_ids(self) -> frozenset[int]:
        """Tokens that end a generation (a sampler's ``stop_at_eot``): end-of-text, and for a
        tokenizer that has them, others (a chat model's end of turn)."""
        return frozenset((self.eot_id,))

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes one token stands for: a byte-level token's own bytes, which may be
        part of a character (OpenAI's log-probabilities show them). By default the token's
        decoded text, encoded."""
        return self.decode([token]).encode("utf-8")

    def state(self) -> dict[str, Any]:
        """JSON-able fitted state (the vocabulary)."""
        return {}

    def load_state(self, state: dict[str, Any], directory: Path) -> None:
        """Restore :meth:`state`; ``directory`` holds any files :meth:`save_files` wrote."""

    def save_files(self, directory: Path) -> list[str]:
        """Write extra files (e.g. a tokenizer.json); return their names."""
        return []

    def save(self, directory: str | Path) -> list[str]:
        """Save into ``directory``; returns the names of the files written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = self.save_files(directory)
        doc = {"format": 1, "spec": self.spec.model_dump(mode="json"), "state": self.state()}
        (directory / TOKENIZER_FILE).write_text(json.dumps(doc, ensure_ascii=False))
        return [TOKENIZER_FILE, *files]


MAX_TOKENIZER_BYTES = 256 << 20  # tokenizer.gptkit.json and the files it names


def load_tokenizer(directory: str | Path, registry=None, spec_class=None) -> Tokenizer:
    """Load a tokenizer saved by :meth:`Tokenizer.save` (needs no torch).

    ``spec_class``: the spec class the caller already resolved (from a spec's own
    ``plugins:``); used when the saved kind is its kind, so that the tokenizer loads without
    entry points (``GPTKIT_DISABLE_PLUGIN_AUTOLOAD=1``) as the spec itself did.

    A damaged or hostile tokenizer folder ends in a :class:`RunError` naming the file, never
    in another exception: the file is bounded, its fields type-checked, and the state files
    it names must lie inside ``directory`` (see :func:`state_file`).
    """
    from gptkit.safeio import read_json

    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.exists():
        raise RunError(f"no tokenizer in {directory} (expected {TOKENIZER_FILE})")
    doc = read_json(path, "tokenizer file", MAX_TOKENIZER_BYTES, RunError)
    spec_data = doc.get("spec") if isinstance(doc, dict) else None
    state = doc.get("state") if isinstance(doc, dict) else None
    if not isinstance(spec_data, dict) or not isinstance(spec_data.get("kind"), str):
        raise RunError(
            f"{path} is not a gptkit tokenizer file: 'spec' must be an object with a 'kind'"
        )
    if not isinstance(state, dict):
        raise RunError(f"{path} is not a gptkit tokenizer file: 'state' must be an object")
    if spec_class is not None and spec_class.kind_name() == spec_data["kind"]:
        cls = spec_class
    else:
        if registry is None:
            from gptkit.registry.registry import load_registry

            registry = load_registry()
        cls = registry.get("tokenizer", spec_data["kind"])
    try:
        tok_spec = cls.model_validate(spec_data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(["spec", *map(str, err["loc"])])
        raise RunError(f"{path}: field '{field}': {err['msg']}") from None
    try:
        tok = tok_spec.build()
        tok.load_state(state, directory)
    except GptkitError as exc:
        if str(path) in exc.message:
            raise
        raise RunError(f"{path}: {exc.message}", exc.hint) from None
    except Exception as exc:  # a damaged state: wrong types, a library refusing its file
        raise RunError(
            f"{path}: the tokenizer state is damaged ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    return tok


def state_file(directory: Path, name: Any) -> Path:
    """The file ``name`` (from a saved tokenizer state) inside ``directory``, checked.

    The name comes from a file that may be hostile: it must be a plain relative name with no
    '..' (an absolute path or '../x' would read outside the run or bundle, covered by no
    hash), and a regular file of bounded size (no FIFO, no /dev/zero).
    """
    from gptkit.safeio import check_regular

    parts = Path(name).parts if isinstance(name, str) else ()
    if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise RunError(
            f"tokenizer state names the file {name!r}; it must be a file name inside {directory}"
        )
    path = directory / name
    check_regular(path, "tokenizer file", MAX_TOKENIZER_BYTES, RunError)
    return path


# --------------------------------------------------------------------------- char


def encode_prompt(tokenizer: Any, prompt: str, what: str = "the prompt") -> list[int]:
    """A prompt's ids; a tokenizer's error (a plugin's ``ValueError`` for a character it lacks,
    say) is the user's :class:`EncodeError` naming it, not a crash."""
    if not prompt:
        return []
    try:
        return list(tokenizer.encode(prompt))
    except GptkitError:
        raise
    except Exception as exc:  # a plugin's ValueError, KeyError, or a bug: named, not a crash
        kind = getattr(getattr(tokenizer, "spec", None), "kind", type(tokenizer).__name__)
        raise EncodeError(
            f"the {kind} tokenizer cannot encode {what}: {type(exc).__name__}: {exc}"
        ) from None


class CharTokenizer(Tokenizer):
    """One token per character seen in the training text, then the special tokens."""

    def __init__(self, spec: CharTokenizerSpec) -> None:
        super().__init__(spec)
        self.chars: list[str] = []
        self._ids: dict[str, int] = {}

    def _set_chars(self, chars: list[str]) -> None:
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}
        self.eot_id = len(chars)
        self.vocab_size = len(chars) + 1

    def fit(self, text: str) -> None:
        self._set_chars(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        try:
            return [ids[c] for c in text]
        except KeyError:
            pass
        unseen = sorted({c for c in text if c not in ids})
        if self.spec.unknown == "skip":
            return self.encode_lenient(text)
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unseen[:5])
        raise EncodeError(
            f"text has {len(unseen)} character(s) the char tokenizer never saw: {shown}; "
            f"its vocabulary is the {len(self.chars)} characters of the training text",
            "In a prompt, leave them out; in a spec, set tokenizer.unknown=skip to drop them, "
            "or use tokenizer: byte.",
        )

    def encode_lenient(self, text: str) -> list[int]:
        ids = self._ids
        return [ids[c] for c in text if c in ids]

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] for i in ids if 0 <= i < n)

    def state(self) -> dict[str, Any]:
        return {"chars": "".join(self.chars)}

    def load_state(self, state: dict[str, Any], directory: Path) -> None:
        if not isinstance(state.get("chars"), str):
            raise RunError("char tokenizer state: 'chars' must be a string")
        self._set_chars(list(state["chars"]))


class CharTokenizerSpec(TokenizerSpec):
    """Characters of the training text (nanoGPT's shakespeare_char), plus <|endoftext|>."""

    kind: Literal["char"] = "char"
    unknown: Literal["error", "skip"] = Field(
        "error", description="What to do with characters not seen in training."
    )

    def build(self) -> CharTokenizer:
        return CharTokenizer(self)


# --------------------------------------------------------------------------- byte


class ByteTokenizer(Tokenizer):
    """The 256 UTF-8 byte values, then <|endoftext|>. Any text round-trips."""

    def __init__(self, spec: ByteTokenizerSpec) -> None:
        super().__init__(spec)
        self.eot_id = 256
        self.vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if 0 <= token < 256 else b""


class ByteTokenizerSpec(TokenizerSpec):
    """UTF-8 bytes: a fixed vocabulary of 257 that never meets an unknown character."""

    kind: Literal["byte"] = "byte"

    def build(self) -> ByteTokenizer:
        return ByteTokenizer(self)


# --------------------------------------------------------------------------- library-backed


def _require(module: str, kind: str):
    """Import a tokenizer library (its module and PyPI package share the name), or say how
    to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"tokenizer kind '{kind}' needs the '{module}' package, which is not installed",
            "Install it: pip install 'gptkit[tokenizers]'.",
        ) from None


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, read backwards: the printable character that stands for
    each byte in a byte-level BPE vocabulary -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return {chr(c): b for b, c in chars.items()}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer kept in ``tokenizer.json``."""

    FILE = "tokenizer.json"

    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__(spec)
        self.hf = None

    def _attach(self, hf, eot: str | None) -> None:
        self.hf = hf
        # Ids can have gaps (a hand-made vocabulary): the size is past the largest id, so
        # every id it encodes to has a row in the model's embedding table.
        ids = hf.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(hf.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
        eot_id = hf.token_to_id(eot) if eot else None
        if eot_id is None:
            raise DataError(
                f"tokenizer has no end-of-text token {eot!r}",
                "Set tokenizer.eot_token to a token in its vocabulary.",
            )
        self.eot_id = eot_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token: int) -> bytes:
        """A byte-level (GPT-2 style) token's bytes, from its characters (each stands for
        one byte); another kind's decoded text."""
        piece = self.hf.id_to_token(token)
        byte_level = type(self.hf.decoder).__name__ == "ByteLevel"
        if token == self.eot_id or piece is None or not byte_level:
            return super().token_bytes(token)
        if self.hf.decode([token], skip_special_tokens=True) == "":  # a special token: the
            return b""  # text leaves it out, as decode does
        table = _unicode_to_byte()
        if not all(c in table for c in piece):  # an added token, written as itself
            return super().token_bytes(token)
        return bytes(table[c] for c in piece)

    def state(self) -> dict[str, Any]:
        return {"file": self.FILE, "eot": self.hf.id_to_token(self.eot_id)}

    def save_files(self, directory: Path) -> list[str]:
        self.hf.save(str(directory / self.FILE))
        return [self.FILE]

    def load_state(self, state: dict[str, Any], directory: Path) -> None:
        tk = _require("tokenizers", self.spec.kind)
        path = state_file(directory, state["file"])
        self._attach(tk.Tokenizer.from_file(str(path)), state["eot"])


class BPETokenizer(HFTokenizer):
    """Byte-level BPE (GPT-2 style) trained on the training text with Hugging Face tokenizers."""

    def fit(self, text: str) -> None:
        tk = _require("tokenizers", "bpe")
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = tk.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.spec.vocab_size,
            min_frequency=self.spec.min_frequency,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(_chunks(text), trainer)
        self._attach(hf, EOT)


def _chunks(text: str, size: int = 1 << 16):
    for i in range(0, len(text), size):
        yield text[i : i + size]


class BPETokenizerSpec(TokenizerSpec):
    """Byte-level BPE trained on the training text (Hugging Face ``tokenizers``): any UTF-8
    text round-trips."""

    kind: Literal["bpe"] = "bpe"
    vocab_size: int = Field(512, ge=258, le=1 << 20, description="Target vocabulary size.")
    min_frequency: int = Field(2, ge=1)

    def build(self) -> BPETokenizer:
        return BPETokenizer(self)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model trained on the training text, with byte fallback."""

    FILE = "tokenizer.model"

    def __init__(self, spec: SentencePieceSpec) -> None:
        super().__init__(spec)
        self.sp = None
        self._proto = b""

    def _attach(self, proto: bytes) -> None:
        spm = _require("sentencepiece", "sentencepiece")
        self._proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eot_id = self.sp.piece_to_id(EOT)

    def fit(self, text: str) -> None:
        import io

        spm = _require("sentencepiece", "sentencepiece")
        out = io.BytesIO()
        try:
            self._train(spm, text, out)
        except RuntimeError as exc:
            raise DataError(
                f"sentencepiece could not train: {str(exc).split(']')[-1].strip()}",
                "Increase tokenizer.vocab_size.",
            ) from None
        self._attach(out.getvalue())

    def _train(self, spm, text: str, out) -> None:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text.split("\n")),
            model_writer=out,
            vocab_size=self.spec.vocab_size,
            model_type=self.spec.model_type,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],
            control_symbols=[EOT],
            minloglevel=2,
            num_threads=1,
            max_sentence_length=1 << 16,
            hard_vocab_limit=False,
        )

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if i != self.eot_id])

    def token_bytes(self, token: int) -> bytes:
        if 0 <= token < self.vocab_size and self.sp.is_byte(token):  # byte fallback: <0xC3>
            return bytes([int(self.sp.id_to_piece(token)[3:5], 16)])
        return super().token_bytes(token)

    def state(self) -> dict[str, Any]:
        return {"file": self.FILE}

    def save_files(self, directory: Path) -> list[str]:
        (directory / self.FILE).write_bytes(self._proto)
        return [self.FILE]

    def load_state(self, state: dict[str, Any], directory: Path) -> None:
        from gptkit.safeio import read_bytes

        path = state_file(directory, state["file"])
        self._attach(read_bytes(path, "tokenizer file", MAX_TOKENIZER_BYTES, RunError))


class SentencePieceSpec(TokenizerSpec):
    """SentencePiece (BPE or unigram) trained on the training text, bytes for unseen characters."""

    kind: Literal["sentencepiece"] = "sentencepiece"
    vocab_size: int = Field(512, ge=300, le=1 << 20)
    model_type: Literal["bpe", "unigram"] = "bpe"

    def build(self) -> SentencePieceTokenizer:
        return SentencePieceTokenizer(self)


def read_tokenizer_json(path: Path, what: str = "tokenizer.path") -> Any:
    """A local Hugging Face ``tokenizer.json`` (bounded in size) as a ``tokenizers.Tokenizer``."""
    tk = _require("tokenizers", "pretrained")
    from gptkit.safeio import check_regular

    if not path.exists():
        raise DataError(f"{what} not found: {path}", "Point it at a local tokenizer.json file.")
    check_regular(path, what, MAX_TOKENIZER_BYTES, DataError)
    try:
        return tk.Tokenizer.from_file(str(path))
    except Exception as exc:
        raise DataError(f"{what} {path} is not a tokenizer.json: {exc}") from None


def vocabulary_misfit(tokenizer: Tokenizer, vocab_size: int) -> str | None:
    """Why ``tokenizer`` cannot feed a model with ``vocab_size`` embeddings, or None: a token
    id past the model's table is an index error in the middle of a generation."""
    if tokenizer.vocab_size <= vocab_size and tokenizer.eot_id < vocab_size:
        return None
    return (
        f"the tokenizer has {tokenizer.vocab_size} tokens (ids up to {tokenizer.vocab_size - 1}, "
        f"end-of-text id {tokenizer.eot_id}) but the model only {vocab_size}"
    )


class PretrainedTokenizer(HFTokenizer):
    """A ready-made ``tokenizer.json`` from a local file (nothing is downloaded)."""

    def fit(self, text: str) -> None:
        self._attach(read_tokenizer_json(Path(self.spec.path)), self.spec.eot_token)

    def _attach(self, hf, eot: str | None) -> None:
        super()._attach(hf, eot)
        ids = {self.eot_id}
        for token in self.spec.stop_tokens:
            found = hf.token_to_id(token)
            if found is None:
                raise DataError(
                    f"tokenizer.stop_tokens: {token!r} is not in the tokenizer's vocabulary",
                    "List tokens of its tokenizer.json.",
                )
            ids.add(found)
        self._stop_ids = frozenset(ids)

    @property
    def stop_ids(self) -> frozenset[int]:
        return getattr(self, "_stop_ids", None) or super().stop_ids


class PretrainedSpec(TokenizerSpec):
    """A local Hugging Face ``tokenizer.json`` (e.g. GPT-2's), used as it is."""

    kind: Literal["pretrained"] = "pretrained"
    path: str = Field(..., description="Path to a tokenizer.json file.")
    eot_token: str = Field(EOT, description="The end-of-text token in its vocabulary.")
    stop_tokens: list[str] = Field(
        default_factory=list,
        description="Other tokens that end a generation as end-of-text does (a chat model's "
        "end of turn, <|im_end|>); import-hf takes them from generation_config.json.",
    )

    def fingerprint(self) -> str:
        from gptkit.safeio import read_bytes

        try:
            data = read_bytes(self.path, "tokenizer.path", MAX_TOKENIZER_BYTES, DataError)
        except DataError:
            return "missing"  # fit() says what is wrong with it
        return hashlib.sha256(data).hexdigest()[:16]

    def build(self) -> PretrainedTokenizer:
        return PretrainedTokenizer(self)


@hookimpl
def gptkit_register_tokenizer(register):
    for spec in (
        CharTokenizerSpec,
        ByteTokenizerSpec,
        BPETokenizerSpec,
        SentencePieceSpec,
        PretrainedSpec,
    ):
        register(spec)
