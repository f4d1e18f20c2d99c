"""modelcar: pre-stage Hugging Face model snapshots as reproducible OCI images for vLLM."""

import logging

__version__ = "0.1.0"

# A library's logger gets no handler but this one: where modelcar's messages go is the
# application's to say (the command line sets up its own).
logging.getLogger("modelcar").addHandler(logging.NullHandler())
