"""The HTTP front-end: KServe v2 REST, TF Serving REST, a plain upload endpoint and a web page, on one port.

Each HTTP API is a thin adapter: it turns the HTTP request into the message its gRPC twin takes (KServe v2
`ModelInferRequest`, TF Serving `PredictRequest`, imgcls.v1 `PredictRequest`), calls that front-end's handler
(`kserve.py`, `tfserving.py`, `native.py`) inside the one request path (`core.py`), and writes the answer
back as JSON. So HTTP has the gRPC port's model resolution, limits, batching, deadlines, metrics, drain and hot
reload by construction, and the same probabilities. docs/http.md describes the API and the choices.
"""

from imgcls.service.http.app import HttpServer

__all__ = ["HttpServer"]
