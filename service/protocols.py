"""Message classes for the standard protocols the server also speaks (KServe v2 / Triton, TF Serving).

They come from `protocols.binpb`, a descriptor set that `proto/generate.py` compiles from `proto/compat/`,
loaded into a private descriptor pool: the packages and names are the published ones (`inference.*`,
`tensorflow.serving.*`), and registering them in the process-wide pool would clash with TensorFlow (the
SavedModel runtime) or tritonclient in the same process. Services are registered with
`grpc.method_handlers_generic_handler`, so no generated `_pb2_grpc` module is needed either.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DESCRIPTOR_SET = Path(__file__).with_name("protocols.binpb")


@cache
def pool() -> descriptor_pool.DescriptorPool:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    private = descriptor_pool.DescriptorPool()
    for file in files.file:  # --include_imports lists dependencies first
        private.Add(file)
    return private


@cache
def message(full_name: str) -> type:
    """The message class for e.g. "inference.ModelInferRequest" or "tensorflow.serving.PredictRequest"."""
    return message_factory.GetMessageClass(pool().FindMessageTypeByName(full_name))


def method_types(service: str, method: str) -> tuple[type, type]:
    """(request class, response class) of `service`'s `method`, as the .proto declares them."""
    desc = pool().FindServiceByName(service).FindMethodByName(method)
    return message(desc.input_type.full_name), message(desc.output_type.full_name)
