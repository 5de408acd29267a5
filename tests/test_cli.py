"""The lowbit command on a saved ONNX artifact: inspect, verify (and refuse a tampered one), run."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.cli import main

from models import SmallResNet, randomize_bn


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    m = randomize_bn(SmallResNet())
    cal = [(torch.randn(4, 1, 16, 16),) for _ in range(2)]
    q = lowbit.compile(m, cal[0], target="onnxruntime-int8", calibration=cal, progress=False)
    return q, q.save(tmp_path_factory.mktemp("cli") / "cnn")


def test_inspect_and_verify(artifact, capsys):
    _, d = artifact
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "target 'onnxruntime-int8'" in out and "7 w8a8" in out and "QLinearConv" in out
    assert main(["verify", str(d)]) == 0


def test_verify_refuses_a_tampered_artifact(artifact, tmp_path, capsys):
    q, _ = artifact
    d = q.save(tmp_path / "copy")
    (d / "plan.json").write_text("{}")
    assert main(["verify", str(d)]) == 1
    assert "SHA-256 does not match" in capsys.readouterr().err


def test_run(artifact, tmp_path):
    q, d = artifact
    x = torch.randn(3, 1, 16, 16)
    save_file({"x": x}, str(tmp_path / "in.safetensors"))
    assert main(["run", str(d), "--inputs", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "o.safetensors")]) == 0
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["output_0"], q(x))
