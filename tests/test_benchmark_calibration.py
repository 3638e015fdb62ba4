"""The calibration benchmarks' diagnostics and controls: true-missing imputations, agreement cosines, paired tests."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.methods import ALL_METHODS, COMPARISONS, METHODS, TUNED_METHODS, hyperparameters_of  # noqa: E402
from benchmarks.metrics import agreement_metrics  # noqa: E402
from benchmarks.report import paired_comparisons  # noqa: E402
from benchmarks.synthetic.run import MODALITIES, PATTERNS, QUICK, World, build_model, collate  # noqa: E402
from benchmarks.true_imputations import TrueImputations, WithTruth, collate_with_truth  # noqa: E402


VISION_TEXT = (True, False, True, False)


def fitted_model_and_batch():
    """A benchmark model whose imputer is fitted on full-modality embeddings, and a stage-2 batch with its truth."""
    torch.manual_seed(0)
    world = World(QUICK, seed=0)
    model = build_model(QUICK)
    full = world.sample(64, (True,) * 4)
    embeddings, mask = model.embed_modalities(**collate(list(full)))
    model.imputer.fit(embeddings.detach(), mask, max_iter=20)
    partial = full.map(lambda row: {**{m: row[m] if seen else None for m, seen in zip(MODALITIES, VISION_TEXT)},
                                    "modality_mask": list(VISION_TEXT)})
    loader = torch.utils.data.DataLoader(WithTruth(partial, full), batch_size=16,
                                         collate_fn=collate_with_truth(collate))
    return model, full, next(iter(loader))


def test_true_imputations_are_the_models_own_embeddings_of_the_hidden_inputs_and_leave_its_mode_alone():
    model, full, batch = fitted_model_and_batch()
    model.train()
    imputations, rest = TrueImputations("exact", num_rows=64, seed=0)(model, batch)
    assert "true_inputs" not in rest and "rows" not in rest and rest["modality_mask"].shape == (16, 4)
    model.eval()
    reference, _ = model.embed_modalities(**collate(list(full.select(range(16)))))
    assert torch.allclose(imputations, reference, atol=1e-6)
    assert not imputations.requires_grad
    model.train()
    TrueImputations("exact", num_rows=64, seed=0)(model, batch)
    assert all(module.training for module in model.modules())  # every module's mode restored


def test_noisy_true_imputations_have_the_ppca_cosine_exactly_and_a_fixed_error_per_row():
    model, full, batch = fitted_model_and_batch()
    noisy = TrueImputations("noisy", num_rows=64, seed=0)
    imputations, _ = noisy(model, batch)
    exact, _ = TrueImputations("exact", num_rows=64, seed=0)(model, batch)
    # c is the PPCA imputer's cosine to the truth on the missing vision / audio slots of the batch
    observed = batch["modality_mask"]
    imputed = F.normalize(model.imputer.impute(exact, observed), dim=-1)
    audio = MODALITIES.index("audio")
    assert abs(noisy.cosine - float(F.cosine_similarity(imputed[:, audio], exact[:, audio], dim=-1).mean())) < 1e-5
    cosines = F.cosine_similarity(imputations, exact, dim=-1)
    assert torch.allclose(cosines, torch.full_like(cosines, noisy.cosine), atol=1e-5)
    assert torch.allclose(imputations.norm(dim=-1), torch.ones(16, 4), atol=1e-5)
    again, _ = noisy(model, batch)
    assert torch.equal(again, imputations)  # the same rows get the same error every time
    shuffled = {**batch, "rows": batch["rows"].roll(1)}
    moved, _ = noisy(model, shuffled)
    assert not torch.allclose(moved, imputations)  # and other rows another one


def test_agreement_cosines_equal_a_direct_computation():
    model, full, _ = fitted_model_and_batch()
    truth, _ = model.embed_modalities(**collate(list(full)))
    truth = truth.detach()
    result = agreement_metrics(model, truth, PATTERNS)
    vision, audio = MODALITIES.index("vision"), MODALITIES.index("audio")
    own, true = [], []
    for flags, (seen, hidden) in ((PATTERNS["vision-text"], (vision, audio)), (PATTERNS["audio-text"], (audio, vision))):
        observed = torch.tensor(flags).expand(len(truth), 4)
        imputed = model.imputer.impute(truth, observed)
        own.append(F.cosine_similarity(truth[:, seen], imputed[:, hidden], dim=-1).mean())
        true.append(F.cosine_similarity(truth[:, seen], truth[:, hidden], dim=-1).mean())
    assert abs(result["own_imputation_cosine"] - float(sum(own) / 2)) < 1e-6
    assert abs(result["true_missing_cosine"] - float(sum(true) / 2)) < 1e-6


def test_paired_comparisons_are_the_paired_t_test_of_the_seed_differences():
    per_seed = [{"A": {"m": a}, "B": {"m": b}} for a, b in ((70.0, 60.0), (72.0, 61.0), (69.0, 62.5), (75.0, 61.0))]
    result = paired_comparisons(per_seed, ["m"], [("A", "B"), ("A", "missing")])
    assert list(result) == ["A vs B"]
    row = result["A vs B"]["m"]
    differences = [s["A"]["m"] - s["B"]["m"] for s in per_seed]
    assert abs(row["difference"][0] - sum(differences) / 4) < 1e-12
    reference = stats.ttest_rel([s["A"]["m"] for s in per_seed], [s["B"]["m"] for s in per_seed])
    assert abs(row["p"] - reference.pvalue) < 1e-12 and row["verdict"] == "better"


def test_new_methods_are_tuned_like_the_others_and_every_calibration_method_has_its_teacher_control():
    for name in ("PMRL + frozen teacher", "PMRL + EMA teacher", "pairwise InfoNCE + frozen teacher",
                 "pairwise InfoNCE + EMA teacher", "CalMRL (teacher PPCA)", "CalMRL (PPCA, trained modalities)"):
        assert name in TUNED_METHODS and len(METHODS[name].grid()) == 8
    assert ("CalMRL (teacher PPCA)", "PMRL + frozen teacher") in COMPARISONS
    # a teacher method runs on top of its observed-only method's temperatures, then its own tuned point
    tuned = {"PMRL (observed only)": {"pmrl_tau1": 0.5, "pmrl_tau2": 0.1, "learning_rate": 3e-4},
             "PMRL + frozen teacher": {"teacher_form": "columns", "teacher_weight": 3.0, "learning_rate": 1e-4}}
    values = hyperparameters_of("PMRL + frozen teacher", tuned)
    assert values == {"pmrl_tau1": 0.5, "pmrl_tau2": 0.1, "teacher_form": "columns", "teacher_weight": 3.0,
                      "learning_rate": 1e-4}
    method = ALL_METHODS["PMRL + frozen teacher"]
    assert method.training_arguments(values) == {"teacher": "frozen", "teacher_form": "columns",
                                                 "teacher_weight": 3.0}
    assert "teacher_weight" not in method.config_overrides(values)
    # the paper's calibration keeps imputing every fitted modality; the library's default only the trained ones
    assert METHODS["CalMRL (PPCA)"].training["impute_modalities"] == "all"
    assert "impute_modalities" not in METHODS["CalMRL (PPCA, trained modalities)"].training


@pytest.mark.slow
def test_quick_calibration_methods_and_the_imputer_ceiling(tmp_path):
    """At CI size, on the audio-visual world: the teacher methods, teacher-PPCA calibration and the diagnostics run
    through the library's loop, their comparisons are written, and the true missing embeddings (the ceiling of any
    imputer) beat observed-only on vision<->audio, the pair stage 2 never observes together."""
    from benchmarks.synthetic.run_av import main

    methods = ["PMRL (observed only)", "PMRL + frozen teacher", "CalMRL (teacher PPCA)",
               "PMRL (true missing, detached)"]
    output = tmp_path / "results_av.md"
    summary = main(["--quick", "--seeds", "1", "--methods", *methods, "--output", str(output)])
    comparisons = json.loads(output.with_suffix(".comparisons.json").read_text())
    assert {"CalMRL (teacher PPCA) vs PMRL + frozen teacher", "PMRL + frozen teacher vs PMRL (observed only)",
            "PMRL (true missing, detached) vs PMRL (observed only)"} <= set(comparisons)
    assert (summary["PMRL (true missing, detached)"]["vision<->audio_R@1"][0]
            > summary["PMRL (observed only)"]["vision<->audio_R@1"][0] + 5.0)
    assert "a calibration gain counts only over the teacher control" in output.read_text()
