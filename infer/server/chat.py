"""Chat templates: the Jinja template a Hugging Face tokenizer directory carries, rendered like transformers.

`load_chat_template(model_dir)` reads `chat_template.jinja` or the `chat_template` field of
`tokenizer_config.json` (a string, or a list of {"name", "template"} where "default" is used);
None when the directory has none (the server then refuses /v1/chat/completions with a 400).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

__all__ = ["ChatTemplate", "ChatTemplateError", "load_chat_template"]


class ChatTemplateError(ValueError):
    """The template is unreadable or failed to render the given messages."""


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", origin: str = ""):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template in {origin or 'tokenizer config'} does not compile: {e}") from e
        self.bos_token, self.eos_token, self.origin = bos_token, eos_token, origin

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role", "content"}, ...]) ending with the assistant turn."""
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template could not render these messages: {e}") from e


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def load_chat_template(model_dir: str | os.PathLike | None) -> ChatTemplate | None:
    """The directory's chat template, or None when it has none."""
    if model_dir is None:
        return None
    model_dir = os.fspath(model_dir)
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    cfg: dict[str, Any] = {}
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ChatTemplateError(f"{cfg_path}: unreadable tokenizer config ({e})") from e
    source, origin = cfg.get("chat_template"), cfg_path
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            source, origin = f.read(), jinja_path
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    if not source:
        return None
    if not isinstance(source, str):
        raise ChatTemplateError(f"{origin}: chat_template must be a string, got {type(source).__name__}")
    return ChatTemplate(source, bos_token=_token_text(cfg.get("bos_token")), eos_token=_token_text(cfg.get("eos_token")),
                        origin=origin)
