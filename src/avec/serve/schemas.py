"""Request bodies of the OpenAI-compatible API, plus avec's ``steering`` extension."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from avec.errors import SteeringError
from avec.steer import parse_positions


class SteeringSpec(BaseModel):
    """One steering entry of a request: vector ``vector`` (a registered name) times ``coef``.

    ``layers`` picks some of the vector's layers (default: all of them); ``op`` is ``add``,
    ``ablate`` or ``clamp`` (``value`` is the projection clamp sets); ``positions`` is ``"all"``,
    ``"prompt"``, ``"generated"``, ``"from:K"`` or an int K.
    """

    model_config = ConfigDict(extra="forbid")

    vector: str = Field(min_length=1, max_length=64)
    coef: float
    layers: list[int] | None = None
    op: Literal["add", "ablate", "clamp"] = "add"
    positions: Union[int, str] = "all"
    value: float = 0.0

    @field_validator("positions")
    @classmethod
    def _positions(cls, v: int | str) -> int | str:
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


class TextPart(BaseModel):
    """A text content part (``{"type": "text", "text": ...}``)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Unknown OpenAI fields are ignored; avec adds
    ``steering``. ``temperature`` absent or 0 decodes greedily; above 0 samples, reproducibly
    with ``seed``."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    steering: list[SteeringSpec] | None = None
