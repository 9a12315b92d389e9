"""Device choice: each branch of `auto`, `gpu` and named devices, with cuda and mps faked present or absent."""

import pytest
import torch

from nanogpt_lightning.devices import auto_precision, available_devices, check_precision, pick_device
from nanogpt_lightning.errors import UserError, naming


@pytest.fixture
def machine(monkeypatch):
    """Fake which of cuda and mps PyTorch reports present."""

    def have(cuda: bool, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return have


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, ["cuda", "mps", "cpu"]),
    (True, False, ["cuda", "cpu"]),
    (False, True, ["mps", "cpu"]),
    (False, False, ["cpu"]),
])
def test_available_devices_best_first(machine, cuda, mps, expected):
    machine(cuda, mps)
    assert available_devices() == expected


@pytest.mark.parametrize("cuda, mps, auto, gpu", [
    (True, True, "cuda", "cuda"),
    (True, False, "cuda", "cuda"),
    (False, True, "mps", "mps"),
    (False, False, "cpu", None),
])
def test_auto_and_gpu(machine, cuda, mps, auto, gpu):
    machine(cuda, mps)
    assert pick_device("auto") == torch.device(auto)
    if gpu is None:
        with pytest.raises(UserError) as err, naming(key="trainer.accelerator"):
            pick_device("gpu")
        assert str(err.value) == ("trainer.accelerator=gpu is not available here; available: cpu "
                                  "(or trainer.accelerator=auto)")
    else:
        assert pick_device("gpu") == torch.device(gpu)


def test_named_devices_present(machine):
    machine(True, True)
    for name in ("cuda", "mps", "cpu"):
        assert pick_device(name) == torch.device(name)


def test_named_device_absent_lists_what_is_there_cpu_first(machine):
    machine(False, False)
    with pytest.raises(UserError) as err:
        pick_device("mps")  # its errors name sample.py's and eval.py's `device` unless the caller names another
    assert str(err.value) == "device=mps is not available here; available: cpu (or device=auto)"
    machine(True, False)
    with pytest.raises(UserError) as err, naming(key="trainer.accelerator"):
        pick_device("mps")
    assert str(err.value) == ("trainer.accelerator=mps is not available here; available: cpu, cuda "
                              "(or trainer.accelerator=auto)")
    machine(False, True)
    with pytest.raises(UserError) as err:
        pick_device("cuda")
    assert str(err.value) == "device=cuda is not available here; available: cpu, mps (or device=auto)"


@pytest.mark.parametrize("name", ["tpu", "CUDA", "cuda:0", "", None])
def test_unknown_name_lists_the_valid_ones(machine, name):
    machine(True, True)
    with pytest.raises(UserError) as err:
        pick_device(name)
    assert str(err.value) == f"device must be one of auto, gpu, cuda, mps, cpu, got {name!r}"


@pytest.mark.parametrize("capability, expected", [((7, 5), "32-true"), ((8, 0), "bf16-mixed"), ((9, 0), "bf16-mixed")],
                         ids=["T4", "A100", "H100"])
def test_auto_precision_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert auto_precision(torch.device("cuda")) == expected


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, True, "bf16-mixed"),    # Intel Xeon 4th gen+
    (False, True, "bf16-mixed"),   # AMD Zen 4
    (False, False, "32-true"),     # AVX2-only EPYC, older Xeons, Apple silicon's CPU
])
def test_auto_precision_on_cpu_follows_its_bfloat16_units(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert auto_precision(torch.device("cpu")) == expected


def test_auto_precision_on_a_cpu_whose_pytorch_cannot_tell_is_float32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert auto_precision(torch.device("cpu")) == "32-true"


@pytest.mark.parametrize("sonoma, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_precision_on_mps_needs_macos_14(monkeypatch, sonoma, expected):
    asked = []
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer",
                        lambda major, minor: asked.append((major, minor)) or sonoma)
    assert auto_precision(torch.device("mps")) == expected
    assert asked == [(14, 0)]


def test_precisions_the_device_lacks_are_one_line(monkeypatch):
    with pytest.raises(UserError) as err, naming(key="trainer.precision"):
        check_precision("16-mixed", torch.device("cpu"))
    assert str(err.value) == ("trainer.precision=16-mixed (float16 with loss scaling) needs cuda or mps; "
                              "on cpu pass trainer.precision=bf16-mixed or trainer.precision=auto")
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
    with pytest.raises(UserError) as err:
        check_precision("bf16-mixed", torch.device("mps"))  # sample.py's `precision` unless the caller names another
    assert str(err.value) == ("precision=bf16-mixed needs macOS 14 or newer on mps; pass precision=16-mixed or "
                              "precision=32-true")
    for precision, device in (("bf16-mixed", "cpu"), ("16-mixed", "cuda"), ("16-mixed", "mps"), ("32-true", "cpu")):
        check_precision(precision, torch.device(device))  # accepted
