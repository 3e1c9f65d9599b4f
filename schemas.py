"""The JSON bodies of the HTTP API, defined once (pydantic models).

The views build every JSON answer from these models (so an answer cannot drift from its description), and
openapi.py derives the document's schemas from them. Error codes and family ids come from their own single
sources (errors.py, the registry in captioners/). Nothing here imports Flask.

Why pydantic: it is already installed (spaCy depends on it), it validates in Rust on the hot path, and its JSON
Schema output becomes the OpenAPI components with a small conversion to the 3.0 dialect (openapi.py); apispec or
spectree would add a dependency to do the same.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

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
    revision: Optional[str]
    random_weights: bool = Field(description="The checkpoint has random weights (a demo or test one): its "
                                             "captions are noise.")
    cache: CacheState
    default_prompt: Optional[str]


class NotReady(Body):
    """Starting (model loading or warming up) or failed; device, dtype and revision appear once the model is
    being loaded."""

    status: Literal["starting", "failed"]
    model: ModelInfo
    device: Optional[str] = None
    dtype: Optional[str] = None
    revision: Optional[str] = None
    random_weights: Optional[bool] = None
    cache: CacheState
    default_prompt: Optional[str]


# The models /openapi.json describes (components/schemas), in the document's order.
DOCUMENTED = (ErrorBody, Error, FileError, CaptionResult, FileErrorResult, CaptionResponse, ModelInfo,
              ResetResponse, Health, CacheState, Ready, NotReady)
