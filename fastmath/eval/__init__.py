"""The `fastmath sample` application: problems -> engine -> grading -> samples/summary/plots."""
from .run import evaluate

__all__ = ["evaluate"]
