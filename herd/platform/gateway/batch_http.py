"""The Files and Batch APIs on the OpenAI HTTP door: thin routes over herd.platform.batch.service.Batches.

  POST   /v1/files                  multipart/form-data: file (JSONL), purpose "batch"
  GET    /v1/files                  the caller's files, newest first (purpose, limit, after)
  GET    /v1/files/{id}             one file's metadata
  GET    /v1/files/{id}/content     its bytes (an upload, or a batch's output or error file)
  DELETE /v1/files/{id}
  POST   /v1/batches                input_file_id, endpoint, completion_window "24h", metadata
  GET    /v1/batches                the caller's batches, newest first (limit, after)
  GET    /v1/batches/{id}
  POST   /v1/batches/{id}/cancel

Every one is the caller's tenant's only: another tenant's id is 404.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import Response

from herd.platform.batch.service import Batches, tenant_of
from herd.platform.gateway.batch_models import (
    BatchCreateRequest,
    BatchList,
    BatchObject,
    FileDeleted,
    FileList,
    FileObject,
    batch_object,
    file_object,
)
from herd.platform.gateway.errors import invalid_request
from herd.platform.gateway.multipart_form import parse_form
from herd.platform.gateway.openai_models import ErrorResponse

Id = Annotated[str, Path(max_length=64)]
Limit = Annotated[int, Query(ge=1, le=100, description="at most this many")]
After = Annotated[str | None, Query(max_length=64, description="the id the previous page ended with")]
_UPLOAD = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "JSONL, one request a line"},
                   "purpose": {"type": "string", "enum": ["batch"]}}}}}}}


def _errors(*pairs: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": text} for code, text in pairs}


_AUTH = ((401, "no key, or a bad one"), (429, "a limit reached"), (503, "unavailable"))
_READ = _errors(*_AUTH, (400, "invalid request"), (404, "no such file or batch (of this tenant)"))


def add_batch_routes(app: FastAPI, batches: Batches, identity: Callable[[Request], Any]) -> None:
    """The Files and Batch routes on `app`; `identity(request)` is the caller AuthenticateFirst found."""

    def tenant(request: Request) -> str:
        return tenant_of(identity(request))

    @app.post("/v1/files", response_model=FileObject, openapi_extra=_UPLOAD,
              responses=_errors(*_AUTH, (400, "invalid request"), (413, "file over the limit")))
    async def upload_file(request: Request) -> FileObject:
        """Upload a batch input file (JSONL; checked line by line when a batch is made of it)."""
        form = parse_form(request.headers.get("content-type"), await request.body())
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or upload.filename is None:
            raise invalid_request("file is missing (a file part named 'file')", param="file")
        if purpose is None:
            raise invalid_request("purpose is missing", param="purpose")
        stored = await batches.upload(tenant(request), filename=upload.filename,
                                      purpose=purpose.value.decode("utf-8", "replace"), data=upload.value)
        return file_object(stored)

    @app.get("/v1/files", response_model=FileList, responses=_READ)
    async def list_files(request: Request, purpose: Annotated[str | None, Query(max_length=32)] = None,
                         limit: Limit = 100, after: After = None) -> FileList:
        """The caller's files, newest first."""
        found = await batches.list_files(tenant(request), purpose=purpose, limit=limit + 1, after=after)
        data = [file_object(f) for f in found[:limit]]
        return FileList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                        has_more=len(found) > limit)

    @app.get("/v1/files/{file_id}", response_model=FileObject, responses=_READ)
    async def get_file(request: Request, file_id: Id) -> FileObject:
        return file_object(await batches.file(tenant(request), file_id))

    @app.get("/v1/files/{file_id}/content", response_class=Response, responses=_READ | {
        200: {"description": "the file's bytes", "content": {"application/octet-stream": {}}}})
    async def file_content(request: Request, file_id: Id) -> Response:
        """The file's bytes: for a batch's output or error file, one JSON line per request."""
        return Response(await batches.content(tenant(request), file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=_READ)
    async def delete_file(request: Request, file_id: Id) -> FileDeleted:
        deleted = await batches.delete_file(tenant(request), file_id)
        return FileDeleted(id=deleted.id, deleted=True)

    @app.post("/v1/batches", response_model=BatchObject, responses=_READ)
    async def create_batch(body: BatchCreateRequest, request: Request) -> BatchObject:
        """A batch of the input file's requests, checked whole now (a bad line is a 400 naming it), then run at
        batch priority; its output and error files appear when it completes."""
        job = await batches.create(tenant(request), input_file_id=body.input_file_id, endpoint=body.endpoint,
                                   completion_window=body.completion_window, metadata=body.metadata)
        return batch_object(job)

    @app.get("/v1/batches", response_model=BatchList, responses=_READ)
    async def list_batches(request: Request, limit: Limit = 20, after: After = None) -> BatchList:
        """The caller's batches, newest first."""
        found = await batches.list_batches(tenant(request), limit=limit + 1, after=after)
        data = [batch_object(b) for b in found[:limit]]
        return BatchList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                         has_more=len(found) > limit)

    @app.get("/v1/batches/{batch_id}", response_model=BatchObject, responses=_READ)
    async def get_batch(request: Request, batch_id: Id) -> BatchObject:
        return batch_object(await batches.batch(tenant(request), batch_id))

    @app.post("/v1/batches/{batch_id}/cancel", response_model=BatchObject, responses=_READ)
    async def cancel_batch(request: Request, batch_id: Id) -> BatchObject:
        """Cancelling: no new line starts; lines in flight finish, then the batch is cancelled (output files
        hold what finished)."""
        return batch_object(await batches.cancel(tenant(request), batch_id))


__all__ = ["add_batch_routes"]
