"""The OpenAI request bodies r1kit accepts, and their translation into ``SamplingParams``.

Field names follow OpenAI's API plus vLLM's extras (``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``, ``stop_token_ids``, ``ignore_eos``) and r1kit's ``thinking_budget``. These models check
only the JSON's shape (types, unknown fields: a typo never passes silently); the values' ranges are
``SamplingParams``' to check, once, for the HTTP and the Python API alike (a ``response_format``'s schema
too: ``StructuredOutputs`` checks it, and its errors name ``response_format``). The OpenAPI document still
shows each range: the fields carry ``r1kit.infer.sampling.RANGES`` as schema keywords, which document
and do not validate. The sampling fields a checkpoint's ``generation_config.json`` may set default
to None: a request that leaves one out gets the server's default (the checkpoint's, else OpenAI's),
as in vLLM. Every text field is :data:`Text`: valid Unicode, or a 400 that names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from r1kit.generation_config import SAMPLING_FIELDS
from r1kit.errors import ConfigError
from r1kit.infer.sampling import MAX_TOKEN_IDS, RANGES, SamplingParams, StructuredOutputs, check_logit_bias_size


# the fields a checkpoint's generation_config.json may default; max_tokens is each endpoint's own affair
DEFAULTABLE = tuple(name for name in SAMPLING_FIELDS.values() if name != "max_tokens")


def _valid_unicode(text: str) -> str:
    """JSON's ``\\ud800`` escapes decode to lone surrogates: text no tokenizer takes, nor UTF-8 encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "invalid_unicode",
            "is not valid Unicode: a lone surrogate ({code}) at character {at}; send UTF-8 text, "
            "with surrogates only in escaped pairs such as \\ud83d\\ude00",
            {"code": f"U+{ord(text[exc.start]):04X}", "at": exc.start},
        ) from None
    return text


# every text field of a request: checked once here, whatever the field, before any tokenizer sees it
Text = Annotated[str, AfterValidator(_valid_unicode)]


