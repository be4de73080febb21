"""The step-memory estimate (nestlearn.training.memory_budget) against the measured peak of a
real step, and the refusal of a step that cannot fit."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nestlearn.errors import NestlearnError
from nestlearn.losses import lm_loss_sum
from nestlearn.models import build_model
from nestlearn.training import Trainer, get_recipe, train
from nestlearn.training import memory_budget as budget
from trainkit import tiny_config, write_corpus


class LiveTensorBytes(TorchDispatchMode):
    """The peak of the bytes of live storages created while active (every op's outputs are
    recorded; a storage counts until it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage._cdata not in self.storages:
                    self.storages[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        if self.current > self.peak:  # drop the freed ones before taking a new peak
            for key in [k for k, (ref, _) in self.storages.items() if ref.expired()]:
                self.current -= self.storages.pop(key)[1]
            self.peak = max(self.peak, self.current)
        return out


def measured_step_peak(model: torch.nn.Module, batch: int, length: int) -> int:
    """Peak bytes a whole AdamW step (forward, backward, update) allocates."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (batch, length + 1),
                        generator=torch.Generator().manual_seed(1))
    with LiveTensorBytes() as tracker:
        logits, _ = model(ids[:, :-1])
        lm_loss_sum(logits, ids[:, 1:]).backward()
        del logits
        optimizer.step()
    return tracker.peak


@pytest.mark.parametrize(("arch", "batch", "length"), [
    ("transformer", 2, 192), ("titans", 2, 192), ("hope", 2, 40),
])
def test_the_estimate_bounds_the_measured_peak_within_its_factor(arch, batch, length):
    torch.manual_seed(0)
    model = build_model(get_recipe(f"tiny-{arch}").model)
    # the probes run at most 64 tokens: these lengths (but hope's) are extrapolated to
    estimate = budget.estimate_step_memory(model, "adamw", batch, length)
    peak = measured_step_peak(model, batch, length)
    assert peak <= estimate.needed <= budget.ACCURACY_FACTOR * peak, (peak, estimate)


@pytest.mark.slow  # hope at 256 tokens: the tracker sees about 40,000 ops (a minute)
@pytest.mark.parametrize(("arch", "batch", "length"), [
    ("hope", 2, 256), ("hope-attention", 4, 256), ("transformer", 16, 128),
])
def test_the_estimate_extrapolates_every_arch_within_its_factor(arch, batch, length):
    torch.manual_seed(0)
    model = build_model(get_recipe(f"tiny-{arch}").model)
    estimate = budget.estimate_step_memory(model, "adamw", batch, length)
    peak = measured_step_peak(model, batch, length)
    assert peak <= estimate.needed <= budget.ACCURACY_FACTOR * peak, (peak, estimate)


def test_the_estimate_grows_with_batch_and_length():
    model = build_model(get_recipe("tiny-titans").model)
    small = budget.estimate_step_memory(model, "adamw", 2, 128)
    assert budget.estimate_step_memory(model, "adamw", 4, 128).activations > small.activations
    assert budget.estimate_step_memory(model, "adamw", 2, 1024).activations > \
        6 * small.activations
    assert small.optimizer == 2 * small.gradients
    assert budget.estimate_step_memory(model, "sgd", 2, 128).optimizer == small.gradients


def test_the_probes_leave_the_random_generators_as_they_were():
    model = build_model(get_recipe("tiny-transformer").model)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    budget.estimate_step_memory(model, "adamw", 2, 32)
    assert torch.equal(torch.rand(4), expected)
    assert all(p.grad is None for p in model.parameters())


def test_a_step_that_cannot_fit_is_refused_with_the_estimate_and_the_available_memory():
    model = build_model(get_recipe("tiny-transformer").model)
    with pytest.raises(NestlearnError) as err:
        budget.check_step_memory(model, "adamw", 4, 100_000, available=3 * 2**30)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("data.batch_size=4, data.seq_len=100000: a training step needs "
                              "about ")
    assert "GiB more memory (activations " in message
    assert "but this machine has 3.0 GiB available; allowed: a smaller data.batch_size or " \
           "data.seq_len, or --set train.memory_check=false to try anyway" in message
    needed = budget.estimate_step_memory(model, "adamw", 4, 100_000).needed
    assert f"needs about {budget.gib(needed)} more" in message
    assert budget.check_step_memory(model, "adamw", 4, 128, available=3 * 2**30).needed < 2**30


def test_the_cpu_memory_is_read_from_the_machine():
    available = budget.available_memory(torch.device("cpu"))
    assert available is not None and 0 < available <= _mem_total()


def _mem_total() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def test_the_trainer_checks_before_the_first_step_unless_told_not_to(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "verse.txt", paragraphs=60)
    monkeypatch.setattr(budget, "available_memory", lambda device: 1024)
    with pytest.raises(NestlearnError, match=r"but this machine has 0 MiB available"):
        Trainer(tiny_config(corpus, tmp_path / "refused", "train.steps=1"), progress=False)
    result = train(tiny_config(corpus, tmp_path / "forced", "train.steps=1",
                               "train.memory_check=false"), progress=False)
    assert result.status == "completed" and result.step == 1


def _fake_proc(tmp_path, meminfo_kb: int, files: dict[str, str]):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: 99999999 kB\nMemAvailable: {meminfo_kb} kB\n")
    cgroup = tmp_path / "cgroup"
    for name, text in files.items():
        (cgroup / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / name).write_text(text)
    return meminfo, cgroup


def test_cgroup_v2_room_subtracts_inactive_page_cache(tmp_path):
    from nestlearn.training.memory_budget import _cpu_available

    gib = 1 << 30
    meminfo, cgroup = _fake_proc(tmp_path, 20 * gib // 1024, {
        "memory.max": f"{8 * gib}\n", "memory.current": f"{7 * gib}\n",
        "memory.stat": f"anon {2 * gib}\nfile {5 * gib}\ninactive_file {4 * gib}\n"})
    # working set 7 - 4 = 3 GiB of an 8 GiB limit: 5 GiB free, not the 1 GiB usage suggests
    assert _cpu_available(meminfo, cgroup) == 5 * gib


def test_cgroup_v1_and_meminfo_take_the_smaller(tmp_path):
    from nestlearn.training.memory_budget import _cpu_available

    gib = 1 << 30
    meminfo, cgroup = _fake_proc(tmp_path, 2 * gib // 1024, {
        "memory/memory.limit_in_bytes": f"{8 * gib}\n",
        "memory/memory.usage_in_bytes": f"{6 * gib}\n",
        "memory/memory.stat": f"cache {3 * gib}\ntotal_inactive_file {gib}\n"})
    assert _cpu_available(meminfo, cgroup) == 2 * gib  # MemAvailable is smaller than 3 GiB
    (cgroup / "memory/memory.stat").unlink()  # no stat file: the usage as it is
    meminfo.write_text(f"MemAvailable: {20 * gib // 1024} kB\n")
    assert _cpu_available(meminfo, cgroup) == 2 * gib


def test_unlimited_cgroup_leaves_meminfo(tmp_path):
    from nestlearn.training.memory_budget import _cpu_available

    meminfo, cgroup = _fake_proc(tmp_path, 1024, {"memory.max": "max\n",
                                                  "memory.current": "5\n"})
    assert _cpu_available(meminfo, cgroup) == 1024 * 1024
