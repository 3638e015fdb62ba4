"""Evaluation: retrieval metrics, in-memory and FAISS indexes over embedded datasets, the recall of retrieval
re-ranked by the matching head. Nothing here is copied into checkpoints. (`faiss_index` needs the `faiss` extra:
import it by name.)"""

from .metrics import (RetrievalRecall, anchor_shift_report, imputation_error, recall_at_k, retrieval_metrics,
                      zero_shot_accuracy)
from .reranking import collect_matching_tokens, reranked_recall
from .retrieval import EmbeddingIndex


__all__ = ["EmbeddingIndex", "RetrievalRecall", "anchor_shift_report", "collect_matching_tokens", "imputation_error",
           "recall_at_k", "reranked_recall", "retrieval_metrics", "zero_shot_accuracy"]
