import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, BertModel

from calmrl_hf import CalMRLConfig, CalMRLModel
from calmrl_hf.alignment import (
    OBJECTIVES,
    anchor_infonce_loss,
    gram_loss,
    gram_singular_values,
    pairwise_infonce_loss,
    pmrl_loss,
    triangle_loss,
)
from calmrl_hf.towers import run_tower

from tiny_models import MIXED_MASK, tiny_batch, tiny_bert, tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fitted_model(**overrides) -> CalMRLModel:
    """A tiny model whose imputer has been fitted on its own embeddings of a full-modality batch."""
    model = CalMRLModel(tiny_config(**overrides)).eval()
    full = torch.ones(24, 4, dtype=torch.bool)
    with torch.no_grad():
        embeddings, mask = model.embed_modalities(**tiny_batch(full, seed=1))
    model.imputer.fit(embeddings, mask, max_iter=20)
    return model


def test_config_round_trip_and_validation(tmp_path):
    config = tiny_config(alignment_objective="gram", anchor_modality="vision")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CalMRLConfig)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.to_dict()) == strip(config.to_dict())
    assert loaded.get_encoder_config("subtitle").model_type == "bert"
    with pytest.raises(ValueError, match="unknown modalities"):
        tiny_config(pooling={"smell": "mean"})
    with pytest.raises(ValueError, match="imputer_method"):
        tiny_config(imputer_method="median")
    with pytest.raises(ValueError, match="no encoder"):
        CalMRLConfig(modalities=["text", "depth"], encoder_configs={"text": tiny_bert()}, projection_dim=16,
                     imputer_latent_dim=4)


