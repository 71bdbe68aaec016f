"""Chat templates: which one a model uses, and rendering it as Hugging Face's renderer does."""
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from jinja2 import TemplateError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from models.tokenizer import alternation

BUILTIN_DIR = Path(str(files("chat_templates")))
# The built-in templates for a model that brings none of its own, by name as checkpoints name theirs: a default, and
# for Cohere the tool-use and RAG templates its checkpoints ship besides.
BY_ARCHITECTURE = {"LlamaForCausalLM": {"default": "llama-2-chat"},
                   "CohereForCausalLM": {"default": "command-r", "tool_use": "command-r-tool_use",
                                         "rag": "command-r-rag"}}
# Characters of Unicode's private use area mean nothing to any vocabulary; one the template lacks marks placeholders.
PRIVATE_USE = range(0xE000, 0xF900)


class ChatTemplateError(ValueError):
    """The template is missing or refused the conversation (a 400 for the client); `param` names the field at fault."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise(message: str):
    raise TemplateError(message)


class _TemplateDict:
    """`dict` for templates, as the reference renderer has it: it builds dicts, but is not the type itself, whose
    unbound methods (`dict.update(d, ...)`) would change values the immutable sandbox guards."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """`namespace()` refusing attribute names that start with an underscore, as the reference renderer's does: they
    lead towards Python's internals."""

    def __init__(*args, **kwargs):  # no named `self`, as Namespace's own: `namespace(self=...)` stays an attribute
        self, attributes = args[0], dict(*args[1:], **kwargs)
        for name in attributes:
            _check_attribute(name)
        Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        _check_attribute(name)
        Namespace.__setitem__(self, name, value)


