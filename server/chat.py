"""Chat templates: which one a model uses, and rendering it as Hugging Face's renderer does."""
import json
from datetime import datetime
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

BUILTIN_DIR = Path(str(files("chat_templates")))
# The built-in template for a model that brings none of its own.
BY_ARCHITECTURE = {"LlamaForCausalLM": "llama-2-chat", "CohereForCausalLM": "command-r"}


class ChatTemplateError(ValueError):
    """The template is missing or refused the conversation (a 400 for the client)."""


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise(message: str):
    raise TemplateError(message)


@lru_cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
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


def choose_template(override: str | None, model_template: str | None, architecture: str) -> str | None:
    """The flag wins, then the model's own template, then the built-in one for its architecture."""
    if override:
        return load_template(override)
    if model_template:
        return model_template
    return load_template(BY_ARCHITECTURE[architecture]) if architecture in BY_ARCHITECTURE else None


RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token")  # set by the server, not by kwargs


def render(template: str | None, messages: list[dict], add_generation_prompt: bool, bos_token: str = "",
           eos_token: str = "", extra: dict | None = None) -> str:
    """Render a conversation, with `extra` variables for the template (a request's chat_template_kwargs).
    Keys whose value is None are dropped, as transformers does."""
    extra = extra or {}
    if template is None:
        raise ChatTemplateError("this model has no chat template; start the server with --chat-template")
    if clash := [name for name in RESERVED if name in extra]:
        raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(clash)}")
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return _environment().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, **extra)
    except Exception as exc:  # noqa: BLE001 - Jinja's errors, undefined names, sandbox violations, and the
        # Python errors of a template's own operations on the request's values ("a" + 1): all the request's 400
        detail = exc if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {exc}"
        raise ChatTemplateError(f"chat template error: {detail}") from exc
