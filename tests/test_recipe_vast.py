"""recipes/configs/vast.yaml, the real configuration: its towers are real transformers model types, and the recipe
trains them. The Hub is never reached: the same model types are built from tiny random configs, saved as local
folders (a CLIP checkpoint for vision, AST for audio, BERT for text), and swapped in for the repo ids."""

import json
import math
from pathlib import Path

import pytest
import yaml
from transformers import (ASTConfig, ASTFeatureExtractor, ASTModel, BertConfig, BertModel, BertTokenizer,
                          CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel)

pytest.importorskip("sklearn", reason="the corpus draws scikit-learn's handwritten digits")

from calmrl_hf import CalMRLModel  # noqa: E402
from calmrl_hf.recipe import run as train_vast  # noqa: E402
from calmrl_hf.data.mini_vast import MiniVastSizes, generate_mini_vast  # noqa: E402
from calmrl_hf.data.mini_vast import number_to_words  # noqa: E402


VAST_YAML = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "vast.yaml"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "number", "a", "clip", "showing", "someone", "says",
         "it", "reads", *sorted({w for n in range(10, 100) for w in number_to_words(n).split("-")})]


def tiny_folders(root: Path) -> dict[str, Path]:
    """Local folders with the towers' model types and their own processors, random weights."""
    folders = {name: root / name for name in ("vision", "audio", "text")}
    clip = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=2),
                      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=16), projection_dim=16)
    CLIPModel(clip).save_pretrained(folders["vision"])
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folders["vision"])
    ast = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=16,
                    frequency_stride=16, time_stride=16, max_length=64, num_mel_bins=16)
    ASTModel(ast).save_pretrained(folders["audio"])
    ASTFeatureExtractor(num_mel_bins=16, max_length=64).save_pretrained(folders["audio"])
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folders["text"])
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folders["text"])
    return folders


def test_vast_yaml_names_real_towers_and_the_authors_settings():
    recipe = yaml.safe_load(VAST_YAML.read_text())
    assert recipe["model"]["towers"] == {"vision": "openai/clip-vit-base-patch16",
                                         "audio": "MIT/ast-finetuned-audioset-10-10-0.4593",
                                         "text": "bert-base-uncased"}
    config = recipe["model"]["config"]
    assert (config["pmrl_tau1"], config["pmrl_tau2"], config["projection_dim"], config["matching_weight"]) == (
        0.05, 0.1, 512, 0.1)
    for stage in ("stage1", "stage2"):
        assert recipe[stage]["learning_rate"] == 2e-5 and recipe[stage]["per_device_train_batch_size"] == 64
    assert recipe["stage1"]["max_steps"] > recipe["stage2"]["max_steps"] > 1000  # the paper's sizes, not a demo's


def test_vast_yaml_trains_two_steps_of_each_stage(tmp_path, capsys):
    folders = tiny_folders(tmp_path / "towers")
    paths = generate_mini_vast(tmp_path / "data", MiniVastSizes(stage1=8, video_text=8, audio_text=8, test=8))
    sets = {
        "model.towers.vision": folders["vision"], "model.towers.audio": folders["audio"],
        "model.towers.text": folders["text"],
        **{f"data.{name}": loader for name, loader in train_vast.mini_vast_data_section(paths).items()},
        "model.config.imputer_latent_dim": 4,  # q < the 8 rows the tiny warm start has
    }
    for stage in ("stage1", "stage2"):
        sets.update({f"{stage}.max_steps": 2, f"{stage}.per_device_train_batch_size": 4, f"{stage}.warmup_steps": 1,
                     f"{stage}.eval_steps": 1, f"{stage}.save_steps": 1, f"{stage}.per_device_eval_batch_size": 4})
    argv = ["--config", str(VAST_YAML), "--output_dir", str(tmp_path / "run")]
    for key, value in sets.items():
        value = {k: str(v) for k, v in value.items()} if isinstance(value, dict) else value
        value = str(value) if isinstance(value, Path) else value
        argv += ["--set", f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip()}"]
    results = train_vast.main(argv)
    assert set(results) == {"stage1", "stage2"} and "text->audio/class_R@1" in results["stage2"]
    model = CalMRLModel.from_pretrained(tmp_path / "run" / "stage2")
    assert {name: type(tower) for name, tower in model.encoders.items()} == {
        "vision": CLIPVisionModel, "audio": ASTModel, "text": BertModel}
    assert model.config.pmrl_tau1 == 0.05 and model.config.projection_dim == 512
    for stage in ("stage1", "stage2"):
        trained = json.loads((tmp_path / "run" / stage / "train_results.json").read_text())
        assert trained["global_step"] == 2 and math.isfinite(trained["final_loss"])
        assert json.loads((tmp_path / "run" / stage / "training_args.json").read_text())["mixed_precision"] == "bf16"
    assert "observed pairs" in capsys.readouterr().out
