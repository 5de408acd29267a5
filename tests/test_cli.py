"""The lowbit command on a saved ONNX artifact: inspect, verify (and refuse a tampered one), run."""

import re

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


# -- quantize / eval / generate / bench (issue 18, part 1) ------------------------------------------------------
@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face folder, with a byte-level BPE tokenizer trained on pydoc text."""
    transformers = pytest.importorskip("transformers")
    from pydoc_data.topics import topics

    from tokenizers import ByteLevelBPETokenizer

    texts = list(topics.values())
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts[:60], vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    d = tmp_path_factory.mktemp("llm")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "tiny")
    tok.save_pretrained(d / "tiny")
    (d / "cal.txt").write_text("\n\n".join(texts[60:66]))
    (d / "eval.txt").write_text("\n\n".join(texts[70:72]))
    return d


def test_quantize_eval_generate_bench_from_the_shell(llm_folder, capsys) -> None:
    d = llm_folder
    out = d / "tiny-w4"
    assert main(["quantize", str(d / "tiny"), "--out", str(out), "--scheme", "w4a16", "--group-size", "32",
                 "--calibration", str(d / "cal.txt"), "--samples", "4", "--seq-len", "64", "--export", "gguf"]) == 0
    printed = capsys.readouterr().out
    assert "MatMulNBits" in printed and f"saved {out}" in printed and (d / "tiny-w4-gguf" / "model.gguf").is_file()
    fid = re.search(r"fidelity on the engine: perplexity ([\d.]+) against float ([\d.]+) .* \((\d+) tokens\)", printed)
    assert fid and int(fid.group(3)) == 64 and abs(float(fid.group(1)) / float(fid.group(2)) - 1) < 0.05, fid
    assert main(["eval", str(out), "--text", str(d / "eval.txt"), "--seq-len", "64", "--max-tokens", "512",
                 "--model", str(d / "tiny")]) == 0
    lines = capsys.readouterr().out.splitlines()
    ppl = float(lines[0].split()[1])
    ref = float(lines[1].split()[2].rstrip(";"))
    assert abs(ppl / ref - 1) < 0.02  # int4 g32 of a random model: within 2% of its float perplexity
    assert main(["generate", str(out), "The assert statement", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "8 tokens" in captured.err
    assert main(["bench", str(out), "--prompt", "16", "--new", "8", "--repeats", "2"]) == 0
    assert "decode" in capsys.readouterr().out


def test_shell_errors_are_one_line_with_exit_code_2(llm_folder, capsys) -> None:
    d = llm_folder
    assert main(["quantize", str(d / "missing"), "--out", str(d / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such folder or file" in err and "Traceback" not in err
    assert main(["eval", str(d / "nothing"), "--text", str(d / "eval.txt")]) == 2
    assert "no such artifact directory" in capsys.readouterr().err


def test_every_option_is_listed_with_its_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    for option in ("--target", "--scheme", "--group-size", "--weight-method", "--calibration", "--samples",
                   "--seq-len", "--target-ppl-increase", "--export", "--dump-dir"):
        assert option in text
    assert "(default: onnxruntime-int8)" in text and "(default: 32)" in text
