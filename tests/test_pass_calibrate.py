"""calibrate: streams batches through an FX Interpreter; bad batches name the batch and the input."""

import pytest
import torch
from torch import nn

from lowbit.config import QuantConfig
from lowbit.errors import CalibrationError
from lowbit.passes import Annotate, Calibrate, InsertObservers
from lowbit.passes.insert_observers import observer_nodes

from helpers import run_passes


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x, mask):
        return self.b(torch.relu(self.a(x)) * mask)


def batches(n, start=0):
    g = torch.Generator().manual_seed(start)
    return [{"x": torch.randn(3, 8, generator=g) * (i + 1), "mask": torch.ones(3, 8)} for i in range(n)]


def run(cal, method="minmax"):
    return run_passes(Two().eval(), batches(1)[0], [Annotate(), InsertObservers(), Calibrate()],
                      config=QuantConfig(calibration=method), calibration=cal)


def test_calibrate_streams_every_batch_into_the_observers():
    cal = batches(20)
    gm, pm, _ = run(iter(cal))  # a one-shot iterator works: nothing is kept
    assert pm.records[-1].stats == {"batches": 20, "observers": 2}
    first = next(o for n, o in observer_nodes(gm) if n.args[0].op == "placeholder")
    allx = torch.cat([b["x"] for b in cal])
    assert first.min_val == allx.min().item() and first.max_val == allx.max().item()


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_method_calibrates(method):
    gm, _, _ = run(batches(4), method)
    for _, obs in observer_nodes(gm):
        scale, _ = obs.calculate_qparams()
        assert 0 < scale < 1.0


def test_empty_calibration():
    with pytest.raises(CalibrationError, match="empty"):
        run([])


def test_missing_calibration():
    with pytest.raises(CalibrationError, match="need calibration data"):
        run(None)


def test_nan_and_inf_name_the_batch_and_input():
    bad = batches(5)
    bad[3]["x"][1, 2] = float("nan")
    with pytest.raises(CalibrationError, match=r"calibration batch 3: input 'x' contains NaN"):
        run(bad)
    bad = batches(5)
    bad[2]["mask"][0, 0] = float("inf")
    with pytest.raises(CalibrationError, match=r"calibration batch 2: input 'mask' contains Inf"):
        run(bad)


def test_wrong_shape_dtype_or_structure_name_the_batch_and_input():
    bad = batches(3)
    bad[1]["x"] = torch.randn(3, 9)
    with pytest.raises(CalibrationError, match=r"calibration batch 1: input 'x' has shape \(3, 9\); dim 1 must be 8"):
        run(bad)
    bad = batches(3)
    bad[2]["mask"] = torch.ones(3, 8, dtype=torch.int64)
    with pytest.raises(CalibrationError, match=r"calibration batch 2: input 'mask' has dtype int64, expected float32"):
        run(bad)
    bad = batches(3)
    del bad[0]["mask"]
    with pytest.raises(CalibrationError, match=r"calibration batch 0: .*missing \['mask'\]"):
        run(bad)
