"""Evaluation of a run: the library's one embedding loop (`embed_dataset`) and retrieval recall on the embeddings
gathered from all processes (`evaluate`)."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from ..data.collator import model_inputs
from ..evaluation.metrics import RetrievalRecall
from .fsdp import is_sharded


@torch.no_grad()
def embed_dataset(model, dataloader, accelerator: Accelerator | None = None) -> dict[str, torch.Tensor]:
    """Embeddings [N, k, D], modality masks [N, k] (and labels, where every batch has them) of a whole dataset.

    `dataloader` is any iterable of collated batches; with an `accelerator` they are gathered from all processes
    (`gather_for_metrics`). The one embedding loop of the library: the training loop, the CLI and the benchmarks
    embed through it.
    """
    model.eval()
    gather = accelerator.gather_for_metrics if accelerator is not None else (lambda value: value)
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    chunks: dict[str, list[torch.Tensor]] = {"embeddings": [], "modality_mask": [], "labels": []}
    # a wrapped or sharded model (DDP, FSDP, DeepSpeed) embeds through its forward, which gathers the shards
    through_forward = unwrapped is not model or is_sharded(model)
    for batch in dataloader:
        labels = batch.get("labels")
        if through_forward:
            outputs = model(**model_inputs(batch))
            embeddings, mask = outputs.embeddings, outputs.modality_mask
        else:
            embeddings, mask = unwrapped.embed_modalities(**model_inputs(batch))
        gathered = gather((embeddings.float(), mask))
        chunks["embeddings"].append(gathered[0].cpu())
        chunks["modality_mask"].append(gathered[1].cpu())
        if isinstance(labels, torch.Tensor):
            chunks["labels"].append(gather(labels).cpu())
    data = {key: torch.cat(value) for key, value in chunks.items() if value}
    if "labels" in data and data["labels"].shape[0] != data["embeddings"].shape[0]:
        del data["labels"]  # some batches had none
    return data


def evaluate(model, dataloader, accelerator: Accelerator, pairs=None) -> dict[str, float]:
    """Retrieval Recall@1/5/10 in every direction (class level too when the data has labels), computed by the
    `RetrievalRecall` evaluate metric on the embeddings gathered from all processes."""
    data = embed_dataset(model, dataloader, accelerator)
    labels = data.get("labels")
    metric = RetrievalRecall(accelerator.unwrap_model(model).config.modalities, pairs=pairs,
                             config_name="instance" if labels is None else "class", keep_in_memory=True)
    inputs = {"embeddings": data["embeddings"].numpy(), "modality_mask": data["modality_mask"].numpy()}
    if labels is not None:
        inputs["labels"] = labels.numpy()
    metric.add_batch(**inputs)
    return metric.compute()


__all__ = ["embed_dataset", "evaluate"]
