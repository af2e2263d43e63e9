"""Unit tests that need no notebook: the package API, its error messages, the CLI, the environment."""
import json, subprocess, sys
from pathlib import Path

import pytest
import torch

from guide.core import Report, get_tier, seed_everything
from guide.data import BlockLoader, pack, read_text, train_tokenizer, write_shards
from guide.model import Llama, ModelConfig, generate, load_model, save_model, to_hf

BIN = Path(sys.executable).parent


def test_pip_check_passes():
    r = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_help_and_info():
    r = subprocess.run([BIN / "guide", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "tour" in r.stdout and "demo" in r.stdout
    r = subprocess.run([BIN / "guide", "tour", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--tier" in r.stdout
    r = subprocess.run([BIN / "guide", "info"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["torch"] == torch.__version__


def test_cli_bad_input_is_a_usage_error():
    r = subprocess.run([BIN / "guide", "tour", "--jobs", "many"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid int value" in r.stderr


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tier"): get_tier("enormous")
    with pytest.raises(ValueError, match="empty corpus"): train_tokenizer([])
    with pytest.raises(ValueError, match="longer than the data"): pack([[1, 2]], 10, 0)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"): read_text(tmp_path / "latin1.txt")
    with pytest.raises(FileNotFoundError): BlockLoader(tmp_path, 8, 2)
    with pytest.raises(ValueError, match="multiple of n_heads"): ModelConfig(dim=100, n_heads=3)
    with pytest.raises(FileNotFoundError): load_model(tmp_path)
    with pytest.raises(ValueError, match="non-negative"): seed_everything(-3)


def test_failed_writes_leave_no_partial_files(tmp_path):
    with pytest.raises(ValueError): write_shards([[1, 2], [70000]], tmp_path / "shards", sep_id=0)
    assert list(tmp_path.iterdir()) == []


def test_save_load_roundtrip_and_hf_parity(tmp_path):
    seed_everything(0)
    m = Llama(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, max_seq_len=32)).eval()
    x = torch.randint(0, 50, (2, 9))
    save_model(m, tmp_path / "m")
    m2 = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(m(x)[0], m2(x)[0])
        assert (to_hf(m)(x).logits - m(x)[0]).abs().max() < 1e-5
    assert torch.equal(generate(m, x[:, :3], 8), generate(m2, x[:, :3], 8))


def test_report_rejects_out_of_range(tmp_path):
    r = Report("t", tmp_path)
    with pytest.raises(AssertionError, match="outside the expected range"): r.metric("acc", 0.1, lo=0.5)
    saved = json.loads((tmp_path / "metrics" / "t.json").read_text())
    assert saved["metrics"][0]["ok"] is False      # a failed metric is still on the report card


def test_load_a_transformers_folder_llama_or_mistral_else_as_hf(tmp_path):
    """`guide.pretrained.load(folder)` of a transformers checkpoint: a Llama or a Mistral becomes a guide Llama with
    the same logits; another architecture is refused unless `as_hf=True`."""
    import transformers
    from guide.data import get_tokenizer
    from guide.pretrained import load
    tok = get_tokenizer("tiny")
    small = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32)
    x = torch.randint(0, len(tok), (1, 7))
    for name, hf in [("mistral", transformers.MistralForCausalLM(transformers.MistralConfig(**small))),
                     ("gpt2", transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2)))]:
        hf.eval().save_pretrained(tmp_path / name); tok.save_pretrained(tmp_path / name)
        if name == "gpt2":
            with pytest.raises(ValueError, match="as_hf=True"): load(tmp_path / name)
            assert isinstance(load(tmp_path / name, as_hf=True)[0], transformers.GPT2LMHeadModel)
            continue
        model, _ = load(tmp_path / name)
        with torch.no_grad(): assert isinstance(model, Llama) and (model(x)[0] - hf(x).logits).abs().max() < 1e-5
