"""A transformers pipeline for CalMRL checkpoints, registered with `PIPELINE_REGISTRY` under two tasks:

    classifier = pipeline("zero-shot-multimodal-classification", model=checkpoint, trust_remote_code=True)
    classifier(video, candidate_labels=["a dog", "a cat"])        # images, videos [T, H, W, C] or audio (1-D)
    embedder = pipeline("multimodal-feature-extraction", model=checkpoint, trust_remote_code=True)
    embedder({"text": "a dog barks", "audio": waveform})           # any subset of modalities

Every `CalMRLModel.save_pretrained` registers both tasks in the folder it writes (`pipeline_tasks`, the code copied
in: `save_pipeline_code`), so `pipeline(task, model=folder, trust_remote_code=True)` works on any saved model with
its processor, without the package; `save_pipelines(model, processor, folder)` saves both at once. Imports torch and transformers
only: this file is copied into checkpoints as remote code.
"""

from __future__ import annotations

import torch.nn.functional as F
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY


ZERO_SHOT_TASK = "zero-shot-multimodal-classification"
EMBEDDING_TASK = "multimodal-feature-extraction"
# the getter of each modality kind (CalMRLFeaturesMixin)
_FEATURE_GETTERS = {"vision": "get_image_features", "audio": "get_audio_features", "text": "get_text_features"}
# the parameters `pipeline(...)` and a call take, all of them `preprocess`'s
_PARAMETERS = ("candidate_labels", "hypothesis_template", "modality", "label_modality", "sampling_rate")


