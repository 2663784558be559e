"""Bring-your-own-data: formats (Alpaca, ShareGPT, OpenAI messages with tools), file types (JSONL, JSON,
CSV/TSV, Parquet, Arrow, save_to_disk), chat templates under control, the defects of issue 32, all on
SmolLM2's real tokenisation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from lorakit.data import DataError
from lorakit.data.chat_templates import CHAT_TEMPLATES, read_chat_template, saved_chat_template
from lorakit.data.formats import ALPACA_PROMPT
from lorakit.data.sft import SftRecord, chat_eos_note, encode_sft, load_sft
from lorakit.data.text import MAX_RECORD_CHARS, load_text_classification
from train_util import base_cfg

IGNORE = -100


@pytest.fixture
def tok(smollm2_path):
    """A fresh SmolLM2 tokenizer (tests replace its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _targets(row: dict) -> list[int]:
    return [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]


# -- defects ---------------------------------------------------------------------------------------------
def test_labels_meaning_one_value_are_one_class(tmp_path):
    rows = [{"text": f"t{i}", "label": v} for i, v in enumerate([0, "0", 1, "1", 1.0, 0.0])]
    examples, names = load_text_classification(_jsonl(tmp_path / "a.jsonl", rows))
    assert names == ["0", "1"] and [e.label for e in examples] == [0, 0, 1, 1, 1, 0]


def test_labels_mixing_booleans_with_numbers_are_refused_at_the_line(tmp_path):
    values = [0, "0", 1, "1", 1.0, True, 0.0, False]
    path = _jsonl(tmp_path / "b.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(values)])
    with pytest.raises(DataError, match=r"b\.jsonl, line 6: label true mixes JSON booleans .*line 1 has 0"):
        load_text_classification(path)


def test_unterminated_quote_is_reported_where_it_opens(tmp_path):
    lines = ["text,label", '"oops,1'] + [f"row {i},0" for i in range(21)]
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"c\.csv, line 2: expected 2 fields .* an unterminated quote\?"):
        load_text_classification(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("prompt,completion\n" + '"oops,1\n' + "a,b\n" * 21)
    with pytest.raises(DataError, match=r"d\.csv, line 2: .*unterminated quote"):
        load_sft(tmp_path / "d.csv", data_format="prompt-completion")


def test_a_huge_single_line_record_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    with path.open("w") as fh:
        fh.write(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
        fh.write('{"prompt": "' + "x" * (MAX_RECORD_CHARS + 10) + '", "completion": "c"}\n')
    with pytest.raises(DataError, match=rf"big\.jsonl, line 2: record longer than {MAX_RECORD_CHARS:,} characters"):
        load_sft(path)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["p", "y" * (MAX_RECORD_CHARS + 1)], "completion": ["c", "c"]}),
                   tmp_path / "big.parquet")  # fmt: skip
    with pytest.raises(DataError, match=r"big\.parquet, row 2: record longer than"):
        load_sft(tmp_path / "big.parquet")


RAISING = "{{ raise_exception('this template takes no system turn') }}"


def test_a_raising_chat_template_is_one_line_in_train_and_generate(tok):
    from lorakit.generation import encode_prompt

    tok.chat_template = RAISING
    record = SftRecord("f.jsonl, line 3", messages=(("user", "q"), ("assistant", "a")))
    with pytest.raises(DataError, match=r"^f\.jsonl, line 3: the chat template refused the conversation: this "
                       r"template takes no system turn$"):  # fmt: skip
        encode_sft([record], tok, 64)
    with pytest.raises(DataError, match=r"^the chat template refused the conversation: this template takes"):
        encode_prompt(tok, "hi", chat=True)


@pytest.mark.parametrize("task", ["webnlg", "dart"])
def test_webnlg_and_dart_fit_their_default_length_on_the_shipped_files(shared_data, tok, task):
    from lorakit.tasks import load_task
    from lorakit.training.config import TrainConfig
    from lorakit.training.defaults import resolve_task_defaults
    from lorakit.training.evaluate import encode

    cfg = TrainConfig(task=task, data=str(shared_data / task))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the carving notice
        data = load_task(cfg)
    cfg = resolve_task_defaults(cfg, data.spec.kind, data.spec.recipe)
    assert cfg.max_length == 512
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is cut
        rows = encode(data.spec, data.train, tok, cfg.max_length, cfg.truncation)
    assert len(rows) == len(data.train) and max(len(r["input_ids"]) for r in rows) > 128
    for row, item in zip(rows[:50], data.train):  # the reference is whole, with EOS
        assert tok.decode(_targets(row)) == f" {item.references[0].strip()}{tok.eos_token}"