def test_forward_backward_mixed_patterns():
    model = fitted_model().train()
    batch = tiny_batch(MIXED_MASK)
    out = model(**batch, return_loss=True)
    B, k, D = MIXED_MASK.shape[0], 4, 16
    assert out.embeddings.shape == (B, k, D)
    assert torch.equal(out.modality_mask, MIXED_MASK)
    # observed rows unit norm, missing rows zero; imputed rows unit norm (renormalised) everywhere
    norms = out.embeddings.norm(dim=-1)
    torch.testing.assert_close(norms[MIXED_MASK], torch.ones(int(MIXED_MASK.sum())))
    assert torch.all(norms[~MIXED_MASK] == 0)
    assert out.aligned_mask.all()
    torch.testing.assert_close(out.imputed_embeddings.norm(dim=-1), torch.ones(B, k))
    assert torch.equal(out.imputed_embeddings[MIXED_MASK], out.embeddings[MIXED_MASK])
    assert out.singular_values.shape == (B, k) and out.anchor_embeddings.shape == (B, D)
    # the loss is the configured objective on observed + imputed columns
    torch.testing.assert_close(out.loss, pmrl_loss(out.imputed_embeddings, tau1=0.5, tau2=0.5))
    out.loss.backward()
    for name in ("vision", "audio", "text"):
        grads = [p.grad for p in model.encoders[name].parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
    for name in model.config.modalities:
        assert model.projections[name].weight.grad.abs().sum() > 0, name
    assert all(buffer.grad is None for buffer in model.imputer.buffers())


def test_padding_does_not_change_text_embedding():
    model = CalMRLModel(tiny_config()).eval()
    ids = torch.randint(1, 64, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    a = model.get_modality_features("text", input_ids=ids, attention_mask=torch.ones_like(ids))
    b = model.get_modality_features("text", input_ids=padded, attention_mask=(padded > 0).long())
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_subtitle_shares_text_tower_with_own_projection():
    model = CalMRLModel(tiny_config()).eval()
    assert "subtitle" not in model.encoders and "subtitle" in model.projections
    ids = torch.randint(1, 64, (3, 6))
    text = model.get_modality_features("text", input_ids=ids)
    with torch.no_grad():
        model.projections["subtitle"].weight.copy_(model.projections["text"].weight)
    torch.testing.assert_close(model.get_modality_features("subtitle", input_ids=ids), text)


def test_embeddings_do_not_depend_on_which_rows_are_batched_together():
    model = CalMRLModel(tiny_config()).eval()
    batch = tiny_batch(MIXED_MASK)
    with torch.no_grad():
        together, _ = model.embed_modalities(**batch)
        text_rows = MIXED_MASK[:, 2].nonzero().flatten()
        alone = model.get_modality_features("text", input_ids=batch["text_input_ids"][:1],
                                            attention_mask=batch["text_attention_mask"][:1])
    torch.testing.assert_close(together[text_rows[0], 2], alone[0], atol=1e-5, rtol=1e-5)


def test_modality_absent_from_whole_batch_and_image_inputs():
    model = fitted_model()
    mask = torch.tensor([[True, False, True, False], [True, False, True, False]])
    out = model(**tiny_batch(mask, video=False), return_loss=True)
    assert out.aligned_mask.all()  # audio and subtitle, absent from the whole batch, are imputed for every row
    torch.testing.assert_close(out.imputed_embeddings.norm(dim=-1), torch.ones(2, 4))
    torch.testing.assert_close(out.loss, pmrl_loss(out.imputed_embeddings, tau1=model.config.pmrl_tau1, tau2=model.config.pmrl_tau2))


@pytest.mark.parametrize("method", ["none", "zero", "mean", "ppca"])
def test_imputation_methods(method):
    model = fitted_model(imputer_method=method)
    out = model(**tiny_batch(MIXED_MASK), return_loss=True)
    missing = ~MIXED_MASK
    if method == "none":
        assert torch.equal(out.aligned_mask, MIXED_MASK)
        assert torch.all(out.imputed_embeddings[missing] == 0)
        torch.testing.assert_close(out.loss, pmrl_loss(out.embeddings, MIXED_MASK, tau1=0.5, tau2=0.5))
    elif method == "zero":
        assert out.aligned_mask.all() and torch.all(out.imputed_embeddings[missing] == 0)
    elif method == "mean":
        expected = torch.nn.functional.normalize(model.imputer.mean, dim=-1).expand(6, 4, 16)
        torch.testing.assert_close(out.imputed_embeddings[missing], expected[missing])
    else:
        raw = model.imputer.impute(out.embeddings, MIXED_MASK)
        torch.testing.assert_close(out.imputed_embeddings[missing],
                                   torch.nn.functional.normalize(raw, dim=-1)[missing])


def test_imputation_without_the_anchor():
    """impute_from_anchor=False: the imputations the objective sees are the PPCA posterior means given the
    non-anchor observed modalities only (so they do not change with the anchor's inputs); rows observing only the
    anchor are not imputed; encode() still conditions on everything observed."""
    model = fitted_model(impute_from_anchor=False)
    batch = tiny_batch(MIXED_MASK)
    out = model(**batch, return_loss=True)
    anchor = model.config.modality_index("text")
    conditioning = MIXED_MASK.clone()
    conditioning[:, anchor] = False
    rows = conditioning.any(dim=1)
    raw = model.imputer.impute(out.embeddings[rows], conditioning[rows])
    missing = ~MIXED_MASK[rows]
    torch.testing.assert_close(out.imputed_embeddings[rows][missing],
                               torch.nn.functional.normalize(raw, dim=-1)[missing])
    assert torch.equal(out.aligned_mask[~rows], MIXED_MASK[~rows])  # the text-only row stays observed-only
    other = dict(batch, text_input_ids=torch.flip(batch["text_input_ids"], dims=[0]))
    moved = model(**other, return_loss=True)
    assert not torch.allclose(moved.embeddings[:, anchor], out.embeddings[:, anchor])
    torch.testing.assert_close(moved.imputed_embeddings[rows][missing], out.imputed_embeddings[rows][missing])
    encoded = model.encode(**batch)
    everything = model.imputer.impute(out.embeddings, MIXED_MASK)
    both = MIXED_MASK[:, anchor] & conditioning.any(dim=1) & ~MIXED_MASK.all(dim=1)
    assert not torch.allclose(encoded.imputed_embeddings[both][~MIXED_MASK[both]],
                              out.imputed_embeddings[both][~MIXED_MASK[both]])
    torch.testing.assert_close(encoded.imputed_embeddings[~MIXED_MASK],
                               torch.nn.functional.normalize(everything, dim=-1)[~MIXED_MASK])


def test_unfitted_imputer_falls_back_to_observed_only():
    model = CalMRLModel(tiny_config())
    out = model(**tiny_batch(MIXED_MASK), return_loss=True)
    assert torch.equal(out.aligned_mask, MIXED_MASK)


def test_gradients_through_imputation_are_configurable():
    def grad_of_text_projection(impute_with_grad):
        model = fitted_model(impute_with_grad=impute_with_grad)
        mask = torch.tensor([[False, False, True, False]] * 4)  # text only: everything else imputed
        model(**tiny_batch(mask), return_loss=True).loss.backward()
        return model.projections["text"].weight.grad

    with_grad, without_grad = grad_of_text_projection(True), grad_of_text_projection(False)
    assert not torch.allclose(with_grad, without_grad)


def test_objective_registry_reads_config_fields_and_is_what_the_config_accepts():
    fields = tiny_config().to_dict()
    for name, objective in OBJECTIVES.items():
        assert objective.config_keys and all(key in fields for key in objective.config_keys), name
        assert tiny_config(alignment_objective=name).alignment_objective == name
    with pytest.raises(ValueError, match=r"alignment_objective = 'clip'; expected one of \('pmrl', 'gram'"):
        tiny_config(alignment_objective="clip")


@pytest.mark.parametrize("objective", ["gram", "anchor_infonce", "pairwise_infonce"])
def test_contrastive_objectives_use_the_learnable_temperature(objective):
    model = fitted_model(alignment_objective=objective)
    out = model(**tiny_batch(MIXED_MASK), return_loss=True)
    assert out.aligned_mask.all()  # every missing column imputed: the objective sees complete instances
    text = model.config.modality_index("text")  # the default anchor
    expected = {
        "gram": lambda z, t: gram_loss(z, temperature=t, label_smoothing=0.1, anchor=text),
        "anchor_infonce": lambda z, t: anchor_infonce_loss(z, anchor=text, temperature=t),
        "pairwise_infonce": lambda z, t: pairwise_infonce_loss(z, temperature=t),
    }[objective]
    torch.testing.assert_close(out.loss, expected(out.imputed_embeddings, 0.07))
    hotter = expected(out.imputed_embeddings.detach(), 0.5)
    assert not torch.allclose(out.loss, hotter)  # the temperature is the model's, not a constant of the loss
    out.loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0


def test_triangle_objective_on_three_modalities():
    model = fitted_model(alignment_objective="triangle", triangle_modalities=["text", "vision", "audio"])
    out = model(**tiny_batch(MIXED_MASK), return_loss=True)
    text, vision, audio = (model.config.modality_index(m) for m in ("text", "vision", "audio"))
    expected = triangle_loss(out.imputed_embeddings, temperature=0.07, label_smoothing=0.1, anchor=text,
                             modalities=[text, vision, audio])
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.logit_scale.grad != 0


def test_save_load_round_trip_is_exact(tmp_path):
    model = fitted_model().eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CalMRLModel)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert loaded.imputer.fitted_modalities.all()
    batch = tiny_batch(MIXED_MASK)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, return_loss=True).loss, loaded(**batch, return_loss=True).loss,
                                   rtol=0, atol=0)


