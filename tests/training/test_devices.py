"""GPU plumbing, tested on a CPU: which device and precision a run takes, what it refuses, the process group's
backend, where ONNX Runtime serves, and that a step goes through Accelerate's gradient scaler (fp16 on GPUs)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from tuneloop.config import TrainConfig, load_config
from tuneloop.errors import TuneloopError
from tuneloop.models.classifier import HeadSpec, TextClassifier, load_encoder
from tuneloop.models.onnx_encoder import execution_providers
from tuneloop.training import devices, steppers
from tuneloop.training.devices import DevicePlan, plan_device, process_group_backend
from tuneloop.training.distributed import ONE_PROCESS
from tuneloop.training.loop import Task
from tuneloop.training.losses import CrossEntropy


@pytest.fixture()
def a_gpu(monkeypatch):
    """What torch says on a machine with a CUDA GPU; `bf16` says whether the GPU has bf16."""

    def gpu(bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)

    return gpu


def test_auto_takes_the_gpu_of_its_local_rank_in_bf16_or_fp16_with_a_scaler(a_gpu, monkeypatch):
    a_gpu(bf16=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    plan = plan_device(TrainConfig())
    assert plan.device == torch.device("cuda", 1) and plan.precision == "fp16" and plan.needs_scaler
    assert process_group_backend(plan) == "cpu:gloo,cuda:nccl"
    a_gpu(bf16=True)
    plan = plan_device(TrainConfig())
    assert plan.precision == "bf16" and not plan.needs_scaler and plan.autocast_dtype == torch.bfloat16
    assert plan_device(TrainConfig(device="cpu")).device == torch.device("cpu")  # asked for: the CPU


@pytest.mark.parametrize("native", [True, False])
def test_on_a_cpu_auto_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: native)
    plan = plan_device(TrainConfig())
    assert plan.device == torch.device("cpu") and plan.precision == ("bf16" if native else "fp32")
    assert process_group_backend(plan) == "gloo"
    assert plan_device(TrainConfig(precision="fp32")).autocast_dtype is None


@pytest.mark.parametrize(
    ("settings", "private", "says"),
    [
        ({"device": "cuda"}, False, "train.device=cuda, and torch sees no CUDA GPU"),
        ({"precision": "fp16"}, False, "train.precision=fp16 needs a CUDA GPU"),
        ({"precision": "bf16"}, True, "train.precision=bf16 with train.dp"),
    ],
)
def test_what_this_machine_cannot_run_is_one_clear_error(monkeypatch, settings, private, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TuneloopError, match=says.replace("(", r"\(")):
        plan_device(TrainConfig(**settings), private=private)


def test_private_training_is_fp32_even_on_a_gpu(a_gpu):
    a_gpu(bf16=True)
    assert plan_device(TrainConfig(), private=True).precision == "fp32"


def test_the_former_bf16_setting_reads_as_precision():
    assert load_config(None, ["train.bf16=false"]).train.precision == "fp32"
    assert load_config(None, ["train.bf16=true"]).train.precision == "auto"


def test_onnx_runtime_serves_fp32_on_the_gpu_when_it_has_one_and_int8_on_the_cpu():
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert execution_providers(int8=False, available=gpu) == gpu
    assert execution_providers(int8=True, available=gpu) == ["CPUExecutionProvider"]
    assert execution_providers(int8=False, available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def _stepper(model: TextClassifier, scaled: bool, monkeypatch) -> steppers.ReplicatedStepper:
    """A one-process stepper over `model` with plain SGD (whose steps show a wrongly scaled gradient, where Adam's
    would hide it); `scaled`: with the gradient scaler fp16 brings on a GPU, made to work on this CPU."""
    if scaled:
        monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))

        def with_scaler(plan: DevicePlan) -> Accelerator:
            accelerator = Accelerator(cpu=True)
            accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            return accelerator

        monkeypatch.setattr(steppers, "accelerator_for", with_scaler)
    recipe = load_config(None, ["train.grad_clip=1e9", "train.batch_size=4"])
    stepper = steppers.ReplicatedStepper(
        model,
        DevicePlan(torch.device("cpu"), "fp32"),
        ONE_PROCESS,
        recipe,
        0,
        lambda: torch.optim.SGD(model.parameters(), lr=0.5),
    )
    # Only now: with native AMP on when the model is prepared, the forward pass would run in fp16 on this CPU.
    stepper.accelerator.native_amp = scaled
    return stepper


def test_a_step_goes_through_the_gradient_scaler_and_takes_the_unscaled_step(tiny_encoder, monkeypatch):
    """fp16 scales the loss up before backward and the gradients down before clipping and stepping: a stepper
    that went around Accelerate (loss.backward(), optimizer.step()) would step 4096 times too far, or skip."""
    torch.manual_seed(0)
    model = TextClassifier(load_encoder(tiny_encoder), HeadSpec(labels=["a", "b"], dropout=0.0))
    models = {"plain": model, "scaled": copy.deepcopy(model)}
    ids = [[2, 7, 9, 3], [2, 9, 11, 12, 3], [2, 7, 15, 3], [2, 20, 3]]
    for name, each in models.items():
        stepper = _stepper(each, scaled=name == "scaled", monkeypatch=monkeypatch)
        task = Task("", each, ids, np.array([0, 1, 0, 1]), [], np.array([]), [CrossEntropy(1.0, 0.0)])
        for step in range(3):
            stepper.step(task, [0, 1, 2, 3], step)
        if name == "scaled":
            assert stepper.accelerator.scaler is not None and stepper.accelerator.scaler.get_scale() == 2.0**12
            monkeypatch.undo()
    before = TextClassifier(load_encoder(tiny_encoder), HeadSpec(labels=["a", "b"], dropout=0.0)).state_dict()
    plain, scaled = models["plain"].state_dict(), models["scaled"].state_dict()
    assert any(not torch.allclose(plain[n], before[n]) for n in plain if n in before)  # it did learn
    for name, weight in plain.items():
        torch.testing.assert_close(scaled[name], weight, atol=1e-5, rtol=1e-4, msg=name)
