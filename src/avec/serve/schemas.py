"""Request bodies of the OpenAI-compatible API, plus avec's ``steering`` extension.

Validation is strict and complete at this boundary: JSON types are never coerced (``true`` is
not 1, ``"1"`` is not 1), every number is finite (``NaN`` and ``Infinity`` are refused) and in
range (a seed of ``2**64`` is refused), every string is valid Unicode (no lone surrogates),
names are matched whole, and unknown fields are refused by name. OpenAI fields this server
does not implement (``tools``, ``logprobs``, ``response_format``, non-zero penalties, ``n`` > 1,
...) get a 400 naming the field, unless they carry their harmless default. The limits that
depend on the server's configuration (``max_tokens``, ``|coef|``, ``|value|``, prompt size,
positions past the context, layers) are checked by the app and the engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from avec.vector import SteeringVector

from avec.errors import SteeringError
from avec.serve.registry import NAME_RE
from avec.intervene.steer import parse_positions

MIN_TEMPERATURE = 1e-3  # below it, logits / temperature can overflow; use 0 for greedy
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1
MAX_POSITION = 2**31 - 1  # the engine bounds positions by its context (prompt + max_tokens)
MAX_STOP = 4
MAX_STOP_CHARS = 256
FROM_RE = re.compile(r"from:[0-9]{1,10}")


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the string is not valid Unicode (a lone surrogate "
                         f"{text[exc.start]!r} at index {exc.start}); send UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
STRICT = ConfigDict(extra="forbid", strict=True)


class SteeringSpec(BaseModel):
    """One steering entry of a request: vector ``vector`` (a registered name) times ``coef``.

    ``layers`` picks some of the vector's layers (default: all of them); ``op`` is ``add``,
    ``ablate`` or ``clamp`` (``value`` is the projection clamp sets); ``positions`` is ``"all"``,
    ``"prompt"``, ``"generated"``, ``"from:K"`` or an int K. ``coef`` and ``value`` are finite
    JSON numbers; the engine bounds them (``Limits.max_abs_coef``, ``Limits.max_abs_value``).
    ``coef`` left out (or ``"recommended"``) takes the vector's recommended setting from
    ``avec tune``: its coefficient, and its layers, op, positions and value unless the entry
    gives them. ``coef_scale`` multiplies the coefficient (``0.5``: half the recommended one).
    ``when`` makes the entry conditional (CAST; :mod:`avec.intervene.conditions`): decided on
    the prompt, it steers the generated tokens of a request whose activations meet it
    (``per_token``: decided again before every new token).
    """

    model_config = STRICT

    vector: Text = Field(min_length=1, max_length=64)
    coef: Finite | Literal["recommended"] | None = None
    coef_scale: Finite = 1.0
    layers: list[int] | None = Field(default=None, max_length=1024)
    op: Literal["add", "ablate", "clamp"] = "add"
    positions: Union[int, Text] = "all"
    value: Finite = 0.0
    when: dict[str, Any] | None = None
    per_token: bool = False

    @field_validator("vector")
    @classmethod
    def _vector(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"invalid vector name {v!r}: use 1-64 characters from "
                             f"A-Z a-z 0-9 _ . - (not starting with . or -)")
        return v

    @field_validator("positions")
    @classmethod
    def _positions(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v > MAX_POSITION:
            raise ValueError(f"positions={v} is too large (at most {MAX_POSITION})")
        if isinstance(v, str) and v.startswith("from:") and not FROM_RE.fullmatch(v):
            raise ValueError(f"invalid positions {v!r}; 'from:K' needs K as 1-10 ASCII digits")
        try:
            return parse_positions(v)
        except SteeringError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v:
            raise ValueError("layers must not be empty; omit it to use all of the vector's layers")
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"layers {v} lists a layer twice")
        return v

    def setting(self, vector: SteeringVector) -> Setting:
        """What this entry applies with ``vector``: its own fields, or where ``coef`` is left
        out the vector's recommended setting for every field the entry does not give; then
        ``coef_scale``. Raises ValueError (naming ``coef``) for a vector without one."""
        given = self.model_fields_set
        if self.when is not None and "positions" in given and self.positions != "generated":
            raise ValueError(f"positions: a conditional entry steers the generated tokens; "
                             f"leave positions out (or give 'generated'), got "
                             f"{self.positions!r}")
        if self.per_token and self.when is None:
            raise ValueError("per_token: it re-checks a condition; give when")
        if self.coef is None or self.coef == "recommended":
            rec = vector.recommended
            if rec is None:
                raise ValueError(f"coef: vector {self.vector!r} has no recommended setting "
                                 f"(`avec tune` writes one); give coef")
            return Setting(rec.coef * self.coef_scale,
                           tuple(self.layers) if "layers" in given else tuple(rec.layers),
                           self.op if "op" in given else rec.op,
                           self.positions if "positions" in given
                           else parse_positions(rec.positions),
                           self.value if "value" in given else rec.value)
        return Setting(float(self.coef) * self.coef_scale,
                       tuple(self.layers) if self.layers is not None else None,
                       self.op, self.positions, self.value)


@dataclass(frozen=True)
class Setting:
    """An entry's effective steering: ``layers`` ``None`` means all of the vector's."""

    coef: float
    layers: tuple[int, ...] | None
    op: str
    positions: int | str
    value: float


class TextPart(BaseModel):
    """A text content part (``{"type": "text", "text": ...}``)."""

    model_config = STRICT

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One message; ``name`` is accepted and not used."""

    model_config = STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[Text, list[TextPart]]
    name: Text | None = Field(default=None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


def _is_zero(v: Any) -> bool:
    return type(v) in (int, float) and v == 0


# OpenAI fields that are refused unless they carry a value that asks for nothing
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "logprobs": (lambda v: v is None or v is False, "log probabilities are not returned"),
    "top_logprobs": (lambda v: v is None or (type(v) is int and v == 0),
                     "log probabilities are not returned"),
    "tools": (lambda v: v is None or v == [], "tool calling is not supported"),
    "tool_choice": (lambda v: v is None or v == "none", "tool calling is not supported"),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool),
                            "tool calling is not supported"),
    "functions": (lambda v: v is None or v == [], "function calling is not supported"),
    "function_call": (lambda v: v is None or v == "none", "function calling is not supported"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "structured output (response_format) is not supported"),
    "logit_bias": (lambda v: v is None or v == {}, "logit_bias is not supported"),
    "presence_penalty": (lambda v: v is None or _is_zero(v), "penalties are not supported"),
    "frequency_penalty": (lambda v: v is None or _is_zero(v), "penalties are not supported"),
    "n": (lambda v: v is None or (type(v) is int and v == 1),
          "only one choice per request is supported"),
}


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    model_config = STRICT

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; avec adds ``steering`` (applied after the server's
    default steering, which ``default_steering: false`` switches off for the request).
    ``temperature`` absent or 0 decodes greedily; from ``MIN_TEMPERATURE`` to 2 it samples,
    reproducibly with ``seed``. ``stop`` (a string or up to 4) ends the text before the first
    stop string. ``user``, ``metadata`` and ``stream_options`` (``include_usage``) are
    accepted; the fields in :data:`UNSUPPORTED` are refused unless harmless; any other field
    is refused by name."""

    model_config = STRICT

    model: Text = Field(max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: Finite | None = Field(default=None, ge=0, le=MAX_TEMPERATURE)
    top_p: Finite | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Union[Text, list[Text], None] = None
    user: Text | None = Field(default=None, max_length=256)
    metadata: dict[Text, Text] | None = Field(default=None, max_length=16)
    steering: list[SteeringSpec] | None = Field(default=None, max_length=64)
    default_steering: bool = True
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    n: Any = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"temperature={v!r} is too small to sample with; use 0 for greedy "
                             f"decoding or at least {MIN_TEMPERATURE}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return None
        if len(stops) > MAX_STOP:
            raise ValueError(f"{len(stops)} stop strings; at most {MAX_STOP} are allowed")
        for s in stops:
            if not 1 <= len(s) <= MAX_STOP_CHARS:
                raise ValueError(f"a stop string must have 1 to {MAX_STOP_CHARS} characters, "
                                 f"got {len(s)}")
        return stops or None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        harmless, why = UNSUPPORTED[info.field_name]
        if not harmless(v):
            raise ValueError(f"{info.field_name} is not supported by this server ({why}); "
                             f"remove the field")
        return v

    def prompt_chars(self) -> int:
        """Characters in the messages' text (checked against a limit before tokenizing)."""
        return sum(len(m.text()) for m in self.messages)

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings, none if ``stop`` was not given."""
        return tuple(self.stop or ())  # type: ignore[arg-type]  # the validator made a list

