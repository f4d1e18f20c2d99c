"""modelcar: pre-stage Hugging Face model snapshots as reproducible OCI images for vLLM."""

__version__ = "0.1.0"