def test_bf16_loading_keeps_imputer_in_float32(tmp_path):
    model = fitted_model()
    model.save_pretrained(tmp_path)
    loaded = CalMRLModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.projections["text"].weight.dtype == torch.bfloat16
    for name, buffer in loaded.imputer.named_buffers():
        assert buffer.dtype == torch.float32, name
        assert torch.equal(buffer, dict(model.imputer.named_buffers())[name]), name
    with torch.no_grad():
        out = loaded(**{k: (v.bfloat16() if v.is_floating_point() else v) for k, v in tiny_batch(MIXED_MASK).items()},
                     return_loss=True)
    assert out.embeddings.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, pmrl_loss(out.imputed_embeddings, tau1=model.config.pmrl_tau1, tau2=model.config.pmrl_tau2))
    with torch.no_grad():
        reference = model(**tiny_batch(MIXED_MASK))  # the float32 model: bf16 rounding apart, the same embeddings
    torch.testing.assert_close(out.imputed_embeddings.float(), reference.imputed_embeddings, atol=0.05, rtol=0)


def test_from_encoders_uses_pretrained_tower(tmp_path):
    tower = BertModel(tiny_bert()).eval()
    tower.save_pretrained(tmp_path / "bert")
    model = CalMRLModel.from_encoders(text=str(tmp_path / "bert"), projection_dim=16, imputer_latent_dim=4)
    assert model.config.modalities == ["text", "subtitle"]
    for key, value in tower.state_dict().items():
        assert torch.equal(model.encoders["text"].state_dict()[key], value), key


