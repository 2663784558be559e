"""SFT data: strict loading, label masks against the real SmolLM2 chat template, the truncation rule,
splits, and a short training run + `lorakit eval --task sft` on a tiny Llama."""

from __future__ import annotations

import json
import warnings

import pytest

from lorakit.data import DataError
from lorakit.data.sft import SftRecord, encode_sft, load_sft, sft_splits
from train_util import base_cfg, chat, write_chat_folder, write_jsonl

IGNORE = -100


@pytest.fixture(scope="module")
def tok(smollm2_path):
    """SmolLM2's tokenizer as lorakit.io.models.load_model gives it: converted from the GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def test_smollm2_chat_template_survives_the_gguf_conversion(tok):
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_ids_to_tokens(tok("<|im_start|>", add_special_tokens=False)["input_ids"]) == ["<|im_start|>"]


# -- loading ----------------------------------------------------------------------------------------------
GOOD = {"prompt": "p", "completion": "c"}
BAD_RECORDS = [
    ("{not json", r"line 2: invalid JSON"),
    ("[1, 2]", r"line 2: expected a JSON object, got list"),
    ({"prompt": "p"}, r"line 2: missing key\(s\) \['completion'\]"),
    ({"prompt": "p", "completion": "c", "messages": []},
     r"line 2: has the keys of several formats \['messages', 'prompt-completion'\]"),
    ({"prompt": 3, "completion": "c"}, r"line 2: 'prompt' must be text, got int"),
    ({"prompt": "p", "completion": "  "}, r"line 2: empty completion"),
    ({"messages": "hi"}, r"line 2: 'messages' must be a non-empty list"),
    ({"messages": [{"content": "x"}]}, r"line 2: messages\[0\] must be an object with 'role' and 'content'"),
    (chat(("user", "q"), ("bot", "a")), r"line 2: messages\[1\] has role 'bot'"),
    ({"messages": [{"role": "user", "content": 5}]}, r"line 2: messages\[0\]: content must be text"),
    (chat(("user", "q"), ("system", "s"), ("assistant", "a")), r"line 2: messages\[1\] is a system message"),
    (chat(("user", "q"), ("assistant", "")), r"line 2: messages\[1\] is an empty assistant message"),
    (chat(("system", "s"), ("assistant", "a")), r"line 2: the first non-system message must be the user's"),
    (chat(("user", "q"), ("assistant", "a"), ("user", "again")), r"line 2: the last message must be the assistant's"),
]


@pytest.mark.parametrize("record, message", BAD_RECORDS)
def test_each_malformed_record_names_file_line_and_problem(tmp_path, record, message):
    # One format a file: a chat record follows a good chat record.
    good = chat(("user", "q"), ("assistant", "a")) if isinstance(record, dict) and "prompt" not in record and \
        "messages" in record else GOOD  # fmt: skip
    path = write_jsonl(tmp_path / "train.jsonl", [good, record])
    with pytest.raises(DataError, match=rf"train\.jsonl, {message}"):
        load_sft(path)


def test_tables_custom_fields_and_file_errors(tmp_path):
    (tmp_path / "a.csv").write_text('question,answer\n"Hi, you",Hello\n')
    (rec,) = load_sft(tmp_path / "a.csv", prompt_field="question", completion_field="answer")
    assert (rec.prompt, rec.completion, rec.source) == ("Hi, you", "Hello", f"{tmp_path / 'a.csv'}, line 2")
    (tmp_path / "b.tsv").write_text("prompt\tcompletion\nq\ta\textra\n")
    with pytest.raises(DataError, match=r"b\.tsv, line 2: expected 2 fields"):
        load_sft(tmp_path / "b.tsv")
    with pytest.raises(DataError, match=r"a\.csv, line 2: matches no known format \(keys found: \['answer', 'quest"):
        load_sft(tmp_path / "a.csv")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_sft(tmp_path / "c.txt")
    write_jsonl(tmp_path / "d.jsonl", [])
    with pytest.raises(DataError, match=r"d\.jsonl: no records"):
        load_sft(tmp_path / "d.jsonl")
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    write_jsonl(tmp_path / "e.jsonl", [{"conv": conv}])
    assert load_sft(tmp_path / "e.jsonl", messages_field="conv")[0].messages == (("user", "q"), ("assistant", "a"))


# -- label masks -----------------------------------------------------------------------------------------
def test_prompt_completion_mask_covers_completion_and_eos_only(tok):
    (row,) = encode_sft([SftRecord("f, line 1", prompt="Translate: chat ->", completion=" cat")], tok, 64)
    prompt = tok("Translate: chat ->", add_special_tokens=False)["input_ids"]
    completion = tok(" cat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["input_ids"] == prompt + completion
    assert row["labels"] == [IGNORE] * len(prompt) + completion
    assert row["prompt_length"] == len(prompt)


@pytest.mark.parametrize("system", [True, False])
def test_chat_mask_matches_the_template_token_by_token(tok, system):
    turns = [("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?"), ("assistant", "It is 6.")]
    if system:
        turns.insert(0, ("system", "Be brief."))
    record = SftRecord("f, line 1", messages=tuple(turns))
    (row,) = encode_sft([record], tok, 256)
    messages = [{"role": r, "content": c} for r, c in turns]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    whole = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    assert row["input_ids"] == whole["input_ids"]  # pieces tokenized apart = the template tokenized whole
    # Independently of the encoder: a token is a target iff it lies inside "content<|im_end|>\n" of an
    # assistant turn of the rendered text.
    spans, start = [], 0
    for role, content in turns:
        if role == "assistant":
            head = rendered.index("<|im_start|>assistant\n" + content, start) + len("<|im_start|>assistant\n")
            end = head + len(content) + len("<|im_end|>\n")
            spans.append((head, end))
            start = end
    expected = [any(a <= s < b for a, b in spans) for s, _ in whole["offset_mapping"]]
    assert [label != IGNORE for label in row["labels"]] == expected
    targets = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    assert tok.decode(targets) == "4.<|im_end|>\nIt is 6.<|im_end|>\n"
    if not system:  # the template's default system prompt is context, never a target
        assert "You are a helpful AI assistant" in tok.decode(row["input_ids"][: row["labels"].index(targets[0])])
    # Generation continues the conversation right after the last assistant header.
    assert tok.decode(row["input_ids"][: row["prompt_length"]]).endswith("And 3+3?<|im_end|>\n<|im_start|>assistant\n")


# -- the max_length rule ----------------------------------------------------------------------------------
def test_left_truncation_cuts_only_the_prompt_and_reports_the_count(tok):
    long_prompt = " ".join(f"word{i}" for i in range(60))
    records = [SftRecord("f, line 1", prompt="short:", completion=" yes"),
               SftRecord("f, line 2", prompt=long_prompt, completion=" the answer")]  # fmt: skip
    with pytest.warns(UserWarning, match=r"cut the prompt of 1 of 2 records .*first: f, line 2"):
        rows = encode_sft(records, tok, 24)
    completion = tok(" the answer", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = tok(long_prompt, add_special_tokens=False)["input_ids"]
    assert len(rows[1]["input_ids"]) == 24
    assert rows[1]["input_ids"] == prompt[len(prompt) + len(completion) - 24 :] + completion  # left end cut
    assert [t for t in rows[1]["labels"] if t != IGNORE] == completion  # completion whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encode_sft(records[:1], tok, 24)[0]["input_ids"] == rows[0]["input_ids"]  # untouched, silent


def test_refuse_and_a_completion_that_cannot_fit_are_errors_naming_the_record(tok):
    long_prompt = " ".join(f"word{i}" for i in range(60))
    records = [SftRecord("a.jsonl, line 1", prompt=long_prompt, completion=" x"),
               SftRecord("a.jsonl, line 7", prompt=long_prompt, completion=" y")]  # fmt: skip
    refused = r"2 of 2 records exceed max_length=24 .*'refuse': a\.jsonl, line 1 \(\d+ tokens\)"
    with pytest.raises(DataError, match=refused):
        encode_sft(records, tok, 24, truncation="refuse")
    huge = SftRecord("a.jsonl, line 3", prompt="q", completion=long_prompt)
    with pytest.raises(DataError, match=r"a\.jsonl, line 3: .*cannot fit max_length=24 by cutting the prompt"):
        encode_sft([huge], tok, 24)
    # A chat may lose context before its first assistant turn only; a later turn is never cut.
    chat = SftRecord("a.jsonl, line 4", messages=(("user", long_prompt), ("assistant", "ok"),
                                                   ("user", "more"), ("assistant", long_prompt)))  # fmt: skip
    with pytest.raises(DataError, match=r"line 4: .*cannot fit"):
        encode_sft([chat], tok, 80)


# -- splits -----------------------------------------------------------------------------------------------
def test_valid_is_carved_from_train_disjoint_by_prompt_and_test_falls_back(tmp_path):
    records = [{"prompt": f"q{i % 30}", "completion": f"a{i}"} for i in range(90)]  # 30 prompts x 3
    path = write_jsonl(tmp_path / "train.jsonl", records)
    fields = ("prompt", "completion", "messages")
    with pytest.warns(UserWarning, match=r"carved 9 of 90 records"):
        splits = sft_splits({"train": path, "valid": None, "test": None}, seed=0, fields=fields)
    train_prompts = {r.prompt for r in splits["train"]}
    valid_prompts = {r.prompt for r in splits["valid"]}
    assert len(valid_prompts) == 3 and not train_prompts & valid_prompts
    assert splits["test"] is splits["valid"]
    with pytest.raises(DataError, match=r"no train file"):
        sft_splits({"train": None, "valid": path}, seed=0, fields=fields)


# -- a run -----------------------------------------------------------------------------------------------
def test_sft_run_trains_on_chats_and_eval_scores_loss_and_generations(
    tiny_llama, tmp_path, one_thread, monkeypatch, capsys
):
    import lorakit.metrics.d2t
    from lorakit.cli.evaluate import eval_main
    from lorakit.training.trainer import train

    seen = {}

    def fake_d2t(hypotheses, references, seen=None):  # METEOR starts a JVM; real metrics: test_d2t.py
        seen_refs.update(h=list(hypotheses), r=[list(r) for r in references])
        return {"BLEU": 0.5, "METEOR": 0.25, "TER": 0.75}

    seen_refs = seen
    monkeypatch.setattr(lorakit.metrics.d2t, "d2t_metrics", fake_d2t)
    data = write_chat_folder(tmp_path / "chat")
    out = tmp_path / "run"
    cfg = base_cfg(model=str(tiny_llama), task="sft", data=str(data), out=str(out), max_length=96,
                   max_steps=3, num_beams=1, max_new_tokens=4, lr=1e-2)  # fmt: skip
    result = train(cfg)
    assert set(result) == {"loss", "perplexity", "BLEU", "METEOR", "TER"} and result["TER"] == 0.75
    assert seen["r"] == [["yes"], ["pink"]]  # the completion, and the chat's last assistant turn
    preds = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert [p["references"] for p in preds] == [["yes"], ["pink"]] and preds[0]["mr"] == "Say yes:"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "perplexity"} <= set(next(r for r in records if r["split"] == "valid"))
    capsys.readouterr()
    assert eval_main(["--model", str(tiny_llama), "--adapter", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again == pytest.approx(result)  # eval reads task, data and fields from the run's config


def test_test_file_is_an_alias_of_eval_file(tmp_path, monkeypatch):
    from lorakit.cli import evaluate as cli

    got = {}
    monkeypatch.setattr(cli, "evaluate_model", lambda cfg, adapter: (got.setdefault("cfg", cfg), ({}, []))[1])
    cli.eval_main(["--model", "m", "--task", "sft", "--data", str(tmp_path), "--test-file", "t.jsonl"])
    assert got["cfg"].eval_file == "t.jsonl"


# -- several answers to one prompt -------------------------------------------------------------------------
def _multi_answer_folder(tmp_path, chats: bool):
    def rec(prompt, answer):
        if chats:
            return chat(("user", prompt), ("assistant", answer))
        return {"prompt": prompt, "completion": f" {answer}"}

    test = [rec("Say yes:", "yes"), rec("Sky?", "blue"), rec("Sky?", "grey"), rec("Say no:", "no"),
            rec("Say yes:", "yes please")]  # fmt: skip
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "train.jsonl", [rec("Say yes:", "yes")] * 4)
    write_jsonl(tmp_path / "d" / "valid.jsonl", test)
    write_jsonl(tmp_path / "d" / "test.jsonl", test)
    return tmp_path / "d"


GROUPED = [["yes", "yes please"], ["blue", "grey"], ["no"]]


@pytest.mark.parametrize("chats", [False, True])
def test_an_eval_prompt_answered_several_times_is_one_example_with_every_answer(tmp_path, chats):
    from lorakit.data.sft import expand_references
    from lorakit.tasks import load_task

    data = load_task(base_cfg(task="sft", data=str(_multi_answer_folder(tmp_path, chats))))
    assert [r.references for r in data.eval] == GROUPED
    assert len(data.valid) == 5  # the validation loss still sees one row per record
    expanded = expand_references(data.eval)
    assert [r.references for r in expanded] == [[a] for answers in GROUPED for a in answers]
    if chats:
        assert [r.messages[:-1] for r in expanded] == [r.messages[:-1] for r in data.eval for _ in r.references]
    else:
        assert [r.completion for r in expanded] == [" yes", " yes please", " blue", " grey", " no"]


@pytest.mark.parametrize("chats", [False, True])
def test_sft_scoring_generates_once_per_prompt_against_all_answers(tiny_llama, tmp_path, one_thread, monkeypatch,
                                                                   chats):  # fmt: skip
    import torch

    import lorakit.metrics.d2t
    from lorakit.io.models import load_model
    from lorakit.tasks import load_task
    from lorakit.training.evaluate import mean_loss, score

    seen = {}

    def fake_d2t(hypotheses, references, seen=None):  # METEOR starts a JVM; real metrics: test_d2t.py
        seen_refs.update(h=list(hypotheses), r=[list(r) for r in references])
        return {"BLEU": 0.5}

    seen_refs = seen
    monkeypatch.setattr(lorakit.metrics.d2t, "d2t_metrics", fake_d2t)
    cfg = base_cfg(model=str(tiny_llama), task="sft", data=str(_multi_answer_folder(tmp_path, chats)),
                   max_length=96, num_beams=1, max_new_tokens=3)  # fmt: skip
    data = load_task(cfg)
    model, tok = load_model(tiny_llama)
    predictions = []
    with torch.no_grad():
        result = score(model, tok, data.spec, data.eval, cfg, torch.device("cpu"), predictions_out=predictions)
        every_record = mean_loss(model, tok, data.spec, data.valid, cfg, torch.device("cpu"))
    assert len(predictions) == 3 and seen["h"] == predictions and seen["r"] == GROUPED
    assert result["loss"] == pytest.approx(every_record, rel=1e-6)  # the loss covers all five answers


@pytest.mark.parametrize(("fraction", "carved"), [(0.0, 0), (0.25, 5)])
def test_sft_carves_the_valid_split_that_valid_split_asks_for(tmp_path, fraction, carved):
    from lorakit.tasks import load_task

    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"prompt": f"Say {i}:", "completion": f" {i}"} for i in range(20)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_task(base_cfg(task="sft", data=str(tmp_path / "d"), valid_split=fraction))
    assert (len(data.train), len(data.valid)) == (20 - carved, carved)
