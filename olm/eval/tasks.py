"""olm's own downstream tasks, built from the embedded corpus's held-out files, so that every run has a downstream
metric with nothing to download.

The items come from the stdlib files in the val split at ``val_fraction=0.05`` (the default): files no default run
trains on, and held out at any larger ``data.val_fraction`` too (a file in the val split at 0.05 stays there).
They are written as lm-eval task YAMLs over local JSONL files (``dataset_path: json`` with ``data_files``) under
``<cache dir>/eval-tasks/<key>/``, the key hashing the corpus and this module's source (the recipe), so they are
rebuilt only when either changes. Every choice below is seeded by the file names and line numbers, never by a
random state.

- ``olm_next_line`` (multiple choice, 4 options; chance 25%): the 3 to 8 lines before a line of a source file; the
  options are the true next line and three lines drawn from other held-out files. ``acc`` compares summed
  log-likelihoods, ``acc_norm`` those per byte (lm-eval's normalisation). Measures whether the model follows the
  code's local structure (indentation, the statement a block needs next) and meaning (the names in play). An
  untrained model scores 0.29 / 0.23 on the 1000 items: its random preferences favour some line lengths, so
  ``acc_norm`` is the one to read at small scale (tests/test_eval.py checks it is at chance untrained and above
  chance after a few hundred steps).
- ``olm_identifier`` (log-likelihood, greedy match; chance ~0): up to 400 characters of source ending just before
  an identifier of at least 6 characters that already occurs in those characters; ``acc`` is 1 when greedy
  decoding reproduces the identifier exactly, ``perplexity`` is over the identifier's tokens. Measures copying
  names from context, the in-context skill small code models learn first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

RECIPE_VERSION = 4  # lm-eval's task version in the YAMLs; bump when the items change meaning
VAL_FRACTION = 0.05
ITEMS = 1000  # per task; --limit picks the first N, which are spread over all held-out files
SHIPPED = ("olm_next_line", "olm_identifier")
GROUP = "olm"  # the two tasks together: --tasks olm (no averaged metric: their metrics measure different things)


def unknown_olm_task(names: list[str]) -> str | None:
    """The first name in olm's namespace (``olm*``) that is not one of olm's tasks, else None: such a typo is
    answered before lm-eval (and its index of thousands of tasks) is loaded. Other names are lm-eval's to resolve."""
    return next((name for name in names if name.startswith("olm") and name not in (*SHIPPED, GROUP)), None)
IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_.])[A-Za-z_][A-Za-z0-9_]{5,}")
KEYWORDS = {"return", "import", "lambda", "except", "assert", "global", "finally", "continue", "nonlocal", "raise"}


def _rank(*parts) -> int:
    return int(hashlib.sha1(repr(parts).encode()).hexdigest()[:12], 16)


def _candidate(line: str) -> bool:
    text = line.strip()
    return len(text) >= 16 and not text.startswith("#") and '"""' not in text and "'''" not in text


def next_line_items(files: dict[str, list[str]], n: int = ITEMS) -> list[dict]:
    """``files``: name -> lines (no newlines). Items of the next-line task, in a fixed order."""
    pool = [(name, i) for name, lines in files.items() for i, line in enumerate(lines) if _candidate(line)]
    items = []
    for name, lines in files.items():
        for i, line in enumerate(lines):
            if i < 3 or not _candidate(line) or all(not lines[j].strip() for j in range(i - 3, i)):
                continue
            picked: list[str] = []
            probe = _rank("distractor", name, i)
            for step in range(min(len(pool), 64)):  # a few probes find three in all but tiny pools
                f, j = pool[(probe + step * 7919) % len(pool)]
                if f != name and files[f][j] != line and files[f][j] not in picked:
                    picked.append(files[f][j])
                    if len(picked) == 3:
                        break
            if len(picked) < 3:
                continue
            label = _rank("label", name, i) % 4
            choices = picked[:label] + [line] + picked[label:]
            start = max(0, i - 8)
            context = "\n".join(lines[start:i]) + "\n"
            items.append({"id": f"{name}:{i + 1}", "context": context, "choices": choices, "label": label,
                          "order": _rank("item", name, i)})
    return _spread(items, n)


def identifier_items(files: dict[str, str], n: int = ITEMS, width: int = 400) -> list[dict]:
    """``files``: name -> text. Items of the identifier task, in a fixed order."""
    items = []
    for name, text in files.items():
        for match in IDENTIFIER.finditer(text):
            word, start = match.group(), match.start()
            if word in KEYWORDS or start < width // 2:
                continue
            begin = text.rfind("\n", 0, max(0, start - width)) + 1 if start > width else 0
            context = text[begin:start]
            if len(context) > width:
                context = context[context.find("\n") + 1:] if "\n" in context else context[-width:]
            if not IDENTIFIER.search(context) or word not in context:
                continue
            items.append({"id": f"{name}:{start}", "context": context, "target": word,
                          "order": _rank("item", name, start)})
    return _spread(items, n)


def _spread(items: list[dict], n: int) -> list[dict]:
    """``n`` items taken round-robin over the files (each file's items in hash order), so that every prefix
    (``--limit``) samples the held-out files alike and no long file dominates."""
    by_file: dict[str, list[dict]] = {}
    for item in sorted(items, key=lambda item: item["order"]):
        by_file.setdefault(item["id"].rsplit(":", 1)[0], []).append(item)
    queues = [by_file[name] for name in sorted(by_file, key=lambda name: _rank("file", name))]
    chosen: list[dict] = []
    depth = 0
    while len(chosen) < n and any(depth < len(q) for q in queues):
        chosen += [q[depth] for q in queues if depth < len(q)][: n - len(chosen)]
        depth += 1
    return [{k: v for k, v in item.items() if k != "order"} for item in chosen]


TASK_YAML = {
    "olm_next_line": """task: olm_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
""",
    "olm_identifier": """task: olm_identifier
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: context
doc_to_target: target
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: {version}
""",
}
GROUP_YAML = """group: olm
task:
  - olm_next_line
  - olm_identifier
metadata:
  version: {version}
"""


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # concurrent builders (ranks, sweep jobs) each write whole files


def shipped_tasks_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of olm's task YAMLs and data (built on first use): give it to lm-eval as ``--include_path``."""
    from olm.data.corpus import StdlibCorpus, _read_text
    from olm.data.tokenizers import default_cache_dir

    corpus = StdlibCorpus(VAL_FRACTION)
    recipe = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()  # any edit of this recipe rebuilds the items
    key = hashlib.sha1(f"{corpus.fingerprint()}-{recipe}-{ITEMS}".encode()).hexdigest()[:16]
    folder = Path(cache_dir or default_cache_dir()) / "eval-tasks" / key
    done = folder / "olm.yaml"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    texts = {name: _read_text(corpus.root / name) for name in corpus.files("val")}
    lines = {name: text.splitlines() for name, text in texts.items()}
    data = {"olm_next_line": next_line_items(lines), "olm_identifier": identifier_items(texts)}
    for task, items in data.items():
        jsonl = folder / f"{task}.jsonl"
        _write(jsonl, "".join(json.dumps(item) + "\n" for item in items))
        _write(folder / f"{task}.yaml", TASK_YAML[task].format(data=json.dumps(str(jsonl)), version=RECIPE_VERSION))
    _write(done, GROUP_YAML.format(version=RECIPE_VERSION))  # last: its presence means the folder is complete
    return folder
