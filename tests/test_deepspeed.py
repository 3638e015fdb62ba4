"""DeepSpeed ZeRO-2 and ZeRO-3 through `accelerate launch` on 2 CPU processes (gloo), against DDP on the same
global batches (`accelerate launch --multi_gpu`, which gives DDP over gloo on a machine without GPUs).

Each run trains the tiny model 3 steps through `calmrl_hf.training.train` (float32, no dropout, AdamW with weight
decay 0.01, gradient clipping 1.0) and evaluates on 16 rows, launched with recipes/configs/accelerate/zero2.yaml
or zero3.yaml; a fourth run is ZeRO-2 in bf16 with every buffer cast (the imputer's float32 fix-up). DeepSpeed
runs on its CPU accelerator (it builds its shared-memory comm op with ninja on first use, ~1 minute, cached in
~/.cache/torch_extensions). Skipped where deepspeed is not installed (it is no dependency of the package).
Checkpoints (`save_steps`) under DeepSpeed are refused before training (the ZeRO optimizer's state dict holds a
LossScaler object and only one process's partition): test_training's
`test_engine_settings_that_cannot_run_are_refused_before_training`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from calmrl_hf import CalMRLModel

from launching import free_port, launch_environment, run_launch


pytestmark = pytest.mark.slow  # every test reads the 2-process accelerate launches
pytest.importorskip("deepspeed", reason="needs deepspeed (pip install deepspeed; not a dependency)")
if shutil.which("accelerate") is None:
    pytest.skip("needs the accelerate CLI", allow_module_level=True)

HERE = Path(__file__).parent
CONFIGS = HERE.parent / "recipes" / "configs" / "accelerate"
MODES = ("ddp", "zero2", "zero3", "zero2_bf16")
FLAGS = {"ddp": ["--multi_gpu", "--num_processes", "2"],
         "zero2": ["--config_file", str(CONFIGS / "zero2.yaml")],
         "zero3": ["--config_file", str(CONFIGS / "zero3.yaml")],
         "zero2_bf16": None}  # a DeepSpeed config file (bf16, buffers cast too: `bf16_config`)
# ZeRO-2 in bf16, the engine told to cast every buffer (`data_types.buffer_dtype`) and to keep none in float32
# (`keep_in_fp32_modules` [], overriding the model's `_keep_in_fp32_modules_strict`), as older DeepSpeed cast the
# whole module in bf16 / fp16; 0.19.8 by default leaves buffers in their dtype and honours the model's list
BF16_DEEPSPEED_CONFIG = {
    "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
    "data_types": {"buffer_dtype": "bf16", "keep_in_fp32_modules": []},
    "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
}


def bf16_config(out: Path) -> Path:
    """An accelerate config (DEEPSPEED, 2 processes) naming a DeepSpeed config file with BF16_DEEPSPEED_CONFIG."""
    (out / "zero2_bf16.json").write_text(json.dumps(BF16_DEEPSPEED_CONFIG))
    config = out / "zero2_bf16.yaml"
    config.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
                      f"  deepspeed_config_file: {out / 'zero2_bf16.json'}\n  zero3_init_flag: false\n"
                      f"num_machines: 1\nmachine_rank: 0\nnum_processes: 2\nuse_cpu: false\n")
    return config
# the parameters this model's PMRL loss gives no gradient: the towers' unused HF poolers, and logit_scale (PMRL has
# no temperature)
GRADIENT_LESS = {"logit_scale", "encoders.vision.pooler.dense.weight", "encoders.vision.pooler.dense.bias",
                 "encoders.text.pooler.dense.weight", "encoders.text.pooler.dense.bias"}


def launch(mode: str, out: Path, timeout: int = 420, settings: tuple[str, ...] = ("eval_rows=16",)) -> None:
    """One 2-process run of the worker (a hang fails after `timeout` seconds: the first DeepSpeed run on a machine
    compiles DeepSpeed's CPU comm op)."""
    flags = FLAGS[mode] or ["--config_file", str(bf16_config(out))]
    command = ["accelerate", "launch", *flags, "--main_process_port", free_port(),
               str(HERE / "dist_deepspeed_worker.py"), str(out), mode, *settings]
    run_launch(command, env=launch_environment(out), timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    for mode in MODES:
        launch(mode, out)
    return out, {mode: [torch.load(out / f"{mode}_rank_{rank}.pt") for rank in (0, 1)] for mode in MODES}


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_zero_trains_like_ddp(runs, mode):
    """The same loss curve and, for every parameter with a gradient, the same final weights as DDP.

    Tolerance (float32): ZeRO reduces gradients in its flat partitions (reduce-scatter), DDP in its buckets
    (all-reduce): the sums' order differs in the last bits, and Adam's normalisation passes that on (measured:
    losses equal to the last bit, weights within 1.6e-6 after 3 steps). atol 2e-5 is 2% of one step (AdamW moves
    every weight by about lr = 1e-3 a step), so a step lost, doubled or taken at another learning rate fails.
    """
    _, result = runs
    ddp, zero = result["ddp"][0], result[mode][0]
    assert [r["distributed_type"] for r in result[mode]] == ["DistributedType.DEEPSPEED"] * 2  # no silent DDP
    assert result["ddp"][0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert all(r["processes"] == 2 for r in result[mode])
    assert len(zero["losses"]) == 3 and zero["losses"][-1] < zero["losses"][0]
    torch.testing.assert_close(torch.tensor(zero["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=1e-6)
    assert zero["scheduler_steps"] == ddp["scheduler_steps"] == 6  # accelerate steps it once per process and step
    assert zero["state"].keys() == ddp["state"].keys()
    for key, value in ddp["state"].items():
        if key not in GRADIENT_LESS:
            assert zero["state"][key].dtype == torch.float32, key
            torch.testing.assert_close(zero["state"][key], value, rtol=0, atol=2e-5, msg=key)


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_zero_decays_parameters_without_a_gradient(runs, mode):
    """A parameter whose gradient stays None: torch's AdamW skips it (DDP leaves it at its initial value), ZeRO's
    optimizer gives it a zero gradient, so AdamW's decoupled weight decay shrinks it by (1 - lr_t x 0.01) every
    step (lr_t = 0, 1e-3, 5e-4: linear warmup of 1 step and decay over 3)."""
    _, result = runs
    ddp, zero = result["ddp"][0], result[mode][0]
    unchanged = {k for k, v in ddp["initial"].items()
                 if not k.startswith("imputer.") and torch.equal(ddp["state"][k], v)}
    assert unchanged == GRADIENT_LESS
    factor = (1 - 1e-3 * 0.01) * (1 - 5e-4 * 0.01)
    for key in GRADIENT_LESS:
        torch.testing.assert_close(zero["state"][key], ddp["initial"][key] * factor, rtol=2e-7, atol=1e-9, msg=key)


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_evaluation_through_the_engine_gives_ddps_recalls(runs, mode):
    """train's final evaluation (16 rows, 8 per process) embeds through the DeepSpeed engine's forward (under
    ZeRO-3 it gathers each layer's parameters): DDP's recalls (measured: equal; a near-tie could flip one of the 8
    queries of a direction, 12.5 points)."""
    _, result = runs
    ddp, zero = result["ddp"][0]["metrics"], result[mode][0]["metrics"]
    assert zero.keys() == ddp.keys() and "mean_R@1" in zero
    for key, value in ddp.items():
        assert abs(zero[key] - value) <= 12.5, key


@pytest.mark.parametrize("mode", MODES)
def test_imputer_stays_float32_identical_across_processes_and_as_ddp(runs, mode):
    """Under bf16 too: where DeepSpeed's bf16 engine cast the buffers, `keep_imputer_float32` gives the imputer its
    float32 state back."""
    _, result = runs
    rank0, rank1 = result[mode]
    cast = ["torch.bfloat16"] if mode.endswith("bf16") else ["torch.float32"]
    assert rank0["buffer_dtypes_after_prepare"] == rank1["buffer_dtypes_after_prepare"] == cast
    assert rank0["buffer_dtypes_after_the_fix"] == rank1["buffer_dtypes_after_the_fix"] == ["torch.float32"]
    for name, buffer in rank0["buffers"].items():
        assert buffer.dtype == torch.float32, name
        assert torch.equal(rank1["buffers"][name], buffer), name  # the same closed-form M-step on every process
        if mode.endswith("bf16"):  # embeddings in bf16: statistics of other embeddings
            continue
        # the statistics come from embeddings that differ from DDP's in the last bits (see test_zero_trains_like_ddp)
        torch.testing.assert_close(buffer, result["ddp"][0]["buffers"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_saved_model_loads_exactly(runs, mode):
    """train's save_pretrained (accelerator.get_state_dict: under ZeRO-3 the full state gathered to rank 0) ->
    from_pretrained gives the trained state bit for bit, the imputer's float32 buffers included (under bf16, the
    engine's bf16 weights: DeepSpeed saves its 16-bit model, not its float32 master weights)."""
    out, result = runs
    loaded = CalMRLModel.from_pretrained(out / f"run_{mode}").state_dict()
    state = result[mode][0]["state"]
    assert loaded.keys() == state.keys()
    for key, value in loaded.items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    for name, buffer in result[mode][0]["buffers"].items():
        assert torch.equal(loaded[f"imputer.{name}"], buffer), name
    weights = {value.dtype for key, value in loaded.items() if not key.startswith("imputer.")}
    assert weights == ({torch.bfloat16} if mode.endswith("bf16") else {torch.float32})
