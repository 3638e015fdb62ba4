"""Export a CalMRL checkpoint for sentence-transformers: text embeddings through `SentenceTransformer`.

    from calmrl_hf.sharing.sentence_transformers import save_sentence_transformers
    save_sentence_transformers(model, processor, "ckpt")                  # or modality="subtitle"
    SentenceTransformer("ckpt", trust_remote_code=True).encode(["a dog barks"])
    # == model.get_text_features(**processor(text=["a dog barks"])).pooler_output

The folder holds the model's and processor's own files (`save_pretrained`, with their remote code) and, for
sentence-transformers, `modules.json` (one module, in the folder's root), `config_sentence_transformers.json`,
`calmrl_sentence_transformers.json` (the module's settings) and `sentence_transformers_calmrl.py` (the module, loaded
as remote code: `CalMRLSentenceEmbedder`). Loading needs torch, transformers and sentence-transformers, not calmrl_hf.
Writing the files needs neither sentence-transformers nor anything past the standard library here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# the module sentence-transformers loads, a model-side file: copied into the folder as remote code
MODULE_FILE = Path(__file__).resolve().parents[1] / "sentence_transformers_calmrl.py"
MODULE_CLASS = "CalMRLSentenceEmbedder"
CONFIG_FILE_NAME = "calmrl_sentence_transformers.json"


def save_sentence_transformers(model, processor, folder, modality: str = "text", normalize: bool = False,
                               similarity_fn_name: str = "cosine") -> None:
    """Save `model` and `processor` into `folder` (`save_pretrained`) with what `SentenceTransformer(folder,
    trust_remote_code=True)` needs to embed texts as modality `modality` (a text-kind one: "text", "subtitle").

    `encode` then returns `model.get_text_features(**processor(**{modality: texts}), modality=modality)
    .pooler_output` (the processor's tokenisation and `max_length`), unit-normalised if `normalize`
    (`model.get_modality_features`); `similarity_fn_name` is sentence-transformers' default similarity.
    """
    kinds = processor.modality_kinds
    if kinds.get(modality) != "text":
        text_kind = [name for name, kind in kinds.items() if kind == "text"]
        raise ValueError(f"sentence-transformers embeds texts: modality must be one of {text_kind}, got "
                         f"{modality!r}.")
    model.config.modality_index(modality)
    if processor.tokenizer is None:
        raise ValueError("The processor has no tokenizer: sentence-transformers needs one to embed texts.")
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    shutil.copyfile(MODULE_FILE, folder / MODULE_FILE.name)
    modules = [{"idx": 0, "name": "0", "path": "", "type": f"{MODULE_FILE.stem}.{MODULE_CLASS}"}]
    settings = {"modality": modality, "max_seq_length": processor.max_length, "normalize": bool(normalize)}
    model_config = {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
                    "similarity_fn_name": similarity_fn_name}
    for name, content in (("modules.json", modules), (CONFIG_FILE_NAME, settings),
                          ("config_sentence_transformers.json", model_config)):
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")


__all__ = ["save_sentence_transformers"]