# -- formats ---------------------------------------------------------------------------------------------
def test_alpaca_joins_as_stanford_alpaca_and_trains_only_the_output(tmp_path, tok):
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Add.", "input": "2+2", "output": "4", "system": "You add numbers."},
    ]
    summary: list[str] = []
    recs = load_sft(_jsonl(tmp_path / "a.jsonl", rows), summary=summary)
    assert summary == [f"{tmp_path / 'a.jsonl'}: 3 records, format alpaca (detected): 3 pairs"]
    assert recs[0].prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                              "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    assert recs[1].prompt.endswith("### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n")
    assert recs[1].prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert recs[2].prompt == ALPACA_PROMPT[True].format(preamble="You add numbers.", instruction="Add.", input="2+2")
    for rec, row in zip(recs, encode_sft(recs, tok, 128)):
        prompt = tok(rec.prompt, add_special_tokens=False)["input_ids"]
        completion = tok(rec.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row["input_ids"] == prompt + completion
        assert row["labels"] == [IGNORE] * len(prompt) + completion


def test_sharegpt_maps_roles_and_masks_like_the_same_messages(tmp_path, tok):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4."}, {"from": "user", "value": "3+3?"},
            {"from": "assistant", "value": "6."}]  # fmt: skip
    (share,) = load_sft(_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}]))
    turns = (("system", "Be brief."), ("user", "2+2?"), ("assistant", "4."), ("user", "3+3?"),
             ("assistant", "6."))
    assert share.messages == turns
    (row,) = encode_sft([share], tok, 256)
    whole = tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False)
    assert row["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]
    assert tok.decode(_targets(row)) == "4.<|im_end|>\n6.<|im_end|>\n"
    (sys_field,) = load_sft(_jsonl(tmp_path / "t.jsonl", [{"system": "Be brief.", "conversations": conv[1:]}]))
    assert sys_field.messages == turns


def test_messages_with_text_parts_are_joined(tmp_path, tok):
    parts = [{"type": "text", "text": "Line one."}, {"type": "text", "text": "Line two."}]
    rec = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": [parts[0]]}]}
    (got,) = load_sft(_jsonl(tmp_path / "m.jsonl", [rec]))
    assert got.messages == (("user", "Line one.\nLine two."), ("assistant", "Line one."))
    image = {"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match=r"line 1: messages\[0\]: content has \['image_url'\] parts"):
        load_sft(_jsonl(tmp_path / "i.jsonl", [image]))


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TOOL_CHAT = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18}'},
        {"role": "assistant", "content": "It is 18 degrees."},
    ],
}  # fmt: skip


def test_tool_calls_need_a_template_that_renders_tools(tmp_path, tok):
    (rec,) = load_sft(_jsonl(tmp_path / "t.jsonl", [TOOL_CHAT]))
    assert rec.calls_tools and json.loads(rec.tools) == TOOLS
    with pytest.raises(DataError, match=r"t\.jsonl, line 1: the record has tools or tool calls, and the chat "
                       r"template does not render tools; pass --chat-template"):  # fmt: skip
        encode_sft([rec], tok, 512)


def test_tool_calls_train_the_call_and_the_reply_not_the_result(tmp_path, tok):
    tok.chat_template = read_chat_template("chatml-tools")
    (rec,) = load_sft(_jsonl(tmp_path / "t.jsonl", [TOOL_CHAT]))
    (row,) = encode_sft([rec], tok, 512)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
         {"role": "tool", "content": '{"temp": 18}'}, {"role": "assistant", "content": "It is 18 degrees."}],
        tools=TOOLS, tokenize=False)  # fmt: skip
    whole = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    assert row["input_ids"] == whole["input_ids"]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    spans = [(rendered.index(call), rendered.index(call) + len(call))]
    reply = "It is 18 degrees.<|im_end|>\n"
    spans.append((rendered.rindex(reply), rendered.rindex(reply) + len(reply)))
    expected = [any(a <= s < b for a, b in spans) for s, _ in whole["offset_mapping"]]
    assert [label != IGNORE for label in row["labels"]] == expected  # token by token
    assert "18}" not in tok.decode(_targets(row))  # the tool's result is context


