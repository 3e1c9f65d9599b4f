"""The JSON bodies of the HTTP API, defined once (pydantic models).

The views build every JSON answer from these models (so an answer cannot drift from its description), and
openapi.py derives the document's schemas from them. Error codes and family ids come from their own single
sources (errors.py, the registry in captioners/). Nothing here imports Flask.

Why pydantic: it is already installed (spaCy depends on it), it validates in Rust on the hot path, and its JSON
Schema output becomes the OpenAPI components with a small conversion to the 3.0 dialect (openapi.py); apispec or
spectree would add a dependency to do the same.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from captioners import FAMILIES
from errors import HttpError, description, error_classes

FamilyId = Literal[tuple(FAMILIES)]  # type: ignore[valid-type]
RequestErrorCode = Literal[tuple(c for c, cls in sorted(error_classes().items()) if "request" in cls.scope)]  # type: ignore[valid-type]
FileErrorCode = Literal[tuple(c for c, cls in sorted(error_classes().items()) if "file" in cls.scope)]  # type: ignore[valid-type]


def code_table(scope: str) -> str:
    """A Markdown list of the error codes of one scope ("request" or "file"), with status and meaning."""
    return "\n".join(f"- `{code}` ({'various' if cls is HttpError else cls.status_code}): {description(cls)}"
                     for code, cls in sorted(error_classes().items()) if scope in cls.scope)


class Body(BaseModel):
    """Every body: no field besides the documented ones."""

    model_config = ConfigDict(extra="forbid")


class Error(Body):
    """A stable code for programs and a message for people."""

    code: RequestErrorCode = Field(description=code_table("request"))
    message: str = Field(min_length=1, description="For a person; may change.")


class ErrorBody(Body):
    """Every error that is not about one file of a request."""

    error: Error


class FileError(Body):
    """Why one file of a request was not captioned."""

    code: FileErrorCode = Field(description=code_table("file"))
    message: str = Field(min_length=1, description="For a person; may change.")


class CaptionResult(Body):
    """One captioned file."""

    filename: str = Field(description="As uploaded (data only; may be empty).")
    caption: str
    tags: list[str] = Field(description="Lower case, multi-word tags joined with `_`, no duplicates.")
    cached: bool = Field(description="Whether the answer came from the cache.")


class FileErrorResult(Body):
    """One file that could not be captioned; the request's other files are still answered."""

    filename: str
    error: FileError


class ModelInfo(Body):
    """The loaded checkpoint."""

    family: FamilyId
    id: str = Field(description="Hugging Face id or local folder.")


class CaptionResponse(Body):
    """The answer to a caption request: one result per file, in upload order."""

    results: list[Union[CaptionResult, FileErrorResult]] = Field(min_length=1,
                                                                 description="One per uploaded file, in upload order.")
    model: ModelInfo


class ResetResponse(Body):
    """The cache was cleared."""

    message: str = Field(description="Which cache was cleared.")
    deleted: int = Field(ge=0)


class Health(Body):
    """The process answers."""

    status: Literal["ok"]


class CacheState(Body):
    """The cache backend and, for Redis, whether it answers now."""

    backend: Optional[Literal["redis", "memory", "off"]] = Field(
        description="null until the cache is opened during start-up.")
    redis_reachable: Optional[bool] = Field(description="A live PING; null unless the backend is redis.")


class Ready(Body):
    """Ready to caption."""

    status: Literal["ready"]
    model: ModelInfo
    device: str = Field(description="e.g. cpu, cuda:0, mps")
    dtype: str = Field(description="e.g. float32, float16, bfloat16")
    dtype_reason: Optional[str] = Field(description="Why this dtype: what `--dtype auto` chose and why (the CPU's "
                                                    "bfloat16 instructions, the GPU), or `--dtype X`.")
    revision: Optional[str]
    random_weights: bool = Field(description="The checkpoint has random weights (a demo or test one): its "
                                             "captions are noise.")
    cache: CacheState
    default_prompt: Optional[str]
    allocator: str = Field(description="The process's malloc: jemalloc (with the model thread keeping the memory it "
                                       "frees for the next batch) or the system's, and why (ALLOCATOR).")


class NotReady(Body):
    """Starting (model loading or warming up) or failed; device, dtype and revision appear once the model is
    being loaded."""

    status: Literal["starting", "failed"]
    model: ModelInfo
    device: Optional[str] = None
    dtype: Optional[str] = None
    dtype_reason: Optional[str] = None
    revision: Optional[str] = None
    random_weights: Optional[bool] = None
    cache: CacheState
    default_prompt: Optional[str]
    allocator: str


# ----- request bodies ----------------------------------------------------------------------------------------
class ImageItem(Body):
    """One image of a JSON caption request: its bytes in base64 (or a `data:` URI), or an http(s) URL to fetch."""

    data: Optional[StrictStr] = Field(None, description="The file's bytes in base64 (standard alphabet; line breaks "
                                                        "allowed), or a `data:image/...;base64,` URI.")
    url: Optional[StrictStr] = Field(None, description="An http(s) URL the server fetches (see IMAGE_URLS and "
                                                       "IMAGE_URL_ALLOWED_HOSTS); not both `data` and `url`.")
    filename: Optional[StrictStr] = Field(None, max_length=1024,
                                          description="Echoed back as data only (default: empty, or the URL's last "
                                                      "path segment).")

    @model_validator(mode="after")
    def _one_source(self) -> "ImageItem":
        if (self.data is None) == (self.url is None):
            raise ValueError("each image needs exactly one of 'data' (base64) and 'url'")
        return self


