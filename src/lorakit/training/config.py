"""TrainConfig: every knob of a training run, from a TOML/YAML file and command-line overrides.

Precedence: dataclass defaults < config file < command line. Every field is a flag (``r`` → ``--r``,
``weight_decay`` → ``--weight-decay``). An unknown key in a file is an error naming it, the closest known
key and the full list, because a silently ignored typo ("learning_rate = 1e-5") wastes a whole run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.io.fsutil import file_mode
from lorakit.lora.config import DEFAULT_INIT
from lorakit.training.coerce import coerce_value, read_config_file

SCHEDULES = ("linear", "cosine", "constant")
CLASS_WEIGHTS = ("auto", "none", "balanced")
DEVICES = ("auto", "cpu", "cuda")
KEEP_CHOICES = ("best", "last")
BASE_DTYPES = ("fp32", "bf16", "fp16")
TRACKERS = ("tensorboard", "mlflow", "wandb")


def _f(default: Any, help_: str) -> Any:
    """A dataclass field (immutable default) carrying its command-line help text."""
    return field(default=default, metadata={"help": help_})


@dataclass
class TrainConfig:
    """One training run. ``batch_size`` is the *global* batch per optimizer step: it is split over
    processes (data parallel) and then into ``grad_accum`` micro-batches, so changing either never
    changes the optimisation."""

    # -- what ------------------------------------------------------------------------------------------
    model: str = _f("minilm-l6", "built-in model name (minilm-l6, smollm2-135m), local folder or hub id")
    task: str = _f(
        "", "glue task (sst2, mrpc, cola, rte, stsb, qnli, qqp, mnli), 'text' (CSV/TSV/JSONL), 'e2e', "
        "'webnlg', 'dart' or 'sft' (prompt/completion or chat JSONL/CSV/TSV)"
    )
    data: str = _f(
        "", "data directory (GLUE task folder, E2E folder) or, for 'text', a folder or a train file"
    )
    method: str = _f(
        "lora", "training method (lorakit.methods): lora, full (all weights), head (classifier head only), fttop2, "
        "bitfit, adapter_h, adapter_l, adapter_p, prefix_embed, prefix_layer (docs/methods.md)"
    )
    method_options: list[str] | None = field(
        default=None,
        metadata={"help": "method-specific settings as key=value pairs (baselines, docs/methods.md)"},
    )
    out: str = _f("runs/run", "output directory")
    # -- LoRA ------------------------------------------------------------------------------------------
    r: int = _f(8, "LoRA rank")
    alpha: float = _f(16.0, "LoRA alpha (scaling = alpha / r)")
    targets: list[str] = field(
        default_factory=lambda: ["q", "v"],
        metadata={"help": "modules to adapt: aliases (q,k,v,o,ffn), names, suffixes or regexes"},
    )
    dropout: float = _f(0.0, "LoRA dropout on the adapter input")
    model_dropout: float | None = _f(
        None, "the base model's own dropout (hidden, attention, head) while training; none: as its config says. "
        "0 suits one-epoch runs, and on CPU lets attention take PyTorch's fused kernel (docs/training.md)"
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "modules trained in full and saved with the adapter (default: the classifier head)"
        },
    )
    use_rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")
    init: str | None = _f(
        None, "LoRA init: gaussian (paper; the default) or kaiming (A random, B zero; RTE's recipe); pissa or "
        "olora (A and B from W0's SVD / QR, W0 replaced by the residual; saved as a plain LoRA of the original "
        "base, docs/variants.md)"
    )
    train_pooler: bool | None = _f(
        None, "train a BERT-family model's pretrained pooler with the new classifier head when modules_to_save "
        "is not given (default: yes; RTE's recipe: no)"
    )
    use_dora: bool = _f(False, "DoRA: a trained magnitude per output times the direction of W0 + s·B·A")
    exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "patterns removed again from the targeted modules (each must remove one)"},
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "block indices to adapt, e.g. 0,1,5 (default: every block)"}
    )
    quantize: str | None = _f(
        None, "quantize the frozen base's linear layers: nf4 or int8 (QLoRA; heads stay dense, docs/quantization.md)"
    )
    # -- optimisation ----------------------------------------------------------------------------------
    lr: float | None = _f(
        None, "peak learning rate (AdamW); default: the task kind's (classification/regression 1e-3, "
        "generation 5e-4, preference 2e-4; full and fttop2 fine-tuning 5e-5), see docs/training.md"
    )
    head_lr_ratio: float | None = _f(
        None, "lr multiplier for task heads trained with an adapter (modules_to_save); default: 10 for "
        "classification (a fresh head on a pretrained pooler needs larger steps; RTE 1), lowered so that "
        "the head's lr stays at most 1e-2 (but not below 1), 1 otherwise (docs/training.md)"
    )
    loraplus_ratio: float | None = _f(
        None, "LoRA+: LoRA's B matrices learn at this many times the lr of A (PEFT's loraplus_lr_ratio; "
        "the paper suggests 16); none: one lr for both (docs/training.md)"
    )
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    batch_size: int = _f(16, "global batch per optimizer step (split over processes and micro-batches)")
    grad_accum: int = _f(1, "micro-batches per optimizer step (memory only; the optimisation is unchanged)")
    epochs: float = _f(3.0, "passes over the training set (ignored when max_steps is set)")
    max_steps: int | None = _f(None, "optimizer steps to run (overrides epochs)")
    warmup_ratio: float = _f(0.06, "linear warm-up as a fraction of all steps")
    warmup_steps: int | None = _f(None, "linear warm-up in steps (overrides warmup_ratio)")
    schedule: str = _f("linear", "learning-rate schedule after warm-up: linear, cosine or constant")
    clip_norm: float | None = _f(1.0, "clip the gradient norm to this value (none: no clipping)")
    label_smoothing: float = _f(
        0.0, "label smoothing for classification losses; for dpo's sigmoid loss, cDPO's share of flipped labels"
    )
    class_weights: str = _f(
        "auto", "classification loss weights: none, balanced (each class weighs the same) or auto "
        "(balanced for tasks scored by Matthews correlation, i.e. CoLA)"
    )
    seed: int = _f(0, "seed for initialisation, data order and dropout")
    # -- data ------------------------------------------------------------------------------------------
    max_length: int | None = _f(
        None, "maximum tokens per example (inputs are truncated; default: 128, and 512 for webnlg and dart, "
        "whose triple sets are long)"
    )
    max_train_samples: int | None = _f(None, "use a fixed random subset of this many training examples")
    max_eval_samples: int | None = _f(
        None, "evaluate on a fixed random subset of this many examples (E2E: MRs)"
    )
    max_valid_samples: int | None = _f(
        200, "validate during training on a fixed random subset of this many examples (generation tasks: "
        "(input, reference) pairs; none: all); GLUE validates on its dev set"
    )
    split_seed: int = _f(0, "seed for subsets and carved splits (kept apart from 'seed' so runs compare)")
    valid_split: float = _f(
        0.1, "share of train carved as the validation split when there is no valid/dev file (0: train "
        "without validation)"
    )
    eval_split: str | None = _f(
        None, "split scored at the end (default: dev for GLUE, test for E2E and text)"
    )
    train_file: str | None = _f(None, "training file, overriding the one found in 'data'")
    valid_file: str | None = _f(None, "validation file used during training (E2E/text)")
    eval_file: str | None = _f(None, "file scored at the end (GLUE: dev file; E2E: test file)")
    text_column: str = _f("text", "text classification: column with the text")
    text_pair_column: str | None = _f(None, "text classification: optional column with the second text")
    label_column: str = _f("label", "text classification: column with the label")
    label_names: list[str] | None = field(
        default=None,
        metadata={"help": "text classification: the label set (default: labels in the train file)"},
    )
    # -- SFT (prompt/completion or chat records) -------------------------------------------------------
    prompt_field: str = _f("prompt", "sft: key/column holding the prompt")
    completion_field: str = _f("completion", "sft: key/column holding the completion")
    messages_field: str = _f("messages", "sft: key holding a chat's [{role, content}] messages")
    truncation: str = _f(
        "left", "sft, e2e, webnlg, dart: a record over max_length loses prompt tokens from the left ('left') or "
        "stops the run ('refuse'); completions and references are never cut"
    )
    format: str = _f(
        "auto", "sft: record format, auto (detected per file), prompt-completion, alpaca, sharegpt or messages"
    )
    field_map: list[str] | None = field(
        default=None,
        metadata={"help": "sft: format keys renamed as KEY=NAME, comma-separated (instruction=question,"
                          "output=answer; keys: instruction input output system conversations tools ...)"},
    )  # fmt: skip
    chat_template: str | None = _f(
        None, "sft: chat template for chat records, a name (chatml, chatml-tools, llama-3, mistral, gemma) or a "
        "Jinja file; saved with the adapter and used again by eval, generate and serve (default: the tokenizer's "
        "own)"
    )
    # -- preference tuning (dpo / orpo) ---------------------------------------------------------------
    beta: float = _f(0.1, "dpo: beta, the weight of the KL term (orpo: lambda, the odds-ratio weight)")
    pref_loss: str | None = _f(
        None, "dpo loss: sigmoid (DPO; the default), ipo, hinge or orpo (reference-free); task orpo: orpo"
    )
    init_adapter: str | None = _f(
        None, "dpo/orpo: start from this LoRA adapter (an SFT run's folder); it keeps training, and a frozen copy "
        "of it is the reference model (docs/training.md)"
    )
    length_grouping: bool = _f(
        False, "batch examples of similar length together (less padding; deterministic and resumable)"
    )
    packing: bool = _f(
        False, "causal LM (sft, e2e, webnlg, dart): pack several records into each row of max_length, kept "
        "apart (positions restart, no attention across records); batch_size then counts rows"
    )
    group_window: int = _f(
        50, "length grouping sorts within windows of this many batches: smaller keeps batches closer to random "
        "(where length predicts the label), larger pads less"
    )
    # -- evaluation and generation ---------------------------------------------------------------------
    eval_interval: int = _f(0, "evaluate every N optimizer steps (0: at the end of each epoch only)")
    eval_batch_size: int = _f(32, "batch size for evaluation (generation: MRs per batch)")
    num_beams: int = _f(10, "beam size for generation (the LoRA paper: 10)")
    length_penalty: float = _f(0.8, "beam-search length penalty (the LoRA paper: 0.8)")
    no_repeat_ngram_size: int = _f(4, "forbid repeating n-grams of this size in generation (paper: 4)")
    max_new_tokens: int = _f(64, "longest generated text, in tokens")
    early_stopping_patience: int = _f(
        0, "stop after this many validations in a row without an improvement of at least early_stopping_delta "
        "(0: never stop early)"
    )
    early_stopping_delta: float = _f(0.0, "the smallest change of the selection metric that counts as an improvement")
    keep: str | None = _f(
        None, "which adapter the run publishes: best (the validation that scored best) or last; default: best when "
        "the task has a validation split (docs/training.md)"
    )
    select_metric: str | None = _f(
        None, "the validation metric that picks the best step (default: the first one validation reports: loss "
        "for generation tasks, accuracy or the task's first GLUE metric otherwise)"
    )
    # -- checkpoints and logging -----------------------------------------------------------------------
    save_interval: int = _f(0, "write a resumable checkpoint every N optimizer steps (0: each epoch end)")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep (0: keep all)")
    log_interval: int = _f(10, "log the mean training loss every N optimizer steps")
    tensorboard: bool = _f(False, "also write TensorBoard event files (the same as --report-to tensorboard)")
    report_to: list[str] | None = field(
        default=None,
        metadata={"help": "trackers that also record the run: tensorboard, mlflow, wandb (comma-separated; "
                          "pip install 'lorakit[track]')"},
    )
    plot: bool = _f(True, "write a loss/metric plot (training.png) at the end")
    # -- hardware --------------------------------------------------------------------------------------
    device: str = _f("auto", "auto, cpu or cuda")
    bf16: bool = _f(False, "bfloat16 autocast for the forward pass (weights and optimizer stay fp32)")
    base_dtype: str | None = _f(
        None, "dtype the frozen base is loaded in: fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA); "
        "trained parameters, optimizer state and the loss stay fp32"
    )
    gradient_checkpointing: bool | None = _f(
        None, "recompute activations in the backward pass to save memory (default: on with --quantize, as "
        "QLoRA and PEFT's prepare_model_for_kbit_training do; off otherwise)"
    )
    return_freed_memory: bool | None = _f(
        None, "glibc: give freed tensor memory back to the OS at once (lower peak RSS, slower steps; default: "
        "on with --quantize, off otherwise; docs/quantization.md)"
    )
    compile: bool = _f(
        False, "torch.compile the transformer blocks for training steps (a one-off compile of minutes, then "
        "faster steps and less activation memory; evaluation stays eager)"
    )
    fsdp: bool = _f(False, "shard the model with FSDP across processes (for bases too big for one device)")

    def __post_init__(self) -> None:
        lists = ("targets", "modules_to_save", "label_names", "method_options", "exclude", "report_to", "field_map")
        for name in lists:
            value = getattr(self, name)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if value is not None:
                setattr(self, name, [str(v) for v in value])
        if self.layers is not None:
            self.layers = coerce_value("layers", self.layers, list[int], "TrainConfig")
        self.validate()

    def validate(self) -> None:
        """Range checks that need no files; the trainer checks data and model before training."""
        check_finite_and_patterns(self)
        if not self.task:
            raise ConfigError("task is required (e.g. --task rte, --task e2e or --task text)")
        if not self.data and not self.train_file:
            raise ConfigError("data is required: --data DIR (or --train-file FILE for task 'text')")
        self._check_counts()
        self._check_rates()
        self._check_choices()

    def _check_counts(self) -> None:
        positive = ("r", "batch_size", "grad_accum", "max_length", "eval_batch_size", "num_beams", "max_new_tokens",
                    "log_interval", "group_window")  # fmt: skip
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("max_steps", "max_train_samples", "max_eval_samples", "max_valid_samples", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "warmup_steps" else 1):
                raise ConfigError(f"{name} must be positive, got {value!r}")
        for name in ("eval_interval", "save_interval", "keep_checkpoints", "no_repeat_ngram_size",
                     "early_stopping_patience", "early_stopping_delta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_steps is None and not self.epochs > 0:
            raise ConfigError(f"epochs must be positive (or set max_steps), got {self.epochs!r}")

    def _check_rates(self) -> None:
        if not ((self.lr is None or self.lr > 0) and self.alpha > 0):
            raise ConfigError("lr and alpha must be positive")
        if not 0.0 <= self.valid_split < 1.0:
            raise ConfigError(f"valid_split must be in [0, 1), got {self.valid_split!r}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be a finite positive number, got {self.beta!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("dropout and label_smoothing must be in [0, 1)")
        if self.model_dropout is not None and not 0.0 <= self.model_dropout < 1.0:
            raise ConfigError(f"model_dropout must be in [0, 1) or none, got {self.model_dropout!r}")
        if self.head_lr_ratio is not None and not self.head_lr_ratio > 0:
            raise ConfigError(f"head_lr_ratio must be positive, got {self.head_lr_ratio!r}")
        if self.loraplus_ratio is not None and not (self.loraplus_ratio > 0 and math.isfinite(self.loraplus_ratio)):
            raise ConfigError(f"loraplus_ratio must be a positive number, got {self.loraplus_ratio!r}")
        if self.loraplus_ratio is not None and self.method != "lora":
            raise ConfigError(f"loraplus_ratio applies to LoRA's B matrices; method {self.method!r} has none")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"clip_norm must be positive or none, got {self.clip_norm!r}")

    def _check_choices(self) -> None:
        choices = (("schedule", SCHEDULES), ("device", DEVICES), ("class_weights", CLASS_WEIGHTS),
                   ("truncation", ("left", "refuse")), ("keep", (None, *KEEP_CHOICES)),
                   ("base_dtype", (None, *BASE_DTYPES)),
                   ("format", ("auto", "prompt-completion", "alpaca", "sharegpt", "messages")),
                   ("pref_loss", (None, "sigmoid", "ipo", "hinge", "orpo")))  # fmt: skip
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {[a for a in allowed if a]}, got {getattr(self, name)!r}")
        unknown = [t for t in self.report_to or () if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"report_to: unknown tracker(s) {unknown}; choose from {list(TRACKERS)}")
        if self.keep == "best" and self.fsdp:
            raise ConfigError("keep best is not supported with fsdp yet (the best step's shards are not kept)")
        if self.compile and self.fsdp:
            raise ConfigError("compile and fsdp cannot be combined yet: drop --compile or --fsdp")
        self._check_lora_variants()

    def _check_lora_variants(self) -> None:
        """init / use_dora / exclude / layers: LoraConfig's own checks, run now rather than at injection."""
        from lorakit.lora.config import INIT_KINDS, LoraConfig

        if self.init is not None and self.init not in INIT_KINDS:
            raise ConfigError(f"init must be one of {list(INIT_KINDS)}, got {self.init!r}")
        variants = {"use_dora": self.use_dora, "exclude": self.exclude, "layers": self.layers,
                    "init": self.init if self.init in ("pissa", "olora") else None}  # fmt: skip
        variants["quantize"] = self.quantize
        given = [name for name, value in variants.items() if value]
        if self.quantize is not None:
            from lorakit.quant.linear import get_scheme

            get_scheme(self.quantize)  # a ConfigError naming nf4 / int8
        if self.method != "lora":
            if given:
                raise ConfigError(f"{', '.join(given)}: LoRA settings, which method {self.method!r} does not use")
            return
        LoraConfig(
            r=self.r, alpha=self.alpha, targets=tuple(self.targets), init=self.init or DEFAULT_INIT,  # type: ignore[arg-type]
            use_rslora=self.use_rslora, use_dora=self.use_dora, exclude=tuple(self.exclude),
            layers=None if self.layers is None else tuple(self.layers),
        )  # fmt: skip

    # -- (de)serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """Every field's default value (what a saved config from before a field existed meant by it)."""
        return {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            for f in fields(cls)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping; keys may use '-' or '_'. Unknown keys are an error naming them."""
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        check_keys(data, source)
        hints = typing.get_type_hints(TrainConfig)
        return cls(**{k: coerce_value(k, v, hints[k], source) for k, v in data.items()})

    def save(self, path: str | Path) -> Path:
        """Write the resolved config as JSON, atomically (temp file + rename)."""
        return write_json_atomic(path, self.to_dict())


def check_finite_and_patterns(cfg: TrainConfig) -> None:
    """Every float field finite, every target a valid pattern: checked before the range checks, because
    ``inf`` passes "> 0" (an lr of inf trains to NaN) and ``nan`` fails no comparison at all.

    Args:
        cfg: the config to check.

    Raises:
        ConfigError: naming the field and its value.
        TargetError: naming a target that is not a valid regular expression.
    """
    from lorakit.lora.targets import check_target_pattern

    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
    for pattern in (*cfg.targets, *cfg.exclude):
        check_target_pattern(pattern)


# Names users bring from transformers/PEFT scripts, and ours.
FAMILIAR_NAMES = {
    "learning_rate": "lr", "lora_alpha": "alpha", "lora_r": "r", "rank": "r", "lora_dropout": "dropout",
    "target_modules": "targets", "output_dir": "out", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
    "max_grad_norm": "clip_norm", "warmup": "warmup_ratio", "lr_scheduler_type": "schedule",
    "model_name_or_path": "model", "data_dir": "data", "max_seq_length": "max_length",
}  # fmt: skip


def check_keys(data: dict[str, Any], source: str) -> None:
    known = TrainConfig.field_names()
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = (
                [FAMILIAR_NAMES[key]] if key in FAMILIAR_NAMES else difflib.get_close_matches(key, known, n=1)
            )
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}; known keys: {', '.join(known)}")


def resolve_config(config_file: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < file < overrides (strings from the command line, coerced per field)."""
    data: dict[str, Any] = {}
    if config_file is not None:
        data.update({str(k).replace("-", "_"): v for k, v in read_config_file(config_file).items()})
        check_keys(data, str(config_file))
    data.update(overrides)
    return TrainConfig.from_dict(data, source=str(config_file or "command line"))


def json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN (an undefined score) or ±inf → None, so the JSON written is strict (``null``, not ``NaN``)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """JSON to ``path`` via a temp file in the same folder and os.replace: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would make this file unlike the run's other files
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
