"""CLIP-style entry points: get_text/image/audio_features, forward's return_loss / logits_per_<a>_<b> / logit_scale,
tower output flags and tuples."""

import pytest
import torch
import torch.nn.functional as F
from transformers import BertTokenizer, ViTImageProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from calmrl_hf import CalMRLModel, CalMRLProcessor
from calmrl_hf.alignment import pmrl_loss
from calmrl_hf.towers import masked_mean

from tiny_models import IMAGE_SIZE, MIXED_MASK, tiny_batch, tiny_config

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "barks", "cat", "42"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CalMRLModel(tiny_config(attn_implementation="eager")).eval()


def tokenizer():
    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def test_text_features_are_the_projected_pooled_tower_output(model):
    inputs = tokenizer()(["a dog barks", "a cat"], padding=True, return_tensors="pt")
    assert set(inputs) == {"input_ids", "token_type_ids", "attention_mask"}  # the tokenizer's own keys
    with torch.no_grad():
        out = model.get_text_features(**inputs)
        tower = model.encoders["text"](**inputs).last_hidden_state
    assert isinstance(out, BaseModelOutputWithPooling)
    expected = model.projections["text"](masked_mean(tower, inputs["attention_mask"]))  # mean pooling, then head
    torch.testing.assert_close(out.pooler_output, expected)
    torch.testing.assert_close(out.last_hidden_state, tower)
    assert torch.equal(out.token_mask, inputs["attention_mask"].bool())
    # normalised, the same embeddings as embed_modalities' (and get_modality_features')
    with torch.no_grad():
        embeddings, _ = model.embed_modalities(text_input_ids=inputs["input_ids"],
                                               text_attention_mask=inputs["attention_mask"],
                                               text_token_type_ids=inputs["token_type_ids"])
        legacy = model.get_modality_features("text", **inputs)
    torch.testing.assert_close(F.normalize(out.pooler_output, dim=-1), embeddings[:, 2])
    torch.testing.assert_close(legacy, embeddings[:, 2])


def test_getters_take_the_processors_batch(model):
    processor = CalMRLProcessor(tokenizer(), ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                num_frames=2)
    model = model
    videos = [torch.randint(0, 256, (3, 20, 20, 3), dtype=torch.uint8).numpy() for _ in range(2)]
    batch = processor(text=["a dog", None, "a cat"], vision=[videos[0], videos[1], None], subtitle=["42", "42", None])
    with torch.no_grad():
        text = model.get_text_features(**batch).pooler_output
        plain = model.get_text_features(input_ids=batch["text_input_ids"],
                                         attention_mask=batch["text_attention_mask"]).pooler_output
        subtitle = model.get_text_features(**batch, modality="subtitle").pooler_output
        video = model.get_image_features(**batch).pooler_output
    assert text.shape == (2, 16) and video.shape == (2, 16)  # the observed rows of each modality
    torch.testing.assert_close(text, plain)
    with torch.no_grad():  # subtitle: the shared text tower, its own projection head
        pooled = masked_mean(model.encoders["text"](input_ids=batch["subtitle_input_ids"],
                                                     attention_mask=batch["subtitle_attention_mask"]).last_hidden_state,
                             batch["subtitle_attention_mask"])
    torch.testing.assert_close(subtitle, model.projections["subtitle"](pooled))
    wrong_mask = batch["modality_mask"].clone()
    wrong_mask[1, 2] = True
    with pytest.raises(ValueError, match="marks 3 rows as observing 'text' but its inputs have 2"):
        model.get_text_features(**{**batch, "modality_mask": wrong_mask})


def test_a_video_is_the_mean_of_its_frames(model):
    frames = torch.randn(3, 2, 3, IMAGE_SIZE, IMAGE_SIZE)  # [n, T, C, H, W]
    with torch.no_grad():
        video = model.get_image_features(pixel_values=frames)
        per_frame = model.get_image_features(pixel_values=frames.flatten(0, 1)).pooler_output  # [n * T, D]
    # cls pooling per frame, averaged over frames, then the (linear) head = the mean of the frames' features
    torch.testing.assert_close(video.pooler_output, per_frame.unflatten(0, (3, 2)).mean(dim=1))
    assert video.last_hidden_state.shape == (3, 2 * 5, 32)  # the frames' tokens one after the other


def test_audio_features(model):
    values = torch.randn(2, 32, 16)
    with torch.no_grad():
        out = model.get_audio_features(input_values=values)
        tower = model.encoders["audio"](input_values=values).last_hidden_state
        prefixed = model.get_audio_features(audio_input_values=values).pooler_output
    torch.testing.assert_close(out.pooler_output, model.projections["audio"](tower.mean(dim=1)))
    torch.testing.assert_close(prefixed, out.pooler_output)


