"""One frame for every study of the experiment half.

A study is a frozen config dataclass, whose fields hold every choice of one run, each
written once with its help text and choices (:func:`option`), and a :class:`Study` over
it: one results file per run, ``FOLDER/RUN_ID.json`` named by the config's
``run_id()``; the check of whether a stored file is the same run or another
(:meth:`Study.status`, :meth:`Study.finished`); a loader (:meth:`Study.load`); a writer
that never replaces another run's file unless told to (:meth:`Study.save`). The
command lines are derived from the dataclasses (:func:`add_options`, :func:`picked`,
:func:`grid`).

The studies on it: Table 2 (:class:`~smaso.experiment.config.RunConfig`,
:data:`~smaso.experiment.store.TABLE2`), the activation study of chapter 7
(:mod:`~smaso.experiment.activation_study`) and the convolution study of chapter 6
(:mod:`~smaso.experiment.convstudy`). A study's results folder is passed in, or is the
book's, found from the project root in one place (:func:`smaso.records.book_results`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..records import write_json_atomic

__all__ = [
    "ResultsError",
    "Study",
    "add_options",
    "config_from_dict",
    "config_to_dict",
    "grid",
    "help_of",
    "option",
    "picked",
    "read_json",
    "read_record",
]


class ResultsError(ValueError):
    """A results file that cannot be read, or that holds another configuration than the
    one asked for."""


def option(default, help, choices=None, *, row=False, kind=None, filled=None):
    """A config field with what the command line needs: its ``help``, its ``choices``
    (a registry of the package), whether it is set per ``row`` of a grid (the study's
    command line then takes a list of values), how a list is parsed (``kind``:
    "names", "floats", "seeds") and, for a ``None`` default, what fills it
    (``filled``, shown in the help)."""
    meta = {"help": help, "choices": choices, "row": row, "kind": kind}
    return field(default=default, metadata={**meta, "filled": filled})


def help_of(f: dataclasses.Field) -> str:
    """A field's help text with its default (a tuple comma-separated)."""
    if f.metadata.get("filled"):
        return f"{f.metadata['help']} (default: {f.metadata['filled']})"
    if f.default is None:
        return f.metadata["help"]
    d = f.default
    shown = ",".join(map(str, d)) if isinstance(d, tuple) else d
    return f"{f.metadata['help']} (default: {shown})"


def config_to_dict(config) -> dict:
    """``config`` as its results file holds it (tuples become lists, as in JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls, d: dict):
    """The ``cls`` config of the dict ``d`` (a stored config that predates a field gets
    its default); ``ValueError`` naming unknown fields."""
    if not isinstance(d, dict):
        raise ValueError(f"a {cls.__name__} must be a dict, got {type(d).__name__}")
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)


def read_json(path: Path):
    """The JSON of a results file; ``ResultsError`` naming the file (left in place) if
    it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(
            f"results file {path} is corrupt (not valid JSON: {e}); it was left in "
            "place. Move it away (and rerun that configuration) or restore it."
        ) from None


def read_record(path: Path) -> dict:
    """A study's results file: a JSON object with a ``config``; ``ResultsError``
    naming the file (left in place) otherwise."""
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ResultsError(f"{path} is not a results file (no config); left in place")
    return record


