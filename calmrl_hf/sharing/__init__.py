"""Sharing: pushing models and runs to the Hub, their model card, and the sentence-transformers export.
Nothing here is copied into checkpoints."""

from .hub import HubPushError, UnsafeFileError, push_model, push_to_hub, write_model_card
from .sentence_transformers import save_sentence_transformers


__all__ = ["HubPushError", "UnsafeFileError", "push_model", "push_to_hub", "save_sentence_transformers",
           "write_model_card"]