def test_bad_inputs_raise_clear_errors():
    model = fitted_model()
    batch = tiny_batch(MIXED_MASK)
    with pytest.raises(ValueError, match=r"shape \[B, 4\]"):
        model(**{**batch, "modality_mask": MIXED_MASK[:, :3]})
    with pytest.raises(TypeError, match="bool"):
        model(**{**batch, "modality_mask": MIXED_MASK.long()})
    with pytest.raises(ValueError, match="Unknown input 'smell_values'"):
        model(**batch, smell_values=torch.zeros(2, 3))
    empty = MIXED_MASK.clone()
    empty[4] = False
    with pytest.raises(ValueError, match=r"Rows \[4\].*observe no modality"):
        model(**{**batch, "modality_mask": empty})
    nan_batch = dict(batch)
    nan_batch["audio_input_values"] = batch["audio_input_values"].clone()
    nan_batch["audio_input_values"][1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"audio_input_values contains NaN.*rows \[1\]"):
        model(**nan_batch)
    fewer = dict(batch)
    fewer["text_input_ids"] = batch["text_input_ids"][:-1]
    fewer["text_attention_mask"] = batch["text_attention_mask"][:-1]
    with pytest.raises(ValueError, match="marks 5 rows as observing 'text'"):
        model(**fewer)
    with pytest.raises(ValueError, match="Unknown modality 'smell'"):
        model.get_modality_features("smell", input_ids=batch["text_input_ids"])


def test_embeddings_given_to_the_steps_are_validated_where_they_enter():
    model = fitted_model().eval()
    out = model(**tiny_batch(MIXED_MASK), return_loss=True)
    embeddings, mask = out.embeddings.detach(), out.modality_mask
    for step in (model.impute_missing, model.alignment_loss, model.encode_embeddings):
        with pytest.raises(ValueError, match=r"embeddings must have shape \[B, 4, 16\], got \[6, 3, 16\]"):
            step(embeddings[:, :3], mask[:, :3])
        with pytest.raises(TypeError, match="must be a bool tensor"):
            step(embeddings, mask.long())
    bad = embeddings.clone()
    bad[1, 0, 3] = float("nan")  # row 1 observes vision
    for step in (model.impute_missing, model.encode_embeddings):
        with pytest.raises(ValueError, match=r"NaN or inf in an observed entry \(row 1, modality 0"):
            step(bad, mask)
    # the public steps are the forward pass's (which runs them unchecked on the batch validated at its door)
    imputed, aligned_mask = model.impute_missing(out.embeddings, mask)
    assert torch.equal(imputed, out.imputed_embeddings) and torch.equal(aligned_mask, out.aligned_mask)
    assert torch.equal(model.alignment_loss(imputed, aligned_mask), out.alignment_loss)


def test_non_finite_tower_outputs_are_an_error_in_every_entry_point():
    """Huge finite inputs overflow inside a tower: a clear error naming the modality, not NaN embeddings."""
    model = fitted_model().eval()
    batch = tiny_batch(MIXED_MASK)
    batch["audio_input_values"] = torch.full_like(batch["audio_input_values"], 3e38)
    entry_points = {
        "forward": lambda: model(**batch),
        "embed_modalities": lambda: model.embed_modalities(**batch),
        "encode": lambda: model.encode(**batch),
        "get_modality_features": lambda: model.get_modality_features("audio",
                                                                     input_values=batch["audio_input_values"]),
    }
    for name, call in entry_points.items():
        with pytest.raises(ValueError, match=r"The audio tower gave non-finite embeddings .* for 3 of its 3 rows"):
            call()


def test_mismatched_checkpoint_is_refused(tmp_path):
    fitted_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        CalMRLModel.from_pretrained(tmp_path, config=tiny_config(projection_dim=8))
    with pytest.raises(ValueError, match="does not match"):
        CalMRLModel.from_pretrained(tmp_path, config=tiny_config(modalities=["vision", "audio", "text"]))


