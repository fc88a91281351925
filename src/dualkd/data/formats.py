"""Record formats: prompt/output, Alpaca instruction/input/output, chat messages, preference pairs.

A record becomes an `Example` (raw fields, validated). Rendering to (prompt text, response text) happens per
tokenizer because a chat template belongs to a tokenizer: two models with different templates see the same
conversation rendered differently.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from dualkd.errors import DataError

# MiniLLM/DSKD Alpaca template (as the DSKD repository formats Dolly); the input block appears only when `input`
# is non-empty.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

Format = Literal["auto", "prompt_output", "alpaca", "messages", "preference"]


@dataclass(frozen=True)
class Example:
    """One validated record.

    Text formats carry `prompt` (already rendered) and `references` (the first one is trained on);
    chat records carry `messages` whose last turn is the assistant's response.
    """

    where: str
    """`file.jsonl:12`: where the record came from, for error messages."""
    prompt: str | None = None
    references: tuple[str, ...] = ()
    messages: tuple[dict[str, str], ...] | None = None
    rejected: str | None = None
    """Preference records: the rejected response (the chosen one is the training response)."""
    teacher: str | None = None
    """The record's `teacher` field, in any format: which of several teachers reads this example
    (`objective.combine: route`, methods/multi_teacher.py); None where the record has none."""

    @property
    def rejected_example(self) -> Example:
        """The same prompt with the rejected response in place of the chosen one."""
        if self.rejected is None:
            raise DataError(f"{self.where}: not a preference record (no `rejected` response)")
        if self.messages is not None:
            turn = {"role": "assistant", "content": self.rejected}
            return Example(where=self.where, messages=(*self.messages[:-1], turn))
        return Example(where=self.where, prompt=self.prompt, references=(self.rejected,))

    @property
    def response(self) -> str:
        """The training response (first reference, or the final assistant turn)."""
        if self.messages is not None:
            return self.messages[-1]["content"]
        return self.references[0]


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text.strip():
        return ALPACA_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_TEMPLATE.format(instruction=instruction)


def detect_format(obj: dict[str, Any]) -> str | None:
    """Auto-detection, in priority order: `chosen` or `rejected` (a preference pair), `messages`, an already
    rendered `prompt`, then `instruction`."""
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "messages" in obj:
        return "messages"
    if "prompt" in obj:
        return "prompt_output"
    if "instruction" in obj:
        return "alpaca"
    return None


def parse_record(obj: Any, where: str, fmt: Format = "auto", translation: tuple[str, str] | None = None
                 ) -> Example:
    """Validate one decoded JSON record. Raises DataError naming `where` and the field. With `translation`
    (source, target) the record is a sentence pair such as {"de": ..., "en": ...}: the source sentence is the
    prompt, the target the reference. A `teacher` field (a name) is kept in any format."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    example = _parse_fields(obj, where, fmt, translation)
    if "teacher" not in obj:
        return example
    return replace(example, teacher=_string(obj, "teacher", where, allow_empty=False))


def _parse_fields(obj: dict[str, Any], where: str, fmt: Format, translation: tuple[str, str] | None) -> Example:
    if translation is not None:
        for lang in translation:
            _string(obj, lang, where, allow_empty=False)
        return Example(where=where, prompt=obj[translation[0]], references=(obj[translation[1]],))
    kind = detect_format(obj) if fmt == "auto" else fmt
    if kind is None:
        raise DataError(
            f"{where}: unknown record format (keys: {sorted(obj)}); expected `prompt`+`output`, "
            "`instruction`(+`input`)+`output`, `messages`, or `prompt`+`chosen`+`rejected`"
        )
    if kind == "prompt_output":
        prompt = _string(obj, "prompt", where)
        return Example(where=where, prompt=prompt, references=_references(obj, "output", where))
    if kind == "alpaca":
        instruction = _string(obj, "instruction", where, allow_empty=False)
        input_text = _string(obj, "input", where) if "input" in obj else ""
        return Example(where=where, prompt=alpaca_prompt(instruction, input_text),
                       references=_references(obj, "output", where))
    if kind == "messages":
        return Example(where=where, messages=_messages(obj, where))
    if kind == "preference":
        return _preference(obj, where)
    raise DataError(f"{where}: unknown format {kind!r}")


def render(example: Example, tokenizer: Any) -> tuple[str, str]:
    """(prompt text, response text) as this tokenizer's model should read them.

    Chat records use the tokenizer's chat template: the prompt is the conversation before the last turn with
    the generation prompt, the response is whatever the template adds for the final assistant turn.
    """
    if example.messages is None:
        return example.prompt or "", example.response
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(f"{example.where}: field 'messages': the tokenizer has no chat template to render it with")
    history = list(example.messages[:-1])
    try:
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(list(example.messages), tokenize=False)
    except Exception as e:  # jinja's TemplateError from raise_exception(), or a template bug
        raise DataError(f"{example.where}: field 'messages': the tokenizer's chat template refuses this "
                        f"conversation: {type(e).__name__}: {e}") from None
    if not full.startswith(prompt):
        raise DataError(
            f"{example.where}: field 'messages': the chat template renders the conversation so that the prompt "
            "is not a prefix of the full text (the template rewrites earlier turns); cannot mask the prompt"
        )
    return prompt, full[len(prompt):]


