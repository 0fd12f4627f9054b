"""The inference server (README "Models and deployments"): a registered model version behind the Open Inference
Protocol, with dynamic batching.

Modules: model (an ONNX Runtime session of a version), batcher (dynamic batching), limits (what a request may
carry), app (the Starlette routes and metrics), server (`python -m worker serve`, alias following).
"""