def test_misspelt_or_doubled_inputs_are_errors_not_ignored(model):
    ids = torch.randint(1, 64, (2, 5))
    with pytest.raises(ValueError, match=r"Unknown input 'attention_msk' for modality 'text'"):
        model.get_text_features(input_ids=ids, attention_msk=torch.ones_like(ids))
    with pytest.raises(ValueError, match=r"Unknown input 'text_attention_msk'"):
        model.get_text_features(text_input_ids=ids, text_attention_msk=torch.ones_like(ids))
    with pytest.raises(ValueError, match="given twice"):
        model.get_text_features(input_ids=ids, text_input_ids=ids)
    with pytest.raises(ValueError, match="No inputs given for modality 'vision'"):
        model.get_image_features(text_input_ids=ids)
    with pytest.raises(ValueError, match="Unknown modality 'smell'"):
        model.get_text_features(input_ids=ids, modality="smell")


def test_hidden_states_attentions_and_tuples_come_from_the_towers(model):
    ids = torch.randint(1, 64, (2, 5))
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids, output_hidden_states=True, output_attentions=True)
        reference = model.encoders["text"](input_ids=ids, output_hidden_states=True, output_attentions=True)
        as_tuple = model.get_text_features(input_ids=ids, return_dict=False)
    assert len(out.hidden_states) == 2 and len(out.attentions) == 1  # embeddings + 1 layer; 1 layer (eager)
    for ours, theirs in zip(out.hidden_states + out.attentions, reference.hidden_states + reference.attentions):
        torch.testing.assert_close(ours, theirs)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)
    torch.testing.assert_close(as_tuple[1], out.pooler_output)
    with torch.no_grad():
        forward = model(**tiny_batch(MIXED_MASK), output_hidden_states=True)
    assert len(forward.text_model_output.hidden_states) == 2
    assert forward.vision_model_output.hidden_states[-1].shape == (4, 2 * 5, 32)  # video frames' tokens


def test_forward_computes_a_loss_only_when_asked(model):
    batch = tiny_batch(MIXED_MASK)
    with torch.no_grad():
        out = model(**batch)
        with_loss = model(**batch, return_loss=True)
    assert out.loss is None and out.alignment_loss is None
    torch.testing.assert_close(with_loss.loss, pmrl_loss(with_loss.imputed_embeddings, MIXED_MASK, tau1=0.5, tau2=0.5))
    torch.testing.assert_close(out.embeddings, with_loss.embeddings)


def test_logits_per_pair_of_observed_modalities(model):
    mask = MIXED_MASK.clone()
    mask[:, 1] = False  # no audio anywhere in the batch
    mask[4, 0] = True
    batch = tiny_batch(mask)
    with torch.no_grad():
        out = model(**batch)
    observed = ["vision", "text", "subtitle"]
    # every ordered pair, and CLIP's names: text (the first text-kind modality) and the one other kind, vision
    assert {k for k in out.keys() if k.startswith("logits_per_")} == {
        f"logits_per_{a}_{b}" for a in observed for b in observed if a != b} | {"logits_per_text", "logits_per_image"}
    assert out.logits_per_text is out.logits_per_text_vision and out.logits_per_image is out.logits_per_vision_text
    torch.testing.assert_close(out.logit_scale, -torch.log(model.temperature))
    text = F.normalize(model.get_text_features(input_ids=batch["text_input_ids"],
                                               attention_mask=batch["text_attention_mask"]).pooler_output, dim=-1)
    video = F.normalize(model.get_image_features(pixel_values=batch["vision_pixel_values"]).pooler_output, dim=-1)
    expected = text @ video.T / model.temperature  # CLIP: exp(logit_scale) * cosine, [n_text, n_vision]
    torch.testing.assert_close(out.logits_per_text_vision, expected.detach())
    torch.testing.assert_close(out.logits_per_vision_text, out.logits_per_text_vision.T)
    as_tuple = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(out)


def test_the_output_survives_the_pytree_round_trip_ddp_makes(model):
    from torch.utils._pytree import tree_flatten, tree_unflatten

    with torch.no_grad():
        out = model(**tiny_batch(MIXED_MASK), return_loss=True)
    rebuilt = tree_unflatten(*tree_flatten(out))
    assert type(rebuilt) is type(out) and list(rebuilt.keys()) == list(out.keys())
    torch.testing.assert_close(rebuilt.logits_per_text_vision, out.logits_per_text_vision)
    torch.testing.assert_close(rebuilt.loss, out.loss)
    assert list(type(out)(dict(out)).keys()) == list(out.keys())  # as accelerate's fp32 output conversion rebuilds it