def test_sharegpt_function_call_and_observation_become_a_tool_exchange(tmp_path):
    conv = [{"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "18"}, {"from": "gpt", "value": "18 degrees."}]  # fmt: skip
    (rec,) = load_sft(_jsonl(tmp_path / "f.jsonl", [{"conversations": conv, "tools": json.dumps(TOOLS)}]))
    assert [m[0] for m in rec.messages] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(rec.messages[1][2]) == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


BAD = [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
     r"line 1, turn 1: unknown ShareGPT role 'robot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
     r"line 1: conversations\[1\] is an empty assistant message"),
    ({"messages": TOOL_CHAT["messages"][:2] + TOOL_CHAT["messages"][3:]},
     r"line 1: messages\[2\]: 1 tool call\(s\) before it have no tool result"),
    ({"messages": [TOOL_CHAT["messages"][0], TOOL_CHAT["messages"][2], TOOL_CHAT["messages"][3]]},
     r"line 1: messages\[1\] is a tool result without a matching tool call"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, r"line 1: a preference record .* needs a preference \(DPO\)"),
    ({"question": "q", "answer": "a"}, r"line 1: matches no known format \(keys found: \['answer', 'question'\]\)"),
    ({"instruction": "", "output": "a"}, r"line 1: empty 'instruction'"),
]  # fmt: skip


@pytest.mark.parametrize("record, message", BAD)
def test_bad_records_get_one_clear_line(tmp_path, record, message):
    with pytest.raises(DataError, match=rf"bad\.jsonl, {message}"):
        load_sft(_jsonl(tmp_path / "bad.jsonl", [record]))


def test_mixed_formats_bom_and_bytes_are_refused(tmp_path):
    path = _jsonl(tmp_path / "mix.jsonl", [{"prompt": "p", "completion": "c"}, {"instruction": "i", "output": "o"}])
    with pytest.raises(DataError, match=r"mix\.jsonl, line 2: a alpaca record in a prompt-completion file"):
        load_sft(path)
    good = json.dumps({"prompt": "p", "completion": "c"})
    (tmp_path / "bom.jsonl").write_text("\ufeff" + good + "\n" + "\ufeff" + good + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bom\.jsonl, line 2: a byte-order mark"):
        load_sft(tmp_path / "bom.jsonl")  # the first line's BOM is the file's own and is accepted
    (tmp_path / "bytes.jsonl").write_bytes(good.encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bytes\.jsonl, line 2: not valid UTF-8"):
        load_sft(tmp_path / "bytes.jsonl")


def test_explicit_format_and_field_map(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "Hi?", "answer": "Hello", "context": "greeting"}])
    (rec,) = load_sft(path, field_map=["instruction=question", "output=answer", "input=context"])
    assert rec.prompt.endswith("### Instruction:\nHi?\n\n### Input:\ngreeting\n\n### Response:\n")
    with pytest.raises(DataError, match=r"missing 'conversations' for the sharegpt format"):
        load_sft(path, data_format="sharegpt")
    with pytest.raises(DataError, match=r"--field-map 'nope=x': expected KEY=NAME"):
        load_sft(path, field_map=["nope=x"])


# -- file types ------------------------------------------------------------------------------------------
ROWS = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe")]


def _written(tmp_path: Path, kind: str) -> Path:
    pa = pytest.importorskip("pyarrow")
    table = pa.Table.from_pylist(ROWS)
    path = tmp_path / f"train.{kind}"
    if kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind in ("csv", "tsv"):
        sep = "," if kind == "csv" else "\t"
        path.write_text(sep.join(ROWS[0]) + "\n" + "".join(sep.join(r.values()) + "\n" for r in ROWS))
    elif kind == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif kind == "arrow":
        import pyarrow.feather as feather

        feather.write_feather(table, path)
    else:
        _jsonl(path, ROWS)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "tsv", "parquet", "arrow"])
def test_every_file_type_reads_the_same_records(tmp_path, kind):
    recs = load_sft(_written(tmp_path, kind))
    assert [(r.prompt, r.completion) for r in recs] == [(r.prompt, r.completion) for r in load_sft(
        _jsonl(tmp_path / "ref.jsonl", ROWS))]  # fmt: skip
    unit = "line" if kind in ("jsonl", "csv", "tsv") else "row" if kind in ("parquet", "arrow") else "record"
    assert recs[1].source.endswith(f"train.{kind}, {unit} {3 if kind in ('csv', 'tsv') else 2}")  # after a header