def test_checkpoints_with_extra_or_missing_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    fitted_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "imputer.num_observed": torch.full((4,), 24.0)}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not match the model config \(unexpected_keys: \['imputer.num_obs"):
        CalMRLModel.from_pretrained(tmp_path)
    for key in ("imputer.modality_codes", "logit_scale"):  # every buffer and parameter is required
        save_file({k: v for k, v in tensors.items() if k != key}, weights, metadata={"format": "pt"})
        with pytest.raises(ValueError, match=rf"does not match the model config \(missing_keys: \['{key}'\]"):
            CalMRLModel.from_pretrained(tmp_path)


def test_unknown_config_keys_are_refused_and_warned_when_loaded(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"Unknown CalMRLConfig keys 'imputer_methd' \(did you mean 'imputer_method'"):
        tiny_config(imputer_methd="none")
    fitted_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "imputer_methd": "none"}))
    with caplog.at_level("WARNING", logger="calmrl_hf"):
        loaded = CalMRLModel.from_pretrained(tmp_path)
    assert "'imputer_methd' (did you mean 'imputer_method'?)" in caplog.text
    assert loaded.config.imputer_method == "ppca"


def test_a_reordered_config_is_refused(tmp_path):
    """The imputer's rows are positional: config.json listing the modalities in another order must not load."""
    model = fitted_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    saved_order = config["modalities"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "modalities": saved_order[::-1]}))
    with pytest.raises(ValueError, match=rf"fitted for the modalities in the order {saved_order}".replace("[", r"\[")):
        CalMRLModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert torch.equal(CalMRLModel.from_pretrained(tmp_path).imputer.weight, model.imputer.weight)


def test_feature_towers_over_precomputed_embeddings(tmp_path):
    from calmrl_hf import FeatureEncoderConfig

    config = CalMRLConfig(
        modalities=["image", "sound", "caption"],
        encoder_configs={"image": FeatureEncoderConfig(input_dim=12, hidden_size=24),
                         "sound": FeatureEncoderConfig(input_dim=7, hidden_size=24, num_hidden_layers=1),
                         "caption": tiny_bert()},
        projection_dim=16, imputer_latent_dim=4, alignment_objective="pairwise_infonce")
    model = CalMRLModel(config)
    mask = torch.tensor([[True, True, True], [True, False, True], [False, True, True], [True, True, False]])
    batch = {"modality_mask": mask, "image_input_features": torch.randn(3, 12),
             "sound_input_features": torch.randn(3, 5, 7), "sound_attention_mask": torch.ones(3, 5, dtype=torch.long),
             "caption_input_ids": torch.randint(1, 64, (3, 6))}
    out = model(**batch, return_loss=True)
    out.loss.backward()
    assert out.embeddings.shape == (4, 3, 16) and model.encoders["image"].layers[0].weight.grad is not None
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded.encoders["sound"]).__name__ == "FeatureEncoderModel"
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).embeddings, model.eval()(**batch).embeddings)
    with pytest.raises(ValueError, match=r"input_features must be \[n, 12\]"):
        model(**{**batch, "image_input_features": torch.randn(3, 11)})


def test_loading_refuses_pickles_and_tampered_files(tmp_path):
    model = fitted_model()
    model.save_pretrained(tmp_path / "good")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no safetensors weights \(only \['pytorch_model.bin'\]\)"):
        AutoModel.from_pretrained(pickled)
    with pytest.raises(ValueError, match="safetensors only"):
        CalMRLModel.from_pretrained(tmp_path / "good", use_safetensors=False)
    weights = tmp_path / "good" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt or truncated"):
        CalMRLModel.from_pretrained(tmp_path / "good")


def test_encode_any_subset_with_imputation_uncertainty_and_fusion():
    model = fitted_model()
    mask = torch.tensor([[False, False, True, False], [True, True, True, True], [False, True, False, False]])
    enc = model.encode(**tiny_batch(mask))
    assert torch.equal(enc.imputed_mask, ~mask)
    assert torch.all(enc.imputation_variance[mask] == 0) and torch.all(enc.imputation_variance[~mask] > 0)
    raw = model.imputer.imputation_variance(enc.embeddings, mask)
    torch.testing.assert_close(enc.imputation_variance, raw)
    torch.testing.assert_close(enc.fused_embeddings.norm(dim=-1), torch.ones(3))
    _, u = gram_singular_values(enc.imputed_embeddings)
    torch.testing.assert_close(enc.fused_embeddings, u)


