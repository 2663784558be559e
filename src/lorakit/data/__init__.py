"""Task data: strict loaders for GLUE, E2E, WebNLG/DART, SFT and plain text-classification files, plus tokenization
and collation helpers. Loaders are plain Python (lists of dataclasses); torch is only needed for
the ``collate_*`` functions."""

from lorakit.data.collate import (
    IGNORE_INDEX,
    collate_causal_lm,
    collate_classification,
    encode_classification,
    encode_e2e_for_training,
    encode_e2e_prompt,
    encoded_rows,
)
from lorakit.data.e2e import E2E_ROLES, E2EItem, e2e_prompt, e2e_splits, e2e_training_pairs, load_e2e
from lorakit.data.glue import GLUE_TASKS, GlueTask, get_glue_task, glue_split_exists, glue_task_names, load_glue
from lorakit.data.sft import SftRecord, encode_sft, load_sft
from lorakit.data.text import DataError, Example, load_text_classification
from lorakit.data.webnlg import D2TItem, linearise, load_dart, load_webnlg

__all__ = [
    "E2E_ROLES",
    "GLUE_TASKS",
    "IGNORE_INDEX",
    "D2TItem",
    "DataError",
    "E2EItem",
    "Example",
    "GlueTask",
    "SftRecord",
    "collate_causal_lm",
    "collate_classification",
    "e2e_prompt",
    "e2e_splits",
    "e2e_training_pairs",
    "encode_classification",
    "encode_e2e_for_training",
    "encode_e2e_prompt",
    "encode_sft",
    "encoded_rows",
    "get_glue_task",
    "glue_split_exists",
    "glue_task_names",
    "linearise",
    "load_dart",
    "load_e2e",
    "load_glue",
    "load_sft",
    "load_text_classification",
    "load_webnlg",
]
