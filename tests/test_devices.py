"""Device choice: each branch of `auto`, `gpu` and named devices, with cuda and mps faked present or absent."""

import pytest
import torch

from nanogpt_lightning.devices import available_devices, pick_device
from nanogpt_lightning.errors import UserError


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
    assert pick_device("auto", "device") == torch.device(auto)
    if gpu is None:
        with pytest.raises(UserError) as err:
            pick_device("gpu", "trainer.accelerator")
        assert str(err.value) == ("trainer.accelerator=gpu is not available here; available: cpu "
                                  "(or trainer.accelerator=auto)")
    else:
        assert pick_device("gpu", "trainer.accelerator") == torch.device(gpu)


def test_named_devices_present(machine):
    machine(True, True)
    for name in ("cuda", "mps", "cpu"):
        assert pick_device(name, "device") == torch.device(name)


def test_named_device_absent_lists_what_is_there_cpu_first(machine):
    machine(False, False)
    with pytest.raises(UserError) as err:
        pick_device("mps", "device")
    assert str(err.value) == "device=mps is not available here; available: cpu (or device=auto)"
    machine(True, False)
    with pytest.raises(UserError) as err:
        pick_device("mps", "trainer.accelerator")
    assert str(err.value) == ("trainer.accelerator=mps is not available here; available: cpu, cuda "
                              "(or trainer.accelerator=auto)")
    machine(False, True)
    with pytest.raises(UserError) as err:
        pick_device("cuda", "device")
    assert str(err.value) == "device=cuda is not available here; available: cpu, mps (or device=auto)"


@pytest.mark.parametrize("name", ["tpu", "CUDA", "cuda:0", "", None])
def test_unknown_name_lists_the_valid_ones(machine, name):
    machine(True, True)
    with pytest.raises(UserError) as err:
        pick_device(name, "device")
    assert str(err.value) == f"device must be one of auto, gpu, cuda, mps, cpu, got {name!r}"