@pytest.mark.parametrize("kind", ["resnet", "convnext"])
def test_convolutional_vision_tower(kind, tmp_path):
    """A ResNet / ConvNext tower (feature map [n, C, h, w]): mean pooling over the map's positions equals the
    tower's own global average pooler, tokens are the map's positions, and the model round-trips."""
    from transformers import ConvNextConfig, ResNetConfig

    tower = (ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 24], depths=[1, 1], layer_type="basic")
             if kind == "resnet" else ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 24], depths=[1, 1], patch_size=2))
    config = tiny_config(encoder_configs={"vision": tower, "audio": tiny_config().encoder_configs["audio"],
                                          "text": tiny_bert()}, pooling={"vision": "mean"})
    model = CalMRLModel(config).eval()
    assert model.projections["vision"].in_features == 24
    pixels = torch.randn(3, 3, 16, 16)
    pooled, tokens, token_mask, _ = run_tower(model.encoders["vision"], "mean", "vision", {"pixel_values": pixels})
    assert tokens.shape[0] == 3 and tokens.shape[2] == 24 and token_mask.all()
    if kind == "resnet":  # ResNet's pooler is the global average of its last feature map
        pooler, *_ = run_tower(model.encoders["vision"], "pooler", "vision", {"pixel_values": pixels})
        torch.testing.assert_close(pooler, pooled)
    mask = torch.tensor([[True, False, True, False]] * 3)
    out = model(modality_mask=mask, vision_pixel_values=pixels, text_input_ids=torch.randint(1, 60, (3, 5)),
                return_loss=True)
    assert out.embeddings.shape == (3, 4, 16) and torch.equal(out.aligned_mask, mask)  # unfitted: observed only
    torch.testing.assert_close(out.loss, pmrl_loss(out.embeddings, mask, tau1=model.config.pmrl_tau1, tau2=model.config.pmrl_tau2))
    model.save_pretrained(tmp_path)
    reloaded = CalMRLModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded.get_modality_features("vision", pixel_values=pixels),
                               model.get_modality_features("vision", pixel_values=pixels))


def test_temperature_is_a_logit_scale_of_shape_one(tmp_path):
    """FSDP refuses 0-dim parameters: the temperature is `logit_scale` [1] = log(1 / T), saved and loaded as such."""
    model = CalMRLModel(tiny_config(temperature=0.2))
    assert model.logit_scale.shape == (1,) and [p.dim() for p in model.parameters()].count(0) == 0
    torch.testing.assert_close(model.temperature, torch.tensor(0.2))
    with torch.no_grad():
        model.logit_scale.fill_(-math.log(0.3))  # as training leaves it
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(CalMRLModel.from_pretrained(tmp_path).temperature, torch.tensor(0.3))


def test_clip_names_in_and_out():
    """`input_ids` / `attention_mask` / `pixel_values` / `input_features` are the inputs of the first text-,
    vision- and audio-kind modality; with text and one other modality the output has CLIP's (CLAP's) logits and
    embeds, equal to the model's own per-pair names."""
    torch.manual_seed(0)
    model = CalMRLModel(tiny_config()).eval()
    batch = tiny_batch(torch.tensor([[True, False, True, False], [True, False, True, False]]))
    with torch.no_grad():
        named = model(vision_pixel_values=batch["vision_pixel_values"], text_input_ids=batch["text_input_ids"])
        clip = model(pixel_values=batch["vision_pixel_values"], input_ids=batch["text_input_ids"])
    assert torch.equal(clip.logits_per_text, named.logits_per_text_vision)
    assert torch.equal(clip.logits_per_image, named.logits_per_vision_text)
    assert clip.logits_per_image.shape == (2, 2) and torch.allclose(clip.logits_per_image, clip.logits_per_text.T)
    assert torch.equal(clip.text_embeds, named.embeddings[:, 2])
    assert torch.equal(clip.image_embeds, named.embeddings[:, 0])
    with torch.no_grad():  # CLAP: text and audio
        audio = tiny_batch(torch.tensor([[False, True, True, False]] * 2))
        clap = model(input_values=audio["audio_input_values"], input_ids=audio["text_input_ids"])
    assert clap.logits_per_audio.shape == (2, 2) and torch.allclose(clap.logits_per_audio, clap.logits_per_text.T)
    assert "logits_per_image" not in clap and clap.audio_embeds.shape == (2, 16)
    with torch.no_grad():  # three kinds: no single pair to call CLIP's
        three = model(**tiny_batch(torch.ones(2, 4, dtype=torch.bool)))
    assert "logits_per_text" not in three and {"text_embeds", "image_embeds", "audio_embeds"} <= set(three)
    with pytest.raises(ValueError, match=r"'text_input_ids' is given twice"):
        model(input_ids=batch["text_input_ids"], text_input_ids=batch["text_input_ids"])