class Options(Body):
    """Per-request generation options (part of the cache key; only requests with equal options share a batch)."""

    prompt: Optional[StrictStr] = Field(None, description="Overrides the server's default prompt; empty means the "
                                                          "default.")
    max_new_tokens: Optional[StrictInt] = Field(None, description="Longest caption in new tokens, 1 to the server's "
                                                                  "MAX_NEW_TOKENS (the default).")
    num_beams: Optional[StrictInt] = Field(None, description="Beam search width, 1 (greedy, the default) to the "
                                                             "server's MAX_NUM_BEAMS.")


class CaptionRequest(Options):
    """The JSON form of a caption request (`Content-Type: application/json`)."""

    images: list[ImageItem] = Field(min_length=1, description="One result per item, in this order.")


# ----- the OpenAI-compatible API (/v1) --------------------------------------------------------------------------
class OpenAIBody(BaseModel):
    """OpenAI request bodies: fields this server does not use are ignored, as OpenAI-compatible servers do
    (clients send many); the ones that would change the answer are checked."""

    model_config = ConfigDict(extra="allow")


class ImageUrl(OpenAIBody):
    url: StrictStr = Field(description="A `data:image/...;base64,` URI or an http(s) URL.")
    detail: Optional[StrictStr] = Field(None, description="Ignored.")


class ContentPart(OpenAIBody):
    """A part of a message's content: text, or one image."""

    type: Literal["text", "image_url"]
    text: Optional[StrictStr] = None
    image_url: Optional[ImageUrl] = None

    @model_validator(mode="after")
    def _filled(self) -> "ContentPart":
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs 'image_url'")
        return self


class ChatMessage(OpenAIBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[ContentPart], None] = None


class StreamOptions(OpenAIBody):
    include_usage: Optional[StrictBool] = None


class ChatCompletionRequest(OpenAIBody):
    """POST /v1/chat/completions: one user message holding one image (and optionally the prompt text); an
    optional system message (the chat families' system turn)."""

    model: Optional[StrictStr] = Field(None, description="Any value: the loaded checkpoint answers.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, description="As max_new_tokens (1 to MAX_NEW_TOKENS).")
    max_completion_tokens: Optional[StrictInt] = Field(None, description="The same; wins over max_tokens.")
    n: Optional[StrictInt] = Field(None, description="1 only.")
    temperature: Optional[StrictFloat] = Field(None, description="0 or absent: decoding is greedy.")
    stream: Optional[StrictBool] = Field(None, description="Answer as server-sent events ending `data: [DONE]`.")
    stream_options: Optional[StreamOptions] = None


class AssistantMessage(Body):
    role: Literal["assistant"]
    content: str = Field(description="The caption.")
    refusal: None = None


class Choice(Body):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = Field(description="length: the model ran into max_tokens; stop: it "
                                                                 "ended the text itself.")
    logprobs: None = None


class Usage(Body):
    prompt_tokens: int = Field(description="Input tokens: the prompt with its template and image tokens.")
    completion_tokens: int = Field(description="Tokens the model generated (its end-of-text token included).")
    total_tokens: int


class ChatCompletion(Body):
    """The answer of /v1/chat/completions; `tags` and `cached` are this server's extra fields."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice] = Field(min_length=1, max_length=1)
    usage: Usage
    tags: list[str] = Field(description="Search tags of the caption, as /caption-images gives them.")
    cached: bool
    system_fingerprint: Optional[str] = None


class ModelCard(Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Body):
    """GET /v1/models: the one loaded checkpoint."""

    object: Literal["list"]
    data: list[ModelCard]


class OpenAIError(Body):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error or server_error.")
    code: Optional[str] = Field(description="This server's error code (errors.py).")
    param: Optional[str] = None


class OpenAIErrorBody(Body):
    """Every error on /v1/*, in OpenAI's shape (so that OpenAI SDKs raise the matching exception)."""

    error: OpenAIError


def field_error(exc: Any) -> str:
    """A pydantic ValidationError in one line: where (`images[0].data`) and what."""
    parts = []
    for error in exc.errors()[:3]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
        parts.append(f"{where or 'body'}: {error['msg']}")
    return "; ".join(parts)


# The models /openapi.json describes (components/schemas), in the document's order.
DOCUMENTED = (ErrorBody, Error, FileError, CaptionResult, FileErrorResult, CaptionResponse, ModelInfo,
              ResetResponse, Health, CacheState, Ready, NotReady, ImageItem, CaptionRequest, ImageUrl, ContentPart,
              ChatMessage, StreamOptions, ChatCompletionRequest, AssistantMessage, Choice, Usage, ChatCompletion,
              ModelCard, ModelList, OpenAIError, OpenAIErrorBody)