def test_a_save_to_disk_folder_gives_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    from lorakit.tasks import load_task
    from lorakit.training.config import TrainConfig

    more = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(6)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS + more),
                               "validation": datasets.Dataset.from_list(ROWS[:2]),
                               "test": datasets.Dataset.from_list(ROWS[2:])})  # fmt: skip
    dd.save_to_disk(str(tmp_path / "ds"))
    data = load_task(TrainConfig(task="sft", data=str(tmp_path / "ds")))
    assert (len(data.train), len(data.valid), len(data.eval)) == (9, 2, 1)
    assert data.eval[0].source == f"{tmp_path / 'ds'}[test], row 1"
    assert any("ds[train]: 9 records, format alpaca (detected)" in n for n in data.notes)


# -- chat templates --------------------------------------------------------------------------------------
def test_registry_templates_render_prefix_by_prefix_and_the_eos_rule(tok):
    chat = SftRecord("f", messages=(("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Ciao")))
    for name in ("chatml", "llama-3", "mistral", "gemma"):
        tok.chat_template = read_chat_template(name)
        (row,) = encode_sft([chat], tok, 128)
        targets = _targets(row)
        assert targets[-1] == tok.eos_token_id or tok.eos_token_id in targets  # the model learns to stop
        note = chat_eos_note(tok)
        # SmolLM2's EOS is <|im_end|>: chatml ends turns with it; the others' end-of-turn strings are not it,
        # so EOS is appended (TRL's rule) and the run says so. mistral's template emits eos_token itself.
        assert (note is None) == (name in ("chatml", "mistral")), name
        if note:
            assert targets[-1] == tok.eos_token_id and "appending it" in note


def test_chat_template_file_and_unknown_name(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(CHAT_TEMPLATES["chatml"])
    assert read_chat_template(str(path)) == CHAT_TEMPLATES["chatml"]
    with pytest.raises(DataError, match=r"--chat-template 'nope' is neither a known template \(chatml, "):
        read_chat_template("nope")


def test_a_run_saves_its_chat_template_and_generate_and_serve_use_it(tmp_path, tiny_llama, one_thread):
    from lorakit.cli.generate import load_for_generation
    from lorakit.serve.server import build
    from lorakit.training.trainer import train

    data = tmp_path / "d"
    data.mkdir()
    rows = [{"conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]}
            for i in range(12)]  # fmt: skip
    _jsonl(data / "train.jsonl", rows)
    out = tmp_path / "run"
    train(base_cfg(model=str(tiny_llama), task="sft", data=str(data), out=str(out), max_length=64, max_steps=1,
                   num_beams=1, max_new_tokens=2, chat_template="gemma"))  # fmt: skip
    assert saved_chat_template([out]) == CHAT_TEMPLATES["gemma"]
    _, tokenizer = load_for_generation(str(tiny_llama), [("default", str(out))], "cpu")
    assert tokenizer.chat_template == CHAT_TEMPLATES["gemma"]
    _, served, _ = build(str(tiny_llama), {"a": str(out)})
    assert served.chat_template == CHAT_TEMPLATES["gemma"]


# -- lorakit data inspect --------------------------------------------------------------------------------
def test_data_inspect_marks_the_trained_tokens_and_counts_lengths(tmp_path, capsys, smollm2_path):
    from lorakit.cli import main

    rows = [{"instruction": "Say it.", "input": f"word {i}", "output": f"Word {i}."} for i in range(10)]
    _jsonl(tmp_path / "train.jsonl", rows)
    _jsonl(tmp_path / "valid.jsonl", rows[:2])
    assert main(["data", "inspect", "--model", "smollm2-135m", "--task", "sft", "--data", str(tmp_path),
                 "-n", "1", "--max-length", "40"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"note: {tmp_path / 'train.jsonl'}: 10 records, format alpaca (detected): 10 pairs"
    assert out[1] == f"note: {tmp_path / 'valid.jsonl'}: 2 records, format alpaca (detected): 2 pairs"
    assert out[2].startswith("note: sft: cut the prompt of 10 of 10 records from the left to fit max_length=40")
    assert out[3].startswith("--- record 1 of 10: 40 tokens ---")
    assert "\n".join(out).count("[[") == 1 and "### Response:\n[[Word 0.<|im_end|>]]" in "\n".join(out)
    assert out[-1].startswith("--- 10 records; tokens per record: min ") and "cut to fit: 10 (100.0%)" in out[-1]
    capsys.readouterr()
    assert main(["data", "inspect", "--model", "smollm2-135m", "--task", "sft", "--data", str(tmp_path),
                 "-n", "1", "--tokens"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    starred = [line for line in lines if line[14:15] == "*"]
    assert [line.split()[-1] for line in starred][-3:] == ["'0'", "'.'", "'<|im_end|>'"]  # " Word 0." + EOS
    assert "cut to fit: 0 (0.0%)" in lines[-1]
