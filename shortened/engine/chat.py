"""Records as chats, rendered through the model's own chat template.

Instruct models are calibrated, retrained and compared on text shaped the way they are
prompted: ``chat_template: true`` on calibration, training or agreement data renders every
record with the tokenizer's ``apply_chat_template``. A record becomes a list of
``{role, content}`` messages by its shape:

* ``messages``: a list of ``{"role", "content"}`` objects, used as is;
* Alpaca (``instruction`` and ``output``, optional ``input``): a user turn (the instruction,
  then the input after a blank line when there is one) and an assistant turn (the output);
* anything else: the text in the spec's ``field`` as a single user turn.

Rendered text carries the template's own special tokens (BOS, turn markers), so it is
tokenized *without* the tokenizer's special tokens, as ``apply_chat_template`` itself does.
A tokenizer without a chat template is refused (``NoChatTemplate``): rendering with a
made-up default would calibrate or train on a format the model never saw.
"""

from __future__ import annotations

from typing import Any

from .errors import DataError, EngineError, NoChatTemplate

ROLES = ("system", "user", "assistant", "tool")
Messages = list[dict[str, str]]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template of its own."""
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: Any, what: str) -> None:
    """Raise ``NoChatTemplate`` naming ``what`` asked for one when the tokenizer has none."""
    if not has_chat_template(tokenizer):
        raise NoChatTemplate(
            f"{what} asks for chat_template but the model's tokenizer has no chat template "
            "(tokenizer_config.json 'chat_template' or chat_template.jinja); "
            "turn chat_template off or use an instruct model's tokenizer"
        )


def record_messages(
    record: dict[str, Any], field: str, where: str, error: type[EngineError] = DataError
) -> Messages:
    """The chat a record stands for (see the module docstring); ``error`` names a record
    with none of the shapes, or malformed ``messages``."""
    if "messages" in record:
        return _checked_messages(record["messages"], where, error)
    if "instruction" in record and "output" in record:
        instruction = str(record["instruction"])
        extra = str(record.get("input") or "")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return [
            {"role": "user", "content": user},
            {"role": "assistant", "content": str(record["output"])},
        ]
    if field not in record:
        raise error(
            f"{where}: a chat record needs 'messages', 'instruction'+'output' or the "
            f"field {field!r} (has {sorted(record)})"
        )
    return [{"role": "user", "content": str(record[field])}]


def _checked_messages(messages: Any, where: str, error: type[EngineError]) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise error(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    checked: Messages = []
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise error(
                f"{where}: messages[{i}] must be an object with a role ({', '.join(ROLES)}) "
                "and a string content"
            )
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def prompt_part(messages: Messages) -> Messages:
    """The conversation up to its last non-assistant turn: what the model is asked, without
    the answer it is trained on (trailing assistant turns dropped)."""
    end = len(messages)
    while end > 0 and messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[:end]


def render_chat(tokenizer: Any, messages: Messages, *, add_generation_prompt: bool = False) -> str:
    """The conversation as the model's chat template writes it (special tokens included as
    text); with ``add_generation_prompt`` it ends where the assistant's answer would start."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return str(text)


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered chat text: the template wrote the special tokens already."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
