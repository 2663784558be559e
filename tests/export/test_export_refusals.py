"""What ``lorakit export`` refuses, each as one line naming the module (or file) and the reason."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from export_util import make_adapter
from lorakit import LoraConfig, inject, read_adapter, save_adapter
from lorakit.cli import main
from lorakit.export.gguf_adapter import refusals
from lorakit.methods.io import save_method
from lorakit.methods.registry import apply_method
from tiny import randomize_lora, tiny_gpt2, tiny_llama


def _export(capsys, adapter, out, *extra) -> tuple[int, str]:
    code = main(["export", "--adapter", str(adapter), "--format", "gguf-adapter", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def _saved(tmp_path, model, **config):
    inject(model, LoraConfig(**config))
    randomize_lora(model)
    return read_adapter(save_adapter(model, tmp_path / "ad"))


def test_gpt2_per_slice_qv_is_refused_naming_the_module(tmp_path, capsys):
    model = tiny_gpt2()
    inject(model, LoraConfig(r=2, targets=("q", "v")))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ad")
    code, err = _export(capsys, tmp_path / "ad", tmp_path / "a.gguf")
    assert code == 1 and len(err.splitlines()) == 1
    assert "transformer.h.0.attn.c_attn: per-slice fused q/k/v LoRA" in err
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize(("make", "config", "expected"), [
    (tiny_gpt2, dict(r=2, targets=("c_fc",), bias="lora_only"), "transformer.h.0.mlp.c_fc: trained bias"),
    (tiny_llama, dict(r=2, targets=("q",), modules_to_save=("lm_head",)), "lm_head: modules_to_save copy"),
    (tiny_llama, dict(r=2, targets=("q",), use_dora=True), "model.layers.0.self_attn.q_proj: DoRA magnitude"),
])
def test_parts_llama_cpp_cannot_hold_are_named(tmp_path, make, config, expected):
    reasons = refusals(_saved(tmp_path, make(), **config), None)
    assert any(expected in r for r in reasons), reasons


def test_plain_lora_has_no_refusal(tmp_path):
    assert refusals(_saved(tmp_path, tiny_llama(), r=2, targets=("q", "v")), None) == []


def test_non_lora_method_is_refused(tmp_path, capsys):
    model = tiny_gpt2()
    apply_method(model, "bitfit")
    save_method(model, tmp_path / "ad")
    code, err = _export(capsys, tmp_path / "ad", tmp_path / "a.gguf")
    assert code == 1 and "holds bitfit weights, not LoRA" in err


def test_adapter_of_another_base_is_refused(tmp_path, capsys, smollm2_path):
    model = tiny_llama()
    inject(model, LoraConfig(r=2, targets=("q",)))
    save_adapter(model, tmp_path / "ad")
    code, err = _export(capsys, tmp_path / "ad", tmp_path / "a.gguf", "--model", "smollm2-135m")
    assert code == 1 and "trained on a base with hidden_size=32, but smollm2-135m has hidden_size=576" in err


def test_gguf_of_another_vocabulary_is_refused(tmp_path, capsys, smollm2_path):
    adapter = make_adapter(tmp_path / "ad", r=2, targets=("q",))
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(other, arch="llama")
    writer.add_block_count(30)
    writer.add_embedding_length(576)
    writer.add_token_list([f"t{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.zeros((100, 576), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, err = _export(capsys, adapter, tmp_path / "a.gguf", "--base-gguf", str(other))
    assert code == 1 and "a vocabulary of 100 tokens, but the base has 49152" in err


def test_existing_output_is_kept(tmp_path, capsys):
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("not mine")
    code, err = _export(capsys, tmp_path, foreign)
    assert code == 1 and "already exists; pass --overwrite" in err
    code, err = _export(capsys, tmp_path, foreign, "--overwrite")
    assert code == 1 and "notes.gguf is not a GGUF file" in err
    assert foreign.read_text() == "not mine"


def test_dtype_must_suit_the_format(tmp_path, capsys):
    code, err = _export(capsys, tmp_path, tmp_path / "a.gguf", "--dtype", "q8_0")
    assert code == 1 and "--dtype 'q8_0' for --format gguf-adapter: choose from f32, f16, bf16" in err
    code = main(["export", "--adapter", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "m"),
                 "--requantize"])
    assert code == 1 and "--requantize applies to --format gguf only" in capsys.readouterr().err


def test_a_foreign_modelfile_beside_the_output_is_kept(tmp_path, capsys):
    (tmp_path / "smol.Modelfile").write_text("# my own\n")
    code = main(["export", "--adapter", str(tmp_path), "--format", "gguf", "--out", str(tmp_path / "smol.gguf"),
                 "--overwrite"])
    assert code == 1 and "smol.Modelfile is not a Modelfile lorakit wrote" in capsys.readouterr().err
    assert (tmp_path / "smol.Modelfile").read_text() == "# my own\n"


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    import errno

    from lorakit.io.outputs import write_file_atomically

    def write(tmp):
        tmp.write_bytes(b"GGUF partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"No space left on device"):
        write_file_atomically(tmp_path / "a.gguf", write)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_or_link_at_a_file_out_is_refused(tmp_path, capsys):
    (tmp_path / "d.gguf").mkdir()
    code, err = _export(capsys, tmp_path, tmp_path / "d.gguf", "--overwrite")
    assert code == 1 and "d.gguf is a folder; this format writes one file" in err
    real = tmp_path / "real.gguf"
    real.write_bytes(b"GGUF theirs")
    (tmp_path / "link.gguf").symlink_to(real)
    code, err = _export(capsys, tmp_path, tmp_path / "link.gguf", "--overwrite")
    assert code == 1 and "link.gguf is not a GGUF file" in err
    assert (tmp_path / "link.gguf").is_symlink() and real.read_bytes() == b"GGUF theirs"
