"""Tokenizers from `tokenizer.json` folders and from GGUF vocabularies, as `tokenizers.Tokenizer`s."""
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors

from models.gguf_file import open_gguf

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# llama.cpp's pre-tokenizer names for byte-level BPE vocabularies, and how each splits text first.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class Tokenizer:
    backend: Backend
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # every id that ends generation: the tokenizer's EOS and the model's
    chat_template: str | None  # the default one
    # Every template by name where the model has named ones (Command-R: default, tool_use, rag); else empty
    chat_templates: dict[str, str] = field(default_factory=dict)

    max_chars_per_token: int | None = field(init=False)  # the most text one token stands for; None: unknown
    _markups: dict[str, "Markup"] = field(default_factory=dict, init=False, repr=False, compare=False)
    _token_bytes: dict[int, bytes] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.max_chars_per_token = _max_chars_per_token(self.backend)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode holds it): megabytes of text take seconds, and
        # the server's event loop must go on meanwhile.
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def markup(self, template: str) -> "Markup":
        """The chat template's markup tokens in this vocabulary. Built once per template (a server renders one all
        its life): finding them scans the template for every added token."""
        if template not in self._markups:
            self._markups[template] = Markup(self.backend, template)
        return self._markups[template]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to the text, as the decoder makes them but losing none: a byte-level or
        byte-fallback token that carries part of a UTF-8 character gives those bytes (decoding would give U+FFFD),
        and a SentencePiece piece keeps the space its "▁" stands for (decoding drops it at the start of a text). An
        id past the tokenizer's vocabulary (a model's padded rows) has none. Cached: a server asks for the same
        tokens all the time."""
        if token_id not in self._token_bytes:
            piece = self.backend.id_to_token(token_id)
            self._token_bytes[token_id] = b"" if piece is None else _piece_bytes(piece, self._decoder_steps)
        return self._token_bytes[token_id]

    @cached_property
    def _decoder_steps(self) -> list[dict]:
        """The decoder's steps, in order, as their JSON forms."""
        spec = json.loads(self.backend.decoder.__getstate__()) if self.backend.decoder else None
        return [] if spec is None else spec["decoders"] if spec["type"] == "Sequence" else [spec]


class Markup:
    """The tokens a chat template writes as markup, by their text: the special tokens, and the other added tokens
    whose text the template has (Command-R's <|START_OF_TURN_TOKEN|> starts its turns, yet its vocabulary does not
    mark it special). Added tokens the template does not use stay ordinary text that `encode` matches whole, and so
    do those that are only whitespace (runs of spaces in code vocabularies): a template's indentation is layout."""

    def __init__(self, backend: Backend, template: str):
        self.backend = backend
        self.tokens = {token.content: i for i, token in backend.get_added_tokens_decoder().items()
                       if token.special or (token.content.strip() and token.content in template)}

    def encode(self, text: str, plain: Callable[[str], str]) -> list[int]:
        """`text`'s ids, no special tokens added, where its markup strings are the markup tokens, as `encode` reads
        them, and each piece between them is passed through `plain` and read as plain text, markup strings included.
        The library tokenizes the text between added tokens piece by piece as well, so where `plain` changes nothing
        the ids are `encode`'s (all but exactly for a tokenizer.json whose added tokens strip spaces or match
        normalized text, or whose Metaspace marks the text's first piece only)."""
        parts = self._pattern.split(text)  # the pieces at even places, the markup tokens between them
        pieces = self._plain_text_backend.encode_batch([plain(p) for p in parts[::2]], add_special_tokens=False)
        ids = pieces[0].ids
        for token, piece in zip(parts[1::2], pieces[1:]):
            ids += [self.tokens[token], *piece.ids]
        return ids

    @cached_property
    def _pattern(self) -> re.Pattern:
        """Finds the markup strings as the library does: leftmost, and the longest of those starting there."""
        return re.compile(f"({alternation(self.tokens)})")

    @cached_property
    def _plain_text_backend(self) -> Backend:
        """The backend, but reading markup strings as text: they are added as special tokens, which
        `encode_special_tokens` tokenizes as text, and the other added tokens as they are. It shares the model (a copy
        of a large vocabulary takes seconds, holding the GIL); the added tokens, added again in the order of their
        ids, get those ids."""
        backend = Backend(self.backend.model)
        backend.normalizer, backend.pre_tokenizer = self.backend.normalizer, self.backend.pre_tokenizer
        added = self.backend.get_added_tokens_decoder()
        backend.add_tokens([_as_special(added[i]) if added[i].content in self.tokens else added[i]
                            for i in sorted(added)])
        backend.encode_special_tokens = True
        return backend


