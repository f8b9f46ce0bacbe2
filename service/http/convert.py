"""Protobuf answers as the JSON the HTTP APIs return, and the base64 both REST APIs carry images in.

Not `json_format.MessageToDict`: it writes 64-bit integers as strings ("count": "12"), and Triton's and TF
Serving's REST answers (read by perf_analyzer with rapidjson, and by tritonclient) carry them as numbers. Like
Triton's printer, every scalar and list field is written even when it holds its default, and an unset message
field is left out (perf_analyzer reads a present `sequence_batching` as a sequence model).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from imgcls.service.core import invalid


def to_json(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if (not field.is_repeated and (is_message or field.containing_oneof is not None)
                and not message.HasField(field.name)):
            continue
        value = getattr(message, field.name)
        if is_message and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): _scalar(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_scalar(field, v) for v in value]
        else:
            out[field.name] = _scalar(field, value)
    return out


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        found = field.enum_type.values_by_number.get(value)
        return found.name if found is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def b64decode(text: Any, what: str) -> bytes:
    """Strict base64 (standard or URL-safe alphabet), or 400 naming the element."""
    if not isinstance(text, str):
        raise invalid(f"{what} must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(f"{what} is not valid base64 ({exc})") from None
