"""A multipart/form-data body read into its fields (the Files API's upload), with the standard library's MIME
parser: no extra dependency. Pure; a body that is not a well-formed form is a 400 naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

from herd.engine.errors import HerdError
from herd.platform.gateway.errors import invalid_request


@dataclass(frozen=True)
class FormField:
    value: bytes
    filename: str | None  # set for a file part


def parse_form(content_type: str | None, body: bytes) -> dict[str, FormField]:
    """The form's fields by name (the first of a repeated name)."""
    if not content_type or content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise invalid_request("the body must be multipart/form-data (fields file and purpose)")
    if "boundary=" not in content_type.lower() or "\r" in content_type or "\n" in content_type:
        raise invalid_request("the multipart/form-data Content-Type has no boundary")
    try:
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
        message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
        fields: dict[str, FormField] = {}
        if not isinstance(message, EmailMessage) or not message.is_multipart() or message.defects:
            raise invalid_request("the multipart/form-data body does not parse")
        for part in message.iter_parts():
            if part.defects:
                raise invalid_request("a part of the multipart/form-data body does not parse")
            name = part.get_param("name", header="content-disposition")
            if not isinstance(name, str) or name in fields:
                continue
            payload = part.get_payload(decode=True)
            value = payload if isinstance(payload, bytes) else b""
            fields[name] = FormField(value, part.get_filename())
        return fields
    except HerdError:
        raise
    except Exception as err:  # the parser's own refusals of a malformed body
        raise invalid_request(f"the multipart/form-data body does not parse: {type(err).__name__}") from None


__all__ = ["FormField", "parse_form"]