def _as_special(token: AddedToken) -> AddedToken:
    return AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip, rstrip=token.rstrip,
                      normalized=token.normalized, special=True)


def alternation(words: Iterable[str]) -> str:
    """A regex matching any of `words`, the longest of those that start at a place, written as a trie: where no
    word matches it tries a character per level, not every word (Llama 3's 256 special tokens begin alike)."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # a word ends here
    return _trie_pattern(trie) if trie else "(?!)"


def _trie_pattern(node: dict) -> str:
    branches = [re.escape(char) + _trie_pattern(child) for char, child in node.items() if char]
    branches += [""] if "" in node else []  # the word that ends here: after the longer ones
    return branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: the printable Latin-1 bytes as
    themselves, the others as the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_OF_CHAR = _byte_level_alphabet()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


def _piece_bytes(piece: str, steps: list[dict]) -> bytes:
    """A vocabulary piece's bytes, through the decoder steps that act on one token alone. The steps that act
    between tokens (Fuse) or at the text's start (Strip, Metaspace's first space) leave a lone token as it is."""
    for step in steps:
        kind = step["type"]
        # As the library's ByteLevel decoder: a piece with a character outside the alphabet (an added token
        # such as Command-R's emoji) is its own UTF-8.
        if kind == "ByteLevel" and all(char in _BYTE_OF_CHAR for char in piece):
            return bytes(_BYTE_OF_CHAR[char] for char in piece)
        if kind == "ByteFallback" and (byte := _BYTE_PIECE.fullmatch(piece)):
            return bytes([int(byte[1], 16)])
        if kind == "Replace":
            pattern = step["pattern"]
            piece = (piece.replace(pattern["String"], step["content"]) if "String" in pattern
                     else re.sub(pattern["Regex"], step["content"], piece))
        if kind == "Metaspace":
            piece = piece.replace(step["replacement"], " ")
    return piece.encode("utf-8")


# Normalizers and pre-tokenizers that never make text shorter (or drop it): with them, no token stands for more
# characters than the longest string in the vocabulary.
_KEEPS_LENGTH = {"Sequence", "Prepend", "ByteLevel", "Metaspace", "Digits", "Split", "Replace"}


def _keeps_length(spec: dict | None) -> bool:
    """Whether a normalizer or pre-tokenizer (its JSON form) keeps every character of the text."""
    if spec is None:
        return True
    kind, pattern = spec["type"], spec.get("pattern", {})
    if kind == "Sequence":
        return all(map(_keeps_length, spec.get("normalizers") or spec.get("pretokenizers") or []))
    shortens = kind == "Replace" and ("Regex" in pattern or len(spec["content"]) < len(pattern["String"]))
    return kind in _KEEPS_LENGTH and not shortens and not (kind == "Split" and spec.get("behavior") == "Removed")


def _max_chars_per_token(backend: Backend) -> int | None:
    """A bound on the characters of text one token can stand for (a byte-level token's string has a character per
    byte, a SentencePiece token's one per character); None when the tokenizer may shorten the text first."""
    parts = (backend.normalizer, backend.pre_tokenizer)
    if not all(_keeps_length(json.loads(part.__getstate__()) if part else None) for part in parts):
        return None
    return max(len(token) for token in backend.get_vocab())


def _bos_post_processor(bos: str, bos_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def _token_content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    return _from_gguf(path) if path.suffix == ".gguf" else _from_folder(path)


def _sentencepiece_model(file: Path) -> Backend:
    """A Llama-2 style `tokenizer.model`: the same SentencePiece BPE as a GGUF `llama` vocabulary."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
    ids = range(sp.get_piece_size())
    kinds = [_CONTROL if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in ids]
    fields = {"tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in ids],
              "tokenizer.ggml.scores": [sp.get_score(i) for i in ids], "tokenizer.ggml.token_type": kinds,
              "tokenizer.ggml.unknown_token_id": sp.unk_id()}
    backend = _sentencepiece_bpe(lambda key, default=None: fields.get(key, default))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(fields["tokenizer.ggml.tokens"], kinds) if k == _CONTROL])
    return backend


def _from_folder(folder: Path) -> Tokenizer:
    defaults = {}
    if (folder / "tokenizer.json").exists():
        backend = Backend.from_file(str(folder / "tokenizer.json"))
    else:
        backend = _sentencepiece_model(folder / "tokenizer.model")
        defaults = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}  # LlamaTokenizer's own
    cfg_file, gen_file = folder / "tokenizer_config.json", folder / "generation_config.json"
    cfg = {**defaults, **(json.loads(cfg_file.read_text()) if cfg_file.exists() else {})}
    bos, eos = _token_content(cfg.get("bos_token")), _token_content(cfg.get("eos_token"))
    bos_id = backend.token_to_id(bos) if bos else None
    if "add_bos_token" in cfg and bos_id is not None:  # the flag overrides tokenizer.json, as in transformers
        backend.post_processor = _bos_post_processor(bos, bos_id) if cfg["add_bos_token"] else None
    eos_ids = [backend.token_to_id(eos)] if eos else []
    if gen_file.exists():
        gen_eos = json.loads(gen_file.read_text()).get("eos_token_id")
        eos_ids += gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    templates = _folder_chat_templates(folder, cfg.get("chat_template"))
    return Tokenizer(backend, bos_id, tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
                     templates.get("default"), _named(templates))


def _folder_chat_templates(folder: Path, configured: str | list | None) -> dict[str, str]:
    """The folder's chat templates by name, as transformers reads them: the files `chat_template.jinja` (the default)
    and `additional_chat_templates/<name>.jinja` if there are any, else tokenizer_config.json's `chat_template`, one
    template (the default) or a list of named ones."""
    named_files = sorted((folder / "additional_chat_templates").glob("*.jinja"))
    files = {"default": folder / "chat_template.jinja", **{path.stem: path for path in named_files}}
    found = {name: path.read_text() for name, path in files.items() if path.is_file()}
    if found:
        return found
    if isinstance(configured, list):
        return {t["name"]: t["template"] for t in configured}
    return {"default": configured} if configured else {}


def _named(templates: dict[str, str]) -> dict[str, str]:
    """`Tokenizer.chat_templates`: all of them where there are named ones besides the default, else none."""
    return templates if set(templates) - {"default"} else {}


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama3", "llama-bpe", "llama-v3"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's own split


def _byte_level_bpe(meta) -> Backend:
    """`gpt2` vocabularies: byte-level BPE with the file's merges, split first as its `pre` names."""
    tokens = meta("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
    backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta("tokenizer.ggml.pre", "gpt2"))
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta) -> Backend:
    """`llama` vocabularies (SentencePiece BPE): pieces merge best score first, unknown characters fall
    back to byte tokens, spaces are "▁" and the text gets a leading one."""
    tokens, scores = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = sorted(((score, piece[:k], piece[k:]) for piece, score in zip(tokens, scores)
                     for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab),
                    key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    unk = tokens[meta("tokenizer.ggml.unknown_token_id", 0)]
    backend = Backend(models.BPE(vocab, [(left, right) for _, left, right in merges], unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    spaces = [normalizers.Replace(" ", "\u2581")]
    if meta("tokenizer.ggml.add_space_prefix", True):
        spaces.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(spaces)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", int(meta("tokenizer.ggml.add_space_prefix", True)), 0)])
    return backend


_GGUF_TOKENIZERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def _from_gguf(file: Path) -> Tokenizer:
    reader = open_gguf(file)
    meta = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default  # noqa: E731
    kind = meta("tokenizer.ggml.model")
    if kind not in _GGUF_TOKENIZERS:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; supported: {sorted(_GGUF_TOKENIZERS)}")
    backend = _GGUF_TOKENIZERS[kind](meta)
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    # Control tokens (<|im_start|>, ...) are special: matched whole and skipped when decoding;
    # user-defined ones are matched whole but are ordinary text.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED])
    bos_id, eos_id = meta("tokenizer.ggml.bos_token_id"), meta("tokenizer.ggml.eos_token_id")
    # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise.
    if meta("tokenizer.ggml.add_bos_token", kind == "llama") and bos_id is not None:
        backend.post_processor = _bos_post_processor(tokens[bos_id], bos_id)
    eos_ids = [eos_id, meta("tokenizer.ggml.eot_token_id"), meta("tokenizer.ggml.eom_token_id")]
    templates = _gguf_chat_templates(reader.fields, meta)
    return Tokenizer(backend, bos_id, tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
                     templates.get("default"), _named(templates))


def _gguf_chat_templates(keys, meta) -> dict[str, str]:
    """llama.cpp's keys: `tokenizer.chat_template` the default, `tokenizer.chat_template.<name>` the named ones."""
    prefix = "tokenizer.chat_template."
    templates = {key.removeprefix(prefix): meta(key) for key in keys if key.startswith(prefix)}
    default = meta("tokenizer.chat_template")
    return templates if default is None else {"default": default, **templates}
