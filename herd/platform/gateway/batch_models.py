"""The Files and Batch APIs' bodies (pydantic), as OpenAI's: what the door takes and answers, and its
OpenAPI document says."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from herd.platform.batch.store import aware
from herd.platform.tenancy.schema import BatchJob, StoredFile


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="Unix seconds")
    filename: str
    purpose: str = Field(description="batch (an upload) or batch_output (a batch's output or error file)")
    status: Literal["processed"] = "processed"
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64, description="a file uploaded with purpose batch")
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/responses"] = Field(
        description="what every line calls")
    completion_window: Literal["24h"] = Field(description="lines not done this long after create are expired")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="up to 16 pairs, kept with the batch")


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, str | int | None]] = Field(default_factory=list)


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


def _seconds(moment: datetime | None) -> int | None:
    return None if moment is None else int(aware(moment).timestamp())


def file_object(file: StoredFile) -> FileObject:
    return FileObject(id=file.id, bytes=file.bytes, created_at=_seconds(file.created_at) or 0, filename=file.filename,
                      purpose=file.purpose, expires_at=_seconds(file.expires_at))


def batch_object(job: BatchJob) -> BatchObject:
    times = {name: _seconds(getattr(job, name)) for name in (
        "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
        "cancelled_at")}
    return BatchObject(id=job.id, endpoint=job.endpoint, input_file_id=job.input_file_id,
                       completion_window=job.completion_window, status=job.status,
                       output_file_id=job.output_file_id, error_file_id=job.error_file_id,
                       created_at=_seconds(job.created_at) or 0, **times,
                       request_counts=RequestCounts(total=job.total, completed=job.completed, failed=job.failed),
                       metadata=job.metadata_, errors=BatchErrors(**job.errors) if job.errors else None)


__all__ = ["BatchCreateRequest", "BatchList", "BatchObject", "FileDeleted", "FileList", "FileObject",
           "batch_object", "file_object"]
