"""The bench's markdown report: one section per kind of case, the targets table and the failed cases."""

from __future__ import annotations

from typing import Any

from lorakit.bench.verdicts import compiled_note, cpu_median, ok_results, train_key


def _ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def _load(r: dict[str, Any]) -> str:
    return f"{r['loadavg_before'][0]:.1f}/{r['loadavg_after'][0]:.1f}"


def _header(report: dict[str, Any]) -> list[str]:
    """Command, date, machine and load."""
    meta = report["meta"]
    m = meta["machine"]
    return [
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['cpu_capability']}), device {m['device']}; "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}  ",
        f"Load average (1/5/15 min) at start {_fmt_load(meta['loadavg_start'])}, "
        f"at end {_fmt_load(meta['loadavg_end'])}; per row: 1-min load before/after the case.",
        "",
    ]


def _train_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Train step rows, one process each, with the ratios against PEFT."""
    out: list[str] = []
    train = [r for r in ok_results(results) if r["case"]["kind"] == "train" and r["case"]["group"] == "train"]
    if train:
        c0 = train[0]["case"]
        out += [
            f"### Train step (forward + backward + AdamW), batch {c0['batch']} x {c0['seq']}",
            "",
            "| model | method | precision | loss | median s | min s | CPU s | vs PEFT same precision | "
            "vs PEFT fp32 | peak RSS MB | step mem MB | trainable | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        ratios = report["summary"]["ratios"].get("train", {})
        for r in train:
            c = r["case"]
            entry = ratios.get(train_key(c), {}) if c["method"] == "lorakit" else {}
            cols = []
            for k in ("vs_peft_same_precision", "vs_peft_fp32"):
                v = entry.get(k)
                cols.append(
                    f"{v['time']:.2f}x wall, {v['cpu_time']:.2f}x CPU, {v['step_memory']:.2f}x step mem, "
                    f"{v['peak_rss']:.2f}x peak"
                    if v
                    else ""
                )
            out.append(
                f"| {c['model']} | {_method_label(c)} | {c['precision']} | {c['loss']} | "
                f"{r['median_s']:.3f} | {r['min_s']:.3f} | {cpu_median(r):.3f} | {cols[0]} | {cols[1]} | "
                f"{r['peak_rss_mb']:.0f} | "
                f"{r['delta_rss_mb']:.0f} | {r['trainable']:,} | {_load(r)} |"
            )
        out += [
            "",
            "step mem = peak RSS during the measured steps minus RSS once the model was loaded and set up. "
            "CPU s = median CPU seconds of the process per step (with one thread: the work, without the "
            "time spent waiting for a core).",
            "loss `labels` = `lorakit.lora.kernels.causal_lm_loss` (LM head + softmax only where labels are, "
            f"chunked; {train[0].get('labelled_fraction', 0):.0%} of positions are labelled, E2E-style "
            "packing); `model` = `model(**batch, labels=...).loss`.",
            "GPT-2: lorakit adapts the q and v thirds of `c_attn` with one rank-r pair each (as the paper); "
            "PEFT can only adapt all of `c_attn` with one rank-r pair spanning q, k and v. Same parameter "
            "count and FLOPs, different update.",
            "",
        ]
    return out


def _pairs_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """lorakit vs PEFT interleaved in one process."""
    out: list[str] = []
    pairs = [r for r in ok_results(results) if r["case"]["kind"] == "pair"]
    if pairs:
        out += [
            "### lorakit vs PEFT, interleaved in one process on shared frozen weights",
            "",
            "| model | comparison | lorakit | PEFT | lorakit median s | PEFT median s | paired ratio | "
            "ratio of mins | CPU-time ratio | load |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in pairs:
            c, o = r["case"], r["case"]["other"]
            st = r.get("ratio_stats", {})
            out.append(
                f"| {c['model']} | {c['id'].rsplit('/', 1)[-1]} | "
                f"{c['precision']}, {c['loss']} loss{compiled_note(c)} | "
                f"{o['precision']}, {o['loss']} loss | {r['mine']['median_s']:.3f} | "
                f"{r['other']['median_s']:.3f} | {r['ratio']:.3f} | {st.get('of_min', float('nan')):.3f} | "
                f"{st.get('cpu_paired', float('nan')):.3f} | {_load(r)} |"
            )
        out += [
            "",
            "ratio = lorakit / PEFT step time (< 1: lorakit faster). CPU-time ratio uses this process's CPU "
            "seconds per step, which waiting for a busy core does not inflate.",
            "",
        ]
    return out


def _infer_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Inference forward: each variant against the plain model."""
    out: list[str] = []
    infer = [r for r in ok_results(results) if r["case"]["kind"] == "infer"]
    if infer:
        out += [
            f"### Inference forward, seq {infer[0]['case']['seq']}",
            "",
            "| model | batch | variant | median ms | min ms | plain model median ms | overhead (paired) | "
            "peak RSS MB | load |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in infer:
            c = r["case"]
            variant = "plain model (noise floor)" if c["method"] == "base" else f"{c['method']} {c['mode']}"
            out.append(
                f"| {c['model']} | {c['batch']} | {variant} | {_ms(r['median_s'])} | {_ms(r['min_s'])} | "
                f"{_ms(r['base']['median_s'])} | {r['overhead']:+.1%} | {r['peak_rss_mb']:.0f} | {_load(r)} |"
            )
        out.append("")
    return out


def _mixed_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Mixed-adapter batches against one adapter and the plain model."""
    out: list[str] = []
    mixed = [r for r in ok_results(results) if r["case"]["kind"] == "mixed"]
    if mixed:
        c0 = mixed[0]["case"]
        out += [
            f"### Mixed-adapter batches ({c0['batch']} x {c0['seq']} tokens, r={c0['r']} on "
            f"{', '.join(c0['targets'])})",
            "",
            "| model | library | adapters | mixed ms | one adapter ms | plain model ms | mixed / one | "
            "mixed / plain | load |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mixed:
            c = r["case"]
            out.append(
                f"| {c['model']} | {c['method']} | {c['n_adapters']} | {_ms(r['median_s'])} | "
                f"{_ms(r['single']['median_s'])} | {_ms(r['base']['median_s'])} | "
                f"{r['mixed_over_single']:.2f} | {r['mixed_over_base']:.2f} | {_load(r)} |"
            )
        out.append("")
    return out


def _ops_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Merge / unmerge and load-and-switch."""
    out: list[str] = []
    ops = [r for r in ok_results(results) if r["case"]["kind"] in ("merge", "switch")]
    if ops:
        out += [
            "### Merge / unmerge (all adapted layers) and load-and-switch to an adapter file",
            "",
            "| model | library | operation | median ms | min ms | load |",
            "|---|---|---|---|---|---|",
        ]
        for r in ops:
            c = r["case"]
            targets = f"r={c['r']} on {', '.join(c['targets'])}"
            if c["kind"] == "merge":
                out.append(
                    f"| {c['model']} | {c['method']} | merge ({targets}) | {_ms(r['median_s'])} | "
                    f"{_ms(r['min_s'])} | {_load(r)} |"
                )
                if "merge_unchecked" in r:
                    u = r["merge_unchecked"]
                    out.append(
                        f"| {c['model']} | {c['method']} | merge(check=False) | {_ms(u['median_s'])} | "
                        f"{_ms(u['min_s'])} | {_load(r)} |"
                    )
                out.append(
                    f"| {c['model']} | {c['method']} | unmerge | {_ms(r['unmerge']['median_s'])} | "
                    f"{_ms(r['unmerge']['min_s'])} | {_load(r)} |"
                )
            else:
                out.append(
                    f"| {c['model']} | {c['method']} | load file + switch ({targets}) | "
                    f"{_ms(r['median_s'])} | {_ms(r['min_s'])} | {_load(r)} |"
                )
        out.append("")
    return out


def _scaling_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Train steps across model sizes."""
    out: list[str] = []
    scaling = [r for r in ok_results(results) if r["case"]["group"] == "scaling"]
    if scaling:
        out += [
            "### Scaling (train step, batch 4 x 128)",
            "",
            "| model | params | method | precision | loss | r | trainable | median s | CPU s | peak RSS MB | "
            "step mem MB | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in scaling:
            c = r["case"]
            out.append(
                f"| {c['model']} | {r['params'] / 1e6:.0f}M | {c['method']} | {c['precision']} | "
                f"{c['loss']} | {c['r']} | {r['trainable']:,} | {r['median_s']:.3f} | {cpu_median(r):.3f} | "
                f"{r['peak_rss_mb']:.0f} | {r['delta_rss_mb']:.0f} | {_load(r)} |"
            )
        out.append("")
    return out


def _quality_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Equal-quality runs: train and held-out losses."""
    out: list[str] = []
    quality = [r for r in ok_results(results) if r["case"]["kind"] == "quality"]
    if quality:
        out += [
            "### Equal quality: same start, same E2E batches, AdamW lr 1e-3",
            "",
            "| model | lorakit | PEFT | steps | start loss | lorakit final train loss | "
            "PEFT final train loss | lorakit held-out loss | PEFT held-out loss | held-out difference |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in quality:
            c, o = r["case"], r["case"]["other"]
            out.append(
                f"| {c['model']} | {c['precision']}, {c['loss']} loss | {o['precision']}, {o['loss']} loss "
                f"| {c['repeats']} | {r['start_loss']:.4f} | {r['final_train_loss']['mine']:.4f} | "
                f"{r['final_train_loss']['other']:.4f} | {r['held_out_loss']['mine']:.4f} | "
                f"{r['held_out_loss']['other']:.4f} | {r['held_out_rel_diff']:+.2%} |"
            )
        out += [
            "",
            "final train loss = mean of the last 5 steps; held-out loss in fp32 on an unseen batch.",
            "",
        ]
    return out


def _checks_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Every target with its value and whether it is met."""
    out: list[str] = []
    checks = report["summary"]["targets"]
    if checks:
        out += ["### Targets", "", "| target | value | limit | met | note |", "|---|---|---|---|---|"]
        out += [
            f"| {t['target']} | {t['value']:.3f} | {t['limit']} | {'yes' if t['met'] else '**no**'} | {t['note']} |"
            for t in checks
        ]
        out.append("")
    return out


def _errors_section(results: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """Cases that failed."""
    out: list[str] = []
    errors = [r for r in results if "error" in r]
    if errors:
        out += ["### Failed cases", ""] + [f"- `{r['id']}`: {r['error']}" for r in errors] + [""]
    return out


SECTIONS = (
    _train_section, _pairs_section, _infer_section, _mixed_section, _ops_section, _scaling_section,
    _quality_section, lambda results, report: _tokens_table(results), _checks_section, _errors_section,
)  # the report's tables, in order


def render_markdown(report: dict[str, Any]) -> str:
    """The bench report as Markdown: a header, then one table per kind of case present, then the targets.

    Args:
        report: ``{"meta", "results", "summary"}`` as ``bench_main`` writes it.
    """
    out = _header(report)
    for section in SECTIONS:
        out += section(report["results"], report)
    return "\n".join(out)


def _fmt_load(load: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def _method_label(c: dict[str, Any]) -> str:
    if c["method"] == "full":
        return "full FT"
    label = f"{c['method']} LoRA"
    if c["method"] == "lorakit" and c["loss"] == "labels" and c["precision"] == "fp32":
        # the trainer's default precision is fp32; --compile is its opt-in for long runs
        label += " (default path + --compile)" if c.get("compile") else " (default path)"
    return label


def _tokens_table(results: list[dict[str, Any]]) -> list[str]:
    """The useful-tokens section: tokens/s, padding and held-out loss of each side."""
    rows = [r for r in ok_results(results) if r["case"]["kind"] == "tokens"]
    if not rows:
        return []
    out = ["### Useful tokens per second: length-grouped vs random batches vs PEFT (same start, same steps)", "",
           "| model | data | side | useful tok/s | padding | median step s | held-out loss |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        c = r["case"]
        for side, v in r["sides"].items():
            out.append(f"| {c['model']} | {c['data']} | {side} | {v['useful_tok_s']:.0f} | {v['pad_share']:.1%} | "
                       f"{v['median_s']:.2f} | {v['held_out_loss']:.4f} |")  # fmt: skip
    return [*out, "", "PEFT runs its plain loop (model(labels=...).loss); lorakit its default path.", ""]
