"""Generated gRPC code for the imgcls.v1 API (regenerate with `python proto/generate.py`)."""