@dataclass(frozen=True)
class Study:
    """The results of one study: one JSON file per run, ``FOLDER/RUN_ID.json``.

    Args:
        config: the study's config dataclass: frozen, with a ``run_id()`` that names
            the run's file; its fields made with :func:`option`.
        folder: where the runs are stored unless a call names another folder (None:
            every call must name one).
        read: the reader of one file, which raises :class:`ResultsError` for a file
            that is not one of the study's (default: :func:`read_record`).
        pattern: the glob of the study's files in the folder.

    Example:
        >>> from smaso.experiment.convstudy import CNN, CnnRun
        >>> CNN.path(CnnRun("bcop", seed=1)).name
        'cnn-bcop-seed1.json'
    """

    config: type
    folder: Path | None = None
    read: Callable[[Path], dict] = read_record
    pattern: str = "*.json"

    def _folder(self, folder) -> Path:
        folder = self.folder if folder is None else folder
        if folder is None:
            raise ValueError(f"no results folder given for {self.config.__name__}")
        return Path(folder)

    def path(self, config, folder=None) -> Path:
        """The results file of ``config``."""
        return self._folder(folder) / f"{config.run_id()}.json"

    def same(self, record: dict, config) -> bool:
        """Whether a stored ``record`` is the run of ``config`` (its stored config,
        completed with the fields added since, is ``config``)."""
        try:
            stored = config_from_dict(self.config, record["config"])
        except (TypeError, ValueError):
            return False
        return config_to_dict(stored) == config_to_dict(config)

    def status(self, config, folder=None) -> str:
        """ "missing", "same" (a stored run of ``config``) or "different" (a file of
        that name that is another run, or no results file)."""
        path = self.path(config, folder)
        if not path.exists():
            return "missing"
        try:
            return "same" if self.same(self.read(path), config) else "different"
        except ResultsError:
            return "different"

    def finished(self, config, folder=None) -> dict | None:
        """The stored results of ``config``, or None if it has none;
        :class:`ResultsError` for a file of its name that is another run."""
        path = self.path(config, folder)
        if not path.exists():
            return None
        record = self.read(path)
        if not self.same(record, config):
            raise ResultsError(
                f"{path} holds another configuration than {config.run_id()}; it was "
                "left in place"
            )
        return record

    def load(self, folder=None) -> list[dict]:
        """Every results file of the study in the folder, sorted by name (hidden files
        and failure records ``*.failed.json`` left out); a corrupt one raises
        :class:`ResultsError` naming it."""
        folder = self._folder(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no results folder {folder}")
        return [
            self.read(p)
            for p in sorted(folder.glob(self.pattern))
            if not p.name.startswith(".") and not p.name.endswith(".failed.json")
        ]

    def save(self, config, record: dict, folder=None, *, force=False) -> Path:
        """Write ``record`` (a dict whose ``config`` is ``config``'s) as the results
        of ``config``, atomically. A stored file of another run is never replaced
        unless ``force``."""
        path = self.path(config, folder)
        if not force and self.status(config, folder) == "different":
            raise FileExistsError(
                f"{path} holds another run; pass force=True (--force) to replace it"
            )
        write_json_atomic(path, record, overwrite=True)
        return path

    def clashes(self, configs, folder=None) -> list[Path]:
        """The files that runs of ``configs`` would replace: stored other runs."""
        return [
            self.path(c, folder)
            for c in configs
            if self.status(c, folder) == "different"
        ]


# --------------------------------------------------------------------------------------
# command lines derived from the config dataclasses


def _list_of(cast, what):
    """A parser of a comma-separated list of ``cast`` values (``what`` they are)."""

    def parse(text):
        try:
            return tuple(cast(v) for v in text.split(",") if v)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse


def _seeds(text):
    """ "5" -> seeds 0..4; "0,3,7" -> those seeds."""
    try:
        if "," in text:
            return tuple(int(v) for v in text.split(",") if v)
        if int(text) < 1:
            raise ValueError
        return tuple(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a seed count (5: seeds 0-4) or a list (0,3,7; 0, for seed 0), "
            f"got {text!r}"
        ) from None


def _names(allowed):
    def parse(text):
        names = tuple(v for v in text.split(",") if v)
        bad = [v for v in names if v not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {bad or text!r}; choose from {', '.join(allowed)}"
            )
        return names

    return parse


_KINDS = {
    "floats": _list_of(float, "numbers"),
    "seeds": _seeds,
    "ints": _list_of(int, "integers"),
}
_TYPES = {"str": str, "int": int, "float": float}


def _base(f) -> str:
    return str(f.type).split("|")[0].split("[")[0].strip()


def add_options(group, fields, *, rows=False) -> None:
    """One option per dataclass field: its type, choices and help from the field.
    Options not given are not set, so the dataclass's defaults apply. With ``rows``, a
    per-row field ``name`` is the option ``--names``, a comma-separated list (each
    value one row of the grid; seeds also as a count). Fields without a help text
    (set by the study itself) get no option."""
    for f in fields:
        if "help" not in f.metadata:
            continue
        choices, kind = f.metadata.get("choices"), f.metadata.get("kind")
        flag = f.name + ("s" if rows and f.metadata.get("row") else "")
        kw = dict(dest=flag, default=argparse.SUPPRESS, help=help_of(f))
        if flag != f.name:
            kind = kind or {"int": "ints", "float": "floats"}.get(_base(f), "names")
            kw["help"] = f"{f.metadata['help']} (comma-separated; default: all)"
        if kind == "names":
            kw["type"] = _names([str(c) for c in choices])
        elif kind in _KINDS:
            kw["type"] = _KINDS[kind]
        elif _base(f) == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _TYPES[_base(f)]
            if choices is not None:
                kw["choices"] = list(choices)
        group.add_argument("--" + flag.replace("_", "-"), **kw)


def picked(namespace, cls) -> dict:
    """The options of an ``argparse`` ``namespace`` that are fields of the dataclass
    ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names}


def grid(cls, namespace, defaults: dict | None = None) -> list:
    """The configs of a study's command line (:func:`add_options` with ``rows``):
    every combination of the per-row lists (``--names``; when an option is not given,
    the row field's values in ``defaults``, else all its choices), with the other
    options given to every run."""
    rows = [f for f in dataclasses.fields(cls) if f.metadata.get("row")]
    given, defaults = vars(namespace), defaults or {}
    values = [
        given.get(f.name + "s", defaults.get(f.name, f.metadata["choices"]))
        for f in rows
    ]
    common = picked(namespace, cls)
    return [
        cls(**{f.name: v for f, v in zip(rows, combo, strict=True)}, **common)
        for combo in itertools.product(*values)
    ]
