"""A sentence-transformers module over a CalMRL checkpoint: `SentenceTransformer(folder, trust_remote_code=True)`
embeds texts with one text-kind modality's tower and projection head (`CalMRLModel.get_text_features`).

`calmrl_hf.sharing.sentence_transformers.save_sentence_transformers` copies this file into the checkpoint, next to the
model's own files, and lists it in `modules.json`; sentence-transformers imports it from the folder (transformers'
dynamic modules), and it loads the model with `AutoModel.from_pretrained(folder, trust_remote_code=True)` and the
tokenizer with `AutoTokenizer`. Imports only the standard library, torch, transformers and sentence_transformers:
it runs where calmrl_hf is not installed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

try:  # sentence-transformers >= 5
    from sentence_transformers.base.modules import InputModule
except ImportError:  # pragma: no cover - older layouts
    from sentence_transformers.models import InputModule


CONFIG_FILE_NAME = "calmrl_sentence_transformers.json"
TEXT_FIELDS = ("input_ids", "attention_mask")  # what CalMRLProcessor passes a text tower


class CalMRLSentenceEmbedder(InputModule):
    """Texts -> `sentence_embedding` [n, D]: the `pooler_output` of `model.get_text_features(..., modality=...)`,
    tokenised as `CalMRLProcessor` does (padding, truncation to `max_seq_length`), unit-normalised when
    `normalize` (CalMRL's own embeddings are not; cosine similarity, sentence-transformers' default, is the same
    either way). `token_embeddings` are the text tower's token states."""

    config_file_name = CONFIG_FILE_NAME
    config_keys = ["modality", "max_seq_length", "normalize"]
    save_in_root = True

    def __init__(self, model, tokenizer, modality: str = "text", max_seq_length: int = 64,
                 normalize: bool = False) -> None:
        super().__init__()
        if modality not in model.config.modalities:
            raise ValueError(f"Unknown modality {modality!r}; this model's modalities are {model.config.modalities}.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.modality = modality
        self.max_seq_length = int(max_seq_length)
        self.normalize = bool(normalize)

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        texts = [prompt + text if prompt else text for text in inputs]
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if bad:
            raise TypeError(f"CalMRL's {self.modality!r} embedder takes strings; rows {bad[:5]} are not.")
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length,
                                 return_tensors="pt")
        return {key: encoded[key] for key in TEXT_FIELDS if key in encoded}

    def tokenize(self, texts, **kwargs) -> dict[str, torch.Tensor]:  # sentence-transformers < 5.2
        return self.preprocess(texts, **kwargs)

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        outputs = self.model.get_text_features(**{key: features[key] for key in TEXT_FIELDS if key in features},
                                               modality=self.modality)
        embeddings = outputs.pooler_output
        features["sentence_embedding"] = F.normalize(embeddings, dim=-1) if self.normalize else embeddings
        features["token_embeddings"] = outputs.last_hidden_state
        return features

    def get_embedding_dimension(self) -> int:
        return self.model.config.projection_dim

    def get_sentence_embedding_dimension(self) -> int:  # sentence-transformers < 6
        return self.get_embedding_dimension()

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             trust_remote_code: bool = False, model_kwargs: dict | None = None,
             processor_kwargs: dict | None = None, **kwargs) -> "CalMRLSentenceEmbedder":
        config = cls.load_config(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        hub = dict(subfolder=subfolder, token=token, cache_dir=cache_folder, revision=revision,
                   local_files_only=local_files_only)
        # The checkpoint's modeling code is remote code too (its config.json's auto_map)
        model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code,
                                          **hub, **(model_kwargs or {}))
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **hub, **(processor_kwargs or {}))
        return cls(model, tokenizer, **config)