def _prompt_kind(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    first = value[0] if isinstance(value, list) and value else None
    return "texts" if isinstance(first, str) else "batch" if isinstance(first, list) else "ids"


# A batch of prompts of up to a megabyte: validated as the one shape its first entry shows, and
# stopped at its first bad entry; a plain union validated every entry against every shape (four
# times the work, and an error per entry per shape: 340k errors for one bad 1 MiB body).
Prompt = Annotated[
    Annotated[Text, Tag("text")]
    | Annotated[list[Text], Field(fail_fast=True), Tag("texts")]
    | Annotated[list[int], Field(fail_fast=True), Tag("ids")]
    | Annotated[list[Annotated[list[int], Field(fail_fast=True)]], Field(fail_fast=True), Tag("batch")],
    Discriminator(_prompt_kind),
]


def _bounded_logit_bias(raw: Any) -> Any:
    # SamplingParams' bound, checked before pydantic checks each entry (an error per bad entry)
    if isinstance(raw, dict):
        try:
            check_logit_bias_size(raw)
        except ConfigError as exc:
            raise PydanticCustomError("too_long", "{message}", {"message": str(exc)}) from None
    return raw


LogitBias = Annotated[dict[Text, float], BeforeValidator(_bounded_logit_bias), Field(json_schema_extra={"maxProperties": MAX_TOKEN_IDS})]


def ranged(default: Any, name: str) -> Any:
    """A field whose OpenAPI schema shows the range ``SamplingParams`` checks for ``name``."""
    return Field(default, json_schema_extra=RANGES[name].json_schema())


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``. ``strict`` is accepted and changes nothing: the
    schema is always enforced."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Text = Field(max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


# OpenAI's response_format, told apart by its type (a bad one's error names only the matching shape)
ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


class StructuredOutputsField(BaseModel):
    """vLLM's ``structured_outputs`` extra field: exactly one of its members (``SamplingParams`` checks)."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | Text | None = Field(None, alias="json")
    json_object: bool = False
    regex: Text | None = None
    choice: Annotated[list[Text], Field(fail_fast=True)] | None = None
    grammar: Text | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # the request fields behind what SamplingParams and the engine call otherwise (an error's param)
    _request_names: ClassVar[dict[str, str]] = {}

    model: Text | None = None
    n: int = ranged(1, "n")
    temperature: float | None = ranged(None, "temperature")
    top_p: float | None = ranged(None, "top_p")
    top_k: int | None = ranged(None, "top_k")
    min_p: float | None = ranged(None, "min_p")
    presence_penalty: float = ranged(0.0, "presence_penalty")
    frequency_penalty: float = ranged(0.0, "frequency_penalty")
    repetition_penalty: float | None = ranged(None, "repetition_penalty")
    logit_bias: LogitBias | None = None
    stop: Text | Annotated[list[Text], Field(fail_fast=True)] | None = None
    stop_token_ids: Annotated[list[int], Field(fail_fast=True)] | None = None
    seed: int | None = ranged(None, "seed")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    min_tokens: int = ranged(0, "min_tokens")
    ignore_eos: bool = False
    thinking_budget: int | None = ranged(None, "thinking_budget")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None

    def structured(self) -> StructuredOutputs | None:
        """What the output must match: ``response_format`` (OpenAI's) or ``structured_outputs`` (vLLM's)."""
        fmt, extra = self.response_format, self.structured_outputs
        if fmt is not None and extra is not None and not isinstance(fmt, TextFormat):
            raise ConfigError("give either response_format or structured_outputs, not both", param="structured")
        if extra is not None:
            choice = tuple(extra.choice) if extra.choice is not None else None
            return StructuredOutputs(json=extra.json_, json_object=extra.json_object, regex=extra.regex, choice=choice, grammar=extra.grammar)
        if isinstance(fmt, JsonObjectFormat):
            return StructuredOutputs(json_object=True)
        if isinstance(fmt, JsonSchemaResponseFormat):
            return StructuredOutputs(json=fmt.json_schema.schema_)
        return None

    def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None, defaults: dict[str, Any]) -> SamplingParams:
        """The request's params; ``defaults`` (``SamplingParams`` names) fill the fields it leaves out.
        A bad value raises ``SamplingParams``' ``ConfigError``; :meth:`field` names its request field."""
        given = {name: getattr(self, name) for name in DEFAULTABLE if getattr(self, name) is not None}
        return SamplingParams(
            **{**{k: v for k, v in defaults.items() if k in DEFAULTABLE}, **given},
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias or None,
            stop=self.stop if self.stop is not None else (),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            thinking_budget=self.thinking_budget,
            structured=self.structured(),
        )

    def field(self, param: str | None) -> str | None:
        """The request field an error's ``param`` (a ``SamplingParams`` or engine name) is about."""
        if param == "structured":
            return "structured_outputs" if self.structured_outputs is not None else "response_format"
        return self._request_names.get(param, param)


class CompletionRequest(_Sampling):
    _request_names: ClassVar[dict[str, str]] = {"prompt_logprobs": "logprobs"}  # echo's prompt logprobs

    prompt: Prompt
    # None: the checkpoint's max_new_tokens, else OpenAI's 16; 0 (with echo): score the prompt only
    max_tokens: int | None = Field(None, json_schema_extra={"minimum": 0})
    logprobs: int | None = ranged(None, "logprobs")
    echo: bool = False
    suffix: Text | None = None  # fill-in-the-middle: the text after the hole (r1kit.fim)

    def prompts(self) -> list[str | list[int]]:
        """One prompt per entry: a string, a list of strings, token ids, or a list of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[ContentPart], Field(fail_fast=True)] | None = None
    name: Text | None = None
    reasoning_content: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    _request_names: ClassVar[dict[str, str]] = {"logprobs": "top_logprobs", "prompt": "messages"}

    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: int | None = ranged(None, "max_tokens")
    max_completion_tokens: int | None = ranged(None, "max_tokens")  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = ranged(None, "logprobs")
    add_generation_prompt: bool = True

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def field(self, param: str | None) -> str | None:
        if param == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return super().field(param)


class TokenizeRequest(BaseModel):
    """Exactly one of ``prompt`` (encoded as a completion's) and ``messages`` (rendered as a chat's);
    the OpenAPI document says so with ``oneOf``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})
    model: Text | SkipJsonSchema[None] = None
    prompt: Text | SkipJsonSchema[None] = None
    messages: Annotated[list[ChatMessage], Field(fail_fast=True)] | SkipJsonSchema[None] = None
    add_special_tokens: bool | None = None  # None: as the request would be encoded (vLLM: prompt yes, messages no)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("one_input", "give exactly one of prompt (text) or messages (a chat)")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Text | None = None
    tokens: list[int] = Field(fail_fast=True)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as chat templates take them; "developer" is OpenAI's newer name for the system role."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body; the OpenAPI document gives it for every error status."""

    error: ErrorDetail
