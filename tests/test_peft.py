import torch
from transformers import BertModel

from calmrl_hf import CalMRLConfig, CalMRLModel

from tiny_models import MIXED_MASK, tiny_batch, tiny_bert, tiny_config

LORA = {"modalities": ["text"], "r": 4, "alpha": 8, "target_modules": ["query", "value"]}


def test_lora_on_a_pretrained_tower_starts_as_the_identity_and_trains_only_adapters(tmp_path):
    torch.manual_seed(0)
    tower = BertModel(tiny_bert()).eval()
    tower.save_pretrained(tmp_path / "bert")
    plain = CalMRLModel.from_encoders(text=str(tmp_path / "bert"), projection_dim=16, imputer_latent_dim=4).eval()
    adapted = CalMRLModel.from_encoders(text=str(tmp_path / "bert"), projection_dim=16, imputer_latent_dim=4,
                                        lora=LORA).eval()
    adapted.projections.load_state_dict(plain.projections.state_dict())
    ids = torch.randint(1, 64, (3, 6))
    torch.testing.assert_close(adapted.get_modality_features("text", input_ids=ids),
                               plain.get_modality_features("text", input_ids=ids))  # B = 0 at the start
    adapted.train()
    adapted(modality_mask=torch.ones(3, 2, dtype=torch.bool), text_input_ids=ids, subtitle_input_ids=ids,
            return_loss=True).loss.backward()
    with_grad = {n for n, p in adapted.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    text_tower = {n for n in with_grad if n.startswith("encoders.text.")}
    assert text_tower and all("lora_" in n for n in text_tower)
    assert {"projections.text.weight", "projections.subtitle.weight"} <= with_grad
    frozen = [n for n, p in adapted.named_parameters() if n.startswith("encoders.text.") and "lora_" not in n]
    assert frozen and not any(dict(adapted.named_parameters())[n].requires_grad for n in frozen)


def test_lora_adapters_save_and_load_with_the_model(tmp_path):
    torch.manual_seed(0)
    model = CalMRLModel(tiny_config(lora=LORA))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**tiny_batch(MIXED_MASK), return_loss=True).loss.backward()
    optimizer.step()  # adapters move away from their initialisation
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    model.save_pretrained(tmp_path)
    loaded = CalMRLModel.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**tiny_batch(MIXED_MASK)).embeddings, model(**tiny_batch(MIXED_MASK)).embeddings)
    assert not any(p.requires_grad for n, p in loaded.named_parameters()
                   if n.startswith("encoders.text.") and "lora_" not in n)


def test_training_updates_only_what_is_configured(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from training_fixtures import MIXED_PATTERNS, collate, make_dataset, training_config

    from calmrl_hf.training import CalMRLTrainingArguments, train

    torch.manual_seed(0)
    model = CalMRLModel(training_config(lora=LORA))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = CalMRLTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                                   learning_rate=1e-2, freeze_projections=["audio"], freeze_modalities=["vision"])
    train(model, make_dataset(32, MIXED_PATTERNS), args, collate_fn=collate)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any("lora_" in k for k in changed if k.startswith("encoders.text."))
    assert not any(k.startswith("encoders.text.") and "lora_" not in k for k in changed)  # frozen base weights
    assert not any(k.startswith("encoders.vision.") or k == "projections.audio.weight" for k in changed)
    assert {"projections.text.weight", "projections.vision.weight"} <= changed
    assert any(k.startswith("imputer.") for k in changed)  # closed-form M-steps, not gradients


def test_gradient_checkpointing_with_lora_needs_and_gets_input_require_grads():
    """LoRA on a frozen tower with (reentrant) gradient checkpointing: the checkpointed layers see no input that
    requires grad, so the adapters get none, unless `enable_input_require_grads` hooks the text tower's embeddings
    (`get_input_embeddings`); then the gradients are those of the model without checkpointing."""
    from transformers import BertConfig

    bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = CalMRLConfig(modalities=["text", "subtitle"], encoder_configs={"text": bert}, projection_dim=16,
                          imputer_latent_dim=4, lora=LORA)
    torch.manual_seed(0)
    ids = torch.randint(1, 64, (4, 6))
    batch = {"text_input_ids": ids, "subtitle_input_ids": ids.flip(0)}

    def adapter_grads(model):
        model.zero_grad()
        model(**batch, return_loss=True).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if "lora_A" in n}

    model = CalMRLModel(config).train()
    reference = adapter_grads(model)
    assert all(g is not None and g.abs().sum() > 0 for g in reference.values())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert all(g is None for g in adapter_grads(model).values())  # the failure the hook exists for
    model.enable_input_require_grads()
    for name, grad in adapter_grads(model).items():
        torch.testing.assert_close(grad, reference[name], msg=name)


def test_training_a_peft_wrapped_model_saves_adapter_and_the_trained_model(tmp_path):
    """`train(get_peft_model(model, LoraConfig(...)), ...)` ends with the adapter as peft saves it and the trained
    model whole (adapters merged, the imputer's fit included): both reload to the model that was trained."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from training_fixtures import MIXED_PATTERNS, collate, make_dataset, training_config

    from calmrl_hf.training import CalMRLTrainingArguments, train

    torch.manual_seed(0)
    peft_model = get_peft_model(CalMRLModel(training_config()), LoraConfig(r=4, target_modules=["query", "value"]))
    args = CalMRLTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8,
                                   learning_rate=1e-2, imputer_min_rows=8, seed=1)
    train(peft_model, make_dataset(32, MIXED_PATTERNS), args, collate_fn=collate)
    folder = tmp_path / "run"
    assert {"config.json", "model.safetensors", "README.md", "training_args.json"} <= {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (folder / "adapter").iterdir()}
    trained = peft_model.eval()
    merged = CalMRLModel.from_pretrained(folder).eval()
    torch.manual_seed(1)
    fresh = CalMRLModel(training_config())  # another initialisation: what is loaded must replace it
    adapter = PeftModel.from_pretrained(fresh, folder / "adapter").eval()
    from calmrl_hf.data.collator import model_inputs

    batch = model_inputs(collate(list(make_dataset(8, MIXED_PATTERNS))))
    with torch.no_grad():
        reference = trained(**batch).embeddings
        assert torch.allclose(merged(**batch).embeddings, reference, atol=1e-5)
    base = trained.get_base_model()
    assert torch.equal(merged.imputer.weight, base.imputer.weight) and bool(merged.imputer.fitted_modalities.all())
    lora = [n for n, _ in trained.named_parameters() if "lora_B" in n]
    assert lora and all(torch.equal(dict(adapter.named_parameters())[n], dict(trained.named_parameters())[n])
                        for n in lora)  # the adapter file holds the trained adapters