def _check_attribute(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a namespace attribute may not start with an underscore: {name!r}")


@lru_cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    return env


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jinja"))


def load_template(source: str) -> str:
    """`--chat-template`: a file path or the name of a built-in template."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text()
    if (BUILTIN_DIR / f"{source}.jinja").is_file():
        return (BUILTIN_DIR / f"{source}.jinja").read_text()
    raise ChatTemplateError(f"chat template {source!r} is neither a file nor a built-in ({', '.join(builtin_names())})")


@dataclass(frozen=True)
class ChatTemplates:
    """A model's chat templates: the default, and the named ones when it has several (Command-R's `default`,
    `tool_use` and `rag`), `default` among them where it has one."""
    default: str | None
    named: dict[str, str] = field(default_factory=dict)

    def pick(self, has_tools: bool, has_documents: bool) -> str | None:
        """The template for a request. `tool_use` for one with tools, whatever else it has, as Hugging Face's
        get_chat_template picks (it counts tools that are not None, an empty list too); `rag` for one with documents
        and no tools, which Hugging Face leaves to the caller to name; else, and where the model lacks the name, the
        default."""
        name = "tool_use" if has_tools else "rag" if has_documents else None
        return self.named.get(name, self.default)


def choose_template(override: str | None, model_template: str | None, architecture: str,
                    model_templates: dict[str, str] | None = None) -> ChatTemplates:
    """The flag wins (one template for every request), then the model's own templates (`model_templates`: its named
    ones, if any), then the built-in ones for its architecture."""
    if override:
        return ChatTemplates(load_template(override))
    if model_template or model_templates:
        return ChatTemplates(model_template, dict(model_templates or {}))
    builtin = {name: load_template(source) for name, source in BY_ARCHITECTURE.get(architecture, {}).items()}
    return ChatTemplates(builtin.get("default"), builtin if len(builtin) > 1 else {})


# Set by the server, not by chat_template_kwargs: tools and documents come from the request's own fields.
RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token", "tools", "documents")


def render(template: str | None, messages: list[dict], add_generation_prompt: bool, bos_token: str = "",
           eos_token: str = "", extra: dict | None = None, tools: list[dict] | None = None,
           documents: list[dict] | None = None) -> str:
    """Render a conversation, with `extra` variables for the template (a request's chat_template_kwargs). Messages'
    keys whose value is None are dropped, as transformers does. `tools` (OpenAI's tool objects) and `documents` are
    the template's variables of those names, None when the request has none: transformers passes them so too, and
    a template may test `tools is defined`."""
    extra = extra or {}
    if template is None:
        raise ChatTemplateError("this model has no chat template; start the server with --chat-template")
    if clash := [name for name in RESERVED if name in extra]:
        raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs")
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    variables = {**extra, "messages": messages, "add_generation_prompt": add_generation_prompt,
                 "bos_token": bos_token, "eos_token": eos_token, "tools": tools, "documents": documents}
    try:  # one dict, not keywords: a variable named `self` would clash with render's own argument
        return _environment().from_string(template).render(variables)
    except Exception as exc:  # noqa: BLE001 - Jinja's errors, undefined names, sandbox violations, and the
        # Python errors of a template's own operations on the request's values ("a" + 1): all the request's 400
        detail = exc if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {exc}"
        raise ChatTemplateError(f"chat template error: {detail}") from exc


class RequestText:
    """The request's strings (message contents and names, chat_template_kwargs at any depth) made plain text for
    the template. `escape` replaces each markup token's string in them (the template's markup: `Tokenizer.markup`)
    by a placeholder, and so the start of a string that ends a markup token and the end of one that begins one, which
    the text beside them in the rendering could complete; `unescape` brings them back in rendered text. The markup
    tokens of a rendering are then the template's own. A placeholder is the marker, a number and the marker; the
    marker in request strings is escaped too."""

    def __init__(self, markup_tokens: tuple[str, ...], template: str):
        self.syntax = _syntax(markup_tokens, template) if markup_tokens else None  # None: nothing to escape
        self.placeholders: dict[str, str] = {}  # by the text they stand for
        self.originals: dict[str, str] = {}  # by placeholder

    @property
    def escaped(self) -> bool:
        return bool(self.placeholders)

    def escape(self, value):
        """`value`, a string or lists and dicts of them at any depth, with each string escaped (keys too)."""
        return self._escape(value) if self.syntax else value

    def unescape(self, text: str) -> str:
        # .get: a template that cut or reversed a string may have left a marker and digits that are no placeholder
        return self.syntax.placeholder.sub(lambda match: self.originals.get(match[0], match[0]), text)

    def _escape(self, value):
        if isinstance(value, str):
            return self._escape_string(value)
        # map, not comprehensions, which cost a frame of their own before Python 3.12: JSON nested as deep as the
        # parser takes (about 990 levels) escapes within the recursion limit
        if isinstance(value, dict):
            return dict(zip(map(self._escape, value), map(self._escape, value.values())))
        if isinstance(value, list):
            return list(map(self._escape, value))
        return value

    def _escape_string(self, text: str) -> str:
        syntax = self.syntax
        text = syntax.anywhere.sub(lambda match: self._placeholder(match[0]), text)
        if start := syntax.start.match(text):
            text = self._placeholder(start[0]) + text[start.end():]
        if end := syntax.end.search(text[-syntax.longest:]):
            text = text[:len(text) - len(end[0])] + self._placeholder(end[0])
        return text

    def _placeholder(self, original: str) -> str:
        if original not in self.placeholders:
            placeholder = f"{self.syntax.marker}{len(self.placeholders)}{self.syntax.marker}"
            self.placeholders[original], self.originals[placeholder] = placeholder, original
        return self.placeholders[original]


@dataclass(frozen=True)
class _Syntax:
    """What `RequestText` escapes for one vocabulary and template, and how it writes placeholders."""
    marker: str  # a private-use character that neither the template nor any markup token has
    anywhere: re.Pattern  # markup-token strings and the marker
    start: re.Pattern  # the end of a markup token (matched at the start of a string)
    end: re.Pattern  # the start of one (searched for in a string's last `longest` characters)
    longest: int
    placeholder: re.Pattern


@lru_cache(maxsize=8)
def _syntax(markup_tokens: tuple[str, ...], template: str) -> _Syntax:
    """Built once per vocabulary and template. The patterns are tries: a few MiB of text take tens of milliseconds
    to scan, whatever it holds."""
    marker = next(chr(c) for c in PRIVATE_USE
                  if chr(c) not in template and not any(chr(c) in token for token in markup_tokens))
    ends = {token[i:] for token in markup_tokens for i in range(1, len(token))}
    starts = {token[:i] for token in markup_tokens for i in range(1, len(token))}
    return _Syntax(marker, re.compile(alternation([marker, *markup_tokens])), re.compile(alternation(ends)),
                   re.compile(f"{alternation(starts)}\\Z"), max(map(len, markup_tokens)),
                   re.compile(f"{marker}[0-9]+{marker}"))
