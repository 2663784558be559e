"""``lorakit export --format gguf``: the base's own GGUF with only the merged weights replaced, and an
Ollama Modelfile beside it."""

from __future__ import annotations

import gguf
import numpy as np
from transformers import AutoConfig

from export_util import make_adapter
from lorakit import read_adapter
from lorakit.cli import main
from lorakit.export.llama_cpp_names import layout_of, unpermute_rows
from lorakit.export.merged import load_merged
from lorakit.export.ollama import CHATML_TEMPLATE
from lorakit.io.models import builtin_gguf


def _deq(tensor) -> np.ndarray:
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def test_q8_0_export_replaces_only_the_merged_weights(tmp_path, smollm2_path, capsys):
    adapter = make_adapter(tmp_path / "ad", r=4, alpha=8.0, targets=("q", "v"))
    out = tmp_path / "smol.gguf"
    assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--dtype", "q8_0", "--out", str(out)]) == 0
    assert "60 changed tensors in q8_0" in capsys.readouterr().out
    base, new = gguf.GGUFReader(builtin_gguf("smollm2-135m")), gguf.GGUFReader(out)
    assert {k: f.contents() for k, f in base.fields.items() if not k.startswith("GGUF.")} == \
        {k: f.contents() for k, f in new.fields.items() if not k.startswith("GGUF.")}
    old = {t.name: t for t in base.tensors}
    changed = {t.name for t in new.tensors if t.tensor_type != old[t.name].tensor_type
               or not np.array_equal(t.data, old[t.name].data)}
    assert changed == {f"blk.{i}.attn_{p}.weight" for i in range(30) for p in "qv"}
    assert {t.tensor_type.name for t in new.tensors if t.name in changed} == {"Q8_0"}
    merged = load_merged(read_adapter(adapter), adapter, "smollm2-135m").model.state_dict()
    layout = layout_of(AutoConfig.from_pretrained(smollm2_path))
    written = {t.name: t for t in new.tensors}
    for i in (0, 29):
        q = unpermute_rows(_deq(written[f"blk.{i}.attn_q.weight"]), layout.n_head)
        want = merged[f"model.layers.{i}.self_attn.q_proj.weight"].numpy()
        # Q8_0: one fp16 scale per 32 values, 127 steps each side of zero: half a step, plus the scale's rounding
        step = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(q - want).reshape(-1, 32) <= step * 0.6)


def test_modelfile_names_the_file_its_chat_format_and_stop_tokens(tmp_path, smollm2_path, capsys):
    adapter = make_adapter(tmp_path / "ad", r=2, targets=("q",))
    out = tmp_path / "smol.gguf"
    assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--out", str(out)]) == 0
    text = (tmp_path / "smol.Modelfile").read_text()
    assert text.startswith("FROM ./smol.gguf\n")
    assert f'TEMPLATE """{CHATML_TEMPLATE}"""' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.endswith('PARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"\n')
    assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--out", str(out)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
