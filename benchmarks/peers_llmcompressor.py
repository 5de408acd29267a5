"""llm-compressor's GPTQ W4A16 g64 of SmolLM2-135M, written as its compressed-tensors checkpoint (a peer row of
benchmarks/llm_export.py; runs in .venv-llmc, whose transformers and compressed-tensors versions it pins).

    .venv-llmc/bin/python benchmarks/peers_llmcompressor.py FOLDER GGUF_NAME CALIBRATION.json OUT_DIR

Calibration: the token windows in CALIBRATION.json (the benchmark's, the same lowbit calibrates on).
"""

from __future__ import annotations

import json
import sys

import torch


def main(folder: str, name: str, calibration: str, out: str) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    # llm-compressor re-reads the config from the model's folder (without gguf_file): give it a plain HF folder
    source = out + "-float"
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF loader's marker: a dequantized model is plain float
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(source)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = json.loads(open(calibration).read())
    data = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], config_groups={"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}})
    oneshot(model=model, processor=tokenizer, dataset=data, recipe=recipe, max_seq_length=len(windows[0]),
            num_calibration_samples=len(windows))
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