# ------------------------------------------------------------------------------------------- field checks


ROLES = ("system", "user", "assistant", "tool")


def _text(value: str, field: str, where: str) -> str:
    """`value` if it is valid Unicode text; JSON's \\ud800 escapes can carry lone surrogates, which no
    tokenizer can encode (and which would fail the whole dataset's tokenization call)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field '{field}': invalid Unicode: a lone surrogate "
                        f"U+{ord(value[e.start]):04X} at character {e.start}") from None
    return value


def _string(obj: dict[str, Any], field: str, where: str, allow_empty: bool = True) -> str:
    if field not in obj:
        raise DataError(f"{where}: field '{field}' is missing")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}': expected a string, got {_describe(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{field}' is empty")
    return _text(value, field, where)


def _references(obj: dict[str, Any], field: str, where: str) -> tuple[str, ...]:
    if field not in obj:
        raise DataError(f"{where}: field '{field}' is missing")
    value = obj[field]
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{where}: field '{field}': expected a string or a list of strings, got {_describe(value)}")
    if not refs:
        raise DataError(f"{where}: field '{field}': empty list of references")
    if not refs[0].strip():
        raise DataError(f"{where}: field '{field}': empty response")
    return tuple(_text(r, field, where) for r in refs)


def _messages(obj: dict[str, Any], where: str) -> tuple[dict[str, str], ...]:
    value = obj["messages"]
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(f"{where}: field 'messages': expected a list of at least two turns, got {_describe(value)}")
    turns = []
    for i, turn in enumerate(value):
        field = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{field}': expected {{'role': str, 'content': str}}, got "
                            f"{_describe(turn)}")
        role = turn.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: field '{field}.role': " + (
                "missing" if role is None else f"unknown role {role!r}") + f"; expected one of {', '.join(ROLES)}")
        turns.append({"role": role, "content": _content(turn, f"{field}.content", where)})
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: field 'messages[{len(turns) - 1}]': the last turn must be the assistant's "
                        f"response, got role {turns[-1]['role']!r}")
    if not turns[-1]["content"].strip():
        raise DataError(f"{where}: field 'messages[{len(turns) - 1}].content': empty response")
    return tuple(turns)


def _content(turn: dict[str, Any], field: str, where: str) -> str:
    """A turn's text: a string, or OpenAI-style content parts of which only text parts are accepted (joined
    with newlines)."""
    if "content" not in turn:
        raise DataError(f"{where}: field '{field}' is missing")
    content = turn["content"]
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else _describe(part)
                raise DataError(f"{where}: field '{field}[{k}]': only text parts ({{'type': 'text', 'text': ...}}) "
                                f"can be trained on, got {kind!r}")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise DataError(f"{where}: field '{field}': expected a string or a list of text parts, got "
                        f"{_describe(content)}")
    return _text(content, field, where)


def _preference(obj: dict[str, Any], where: str) -> Example:
    """`prompt` + `chosen` + `rejected`. Text: three strings. Chat: `chosen`/`rejected` are message lists, either
    whole conversations that differ only in the last (assistant) turn (UltraFeedback's layout), or just the
    assistant turn after a `prompt` given as a string (one user turn) or a message list."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise DataError(f"{where}: field '{key}' is missing")
    chosen, rejected = obj["chosen"], obj["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = _string(obj, "prompt", where)
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise DataError(f"{where}: field '{key}': empty response")
            _text(value, key, where)
        return Example(where=where, prompt=prompt, references=(chosen,), rejected=rejected)
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{where}: fields 'chosen'/'rejected': expected two strings or two message lists, got "
                        f"{_describe(chosen)} and {_describe(rejected)}")
    convs = []
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if len(value) < 2:  # only the answer: the prompt holds the conversation before it
            prompt = obj.get("prompt")
            if isinstance(prompt, str):
                before = [{"role": "user", "content": prompt}]
            elif isinstance(prompt, list):
                before = list(prompt)
            else:
                raise DataError(f"{where}: field 'prompt': expected a string or a message list before the single-turn "
                                f"'{key}', got {_describe(prompt)}")
            value = before + list(value)
        try:
            convs.append(_messages({"messages": value}, where))
        except DataError as e:
            raise DataError(str(e).replace("field 'messages", f"field '{key}")) from None
    if convs[0][:-1] != convs[1][:-1]:
        raise DataError(f"{where}: fields 'chosen'/'rejected': the conversations differ before the last turn")
    return Example(where=where, messages=convs[0], rejected=convs[1][-1]["content"])


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return f"a list of {len(value)}" + (f" ({type(value[0]).__name__} first)" if value else "")
    return type(value).__name__
