"""Serving stage: gRPC inference over a model repository; needs no TensorFlow unless asked."""