class CalMRLPipeline(Pipeline):
    """Zero-shot classification of an image, video or audio against text labels (`candidate_labels`), as
    transformers' `zero-shot-image-classification`: `[{"score", "label"}]` by descending score; or the embeddings of
    any subset of modalities (`multimodal-feature-extraction`): `model.encode` of one example."""

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def _sanitize_parameters(self, **parameters):
        """The parameters given, only: those of a call override those given to `pipeline(...)`, the others stay."""
        unknown = sorted(set(parameters) - set(_PARAMETERS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown parameters {unknown}; it takes {list(_PARAMETERS)}.")
        return parameters, {}, {}

    def _zero_shot(self, candidate_labels) -> bool:
        return self.task == ZERO_SHOT_TASK or (self.task != EMBEDDING_TASK and candidate_labels is not None)

    def preprocess(self, inputs, candidate_labels=None, hypothesis_template="{}", modality=None, label_modality="text",
                   sampling_rate=None):
        if not self._zero_shot(candidate_labels):
            if not isinstance(inputs, dict):
                raise ValueError(f"{EMBEDDING_TASK} takes one example as a dict {{modality: item}} (items of "
                                 f"{self.processor.modality_names}), got {type(inputs).__name__}.")
            batch = self.processor(**{name: [item] for name, item in inputs.items()}, sampling_rate=sampling_rate)
            return {"batch": batch}
        if not candidate_labels:
            raise ValueError(f"{ZERO_SHOT_TASK} needs candidate_labels (a list of text labels).")
        if modality is None:
            kind = _kind_of(inputs)
            modality = next((name for name, k in self.processor.modality_kinds.items() if k == kind), None)
            if modality is None:
                raise ValueError(f"The input looks like {kind} but the processor has no {kind}-kind modality "
                                 f"({self.processor.modality_kinds}); pass modality=.")
        prompts = [hypothesis_template.format(label) for label in candidate_labels]
        return {"item": self.processor(**{modality: [inputs]}, sampling_rate=sampling_rate), "modality": modality,
                "labels": self.processor(**{label_modality: prompts}), "label_modality": label_modality,
                "candidate_labels": list(candidate_labels)}

    def _forward(self, model_inputs):
        if "batch" in model_inputs:
            return {"encoding": self.model.encode(**model_inputs["batch"])}
        kinds = self.processor.modality_kinds
        modality, label_modality = model_inputs["modality"], model_inputs["label_modality"]
        item = getattr(self.model, _FEATURE_GETTERS[kinds[modality]])(**model_inputs["item"], modality=modality)
        labels = self.model.get_text_features(**model_inputs["labels"], modality=label_modality)
        # CLIP's logits_per_image: exp(logit_scale) x cosine similarity
        logits = self.model.clamped_logit_scale().exp() * F.normalize(item.pooler_output, dim=-1) @ \
            F.normalize(labels.pooler_output, dim=-1).T  # [1, num_labels]
        return {"logits": logits, "candidate_labels": model_inputs["candidate_labels"]}

    def postprocess(self, model_outputs):
        if "encoding" in model_outputs:
            encoding = model_outputs["encoding"]
            names = self.model.config.modalities
            observed = encoding.modality_mask[0].tolist()
            return {"embeddings": {m: encoding.embeddings[0, i] for i, m in enumerate(names) if observed[i]},
                    "imputed_embeddings": {m: encoding.imputed_embeddings[0, i] for i, m in enumerate(names)
                                           if encoding.imputed_mask[0, i]},
                    "imputation_variance": {m: float(encoding.imputation_variance[0, i]) for i, m in enumerate(names)
                                            if encoding.imputed_mask[0, i]},
                    "fused_embedding": encoding.fused_embeddings[0]}
        scores = model_outputs["logits"][0].float().softmax(dim=-1).tolist()
        ranked = sorted(zip(scores, model_outputs["candidate_labels"]), key=lambda pair: -pair[0])
        return [{"score": score, "label": label} for score, label in ranked]


def _kind_of(item) -> str:
    """A 1-D array (or list of numbers) is a waveform; anything else (PIL image, [H, W, C], [T, H, W, C], a list
    of frames) an image or a video."""
    if isinstance(item, (list, tuple)):
        return "audio" if all(isinstance(value, (int, float)) for value in item) else "vision"
    return "audio" if getattr(item, "ndim", 0) == 1 else "vision"


def register_pipelines() -> None:
    """Register both tasks with `PIPELINE_REGISTRY`. One class serves both: transformers keeps one registration
    per class, so both are recorded on it, and `save_pretrained` writes both into `config.custom_pipelines`."""
    for task in (ZERO_SHOT_TASK, EMBEDDING_TASK):
        if PIPELINE_REGISTRY.supported_tasks.get(task, {}).get("impl") is not CalMRLPipeline:  # once, quietly
            PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=CalMRLPipeline, pt_model=AutoModel)
    CalMRLPipeline._registered_impl = {task: PIPELINE_REGISTRY.supported_tasks[task]
                                       for task in (ZERO_SHOT_TASK, EMBEDDING_TASK)}


def pipeline_tasks() -> dict[str, dict]:
    """`config.custom_pipelines` of a saved CalMRL model: both tasks, served by this file's `CalMRLPipeline` (what
    `Pipeline.save_pretrained` writes for a registered pipeline)."""
    register_pipelines()
    tasks = {}
    for task, info in CalMRLPipeline._registered_impl.items():
        tasks[task] = {**info, "impl": f"{__name__.split('.')[-1]}.{CalMRLPipeline.__name__}",
                       "pt": tuple(model_class.__name__ for model_class in info["pt"])}
    return tasks


def save_pipeline_code(save_directory) -> None:
    """Copy this file (and what it imports relatively) into a model folder, for `trust_remote_code=True`."""
    from transformers.dynamic_module_utils import custom_object_save

    custom_object_save(CalMRLPipeline, save_directory)


def save_pipelines(model, processor, save_directory) -> None:
    """Save `model` and `processor` with the pipeline's code and both tasks, for `pipeline(task, model=folder,
    trust_remote_code=True)`."""
    register_pipelines()
    CalMRLPipeline(model=model, processor=processor, task=ZERO_SHOT_TASK).save_pretrained(save_directory)
    processor.save_pretrained(save_directory)


__all__ = ["EMBEDDING_TASK", "ZERO_SHOT_TASK", "CalMRLPipeline", "pipeline_tasks", "register_pipelines",
           "save_pipeline_code", "save_pipelines"]
