"""TensorFlow Datasets builders stored as array_record, no TensorFlow: the shipped evaluation sets and
the SFT sample sets that rejection sampling writes.

`prepare(name, data_dir)` writes an eval set with `file_format="array_record"` from the JSONL files in
`r1jax/data/eval/` (nothing is downloaded); `write_samples(examples, data_dir)` writes SFT examples
(r1jax.rejection.write_dataset puts them in out_dir/tfds). `tfds_source(name, split, data_dir)`
reads either back with `tfds.data_source` as a grain random-access source, in the written order (the
builders disable tfds's shuffling): an eval set gives the records `sources.EVAL_SETS` gives, the
"samples" set the records of the rejection dataset's train.jsonl. No path imports TensorFlow: tfds
encodes and decodes text features with its own protobuf code when TF is absent.

The builders stay out of tfds's global catalog (`skip_registration`), so re-importing this module
never collides; `tfds.data_source` finds a prepared set by name from the files in `data_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from r1jax.data.sources import EVAL_SETS
from r1jax.errors import DataError

TEXT_FIELDS = ("id", "question", "reasoning", "answer")


class _EvalSetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base: one text feature per record field; examples from the JSONL source of `SOURCE`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From the JSONL files shipped in r1jax/data/eval."}
    SOURCE = ""  # key of sources.EVAL_SETS
    SPLITS: tuple[str, ...] = ("test",)
    HOMEPAGE = ""
    CITATION = ""
    HOW_TO_PREPARE = "run r1jax.data.tfds_builders.prepare({name!r}, data_dir)"

    @staticmethod
    def to_record(example: Mapping[str, Any]) -> dict[str, Any]:
        """A decoded tfds example (bytes per feature) -> the record {"id", "question", "reasoning", "answer"}."""
        return {k: _text(example[k]) for k in TEXT_FIELDS}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.SOURCE} as shipped with r1jax (see r1jax/data/eval/README.md).",
            features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in TEXT_FIELDS}),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            disable_shuffling=True,  # keep file order: tfds_source(...)[i] == EVAL_SETS[...](...)[i]
        )

    def _split_generators(self, dl_manager) -> dict[str, Any]:
        del dl_manager  # local files only
        return {split: self._generate_examples(split=split) for split in self.SPLITS}

    def _generate_examples(self, split: str):
        source = EVAL_SETS[self.SOURCE](split)
        for i in range(len(source)):
            record = source[i]
            yield i, {k: record[k] for k in TEXT_FIELDS}


class R1jaxGsm8k(_EvalSetBuilder, skip_registration=True):
    """GSM8K (Cobbe et al. 2021, MIT): train 7473, test 1319 grade-school math word problems."""

    SOURCE = "gsm8k"
    SPLITS = ("train", "test")
    HOMEPAGE = "https://github.com/openai/grade-school-math"
    CITATION = "Cobbe et al., Training Verifiers to Solve Math Word Problems, arXiv:2110.14168, 2021."


class R1jaxMath500(_EvalSetBuilder, skip_registration=True):
    """MATH-500 (Lightman et al. 2023) subset of MATH (Hendrycks et al. 2021, MIT): test 500."""

    SOURCE = "math500"
    HOMEPAGE = "https://github.com/openai/prm800k"
    CITATION = "Lightman et al., Let's Verify Step by Step, arXiv:2305.20050, 2023."


class R1jaxAime2024(_EvalSetBuilder, skip_registration=True):
    """AIME 2024 I and II (MAA): test 30 problems with integer answers."""

    SOURCE = "aime2024"
    HOMEPAGE = "https://github.com/sail-sg/understand-r1-zero"


class R1jaxSamples(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """SFT examples (rejection sampling output), one split "train", in the order given.

    id/question/reasoning/answer are text features; every other field of an example is JSON in the
    text feature "extras" and merged back by `to_record`. `examples` is needed only to write; a
    builder made without it reads a prepared set.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Written by r1jax.rejection.write_dataset."}
    SPLITS: tuple[str, ...] = ("train",)
    HOW_TO_PREPARE = ("the rejection stage writes it as <out_dir>/tfds (r1jax.rejection.write_dataset); "
                      "a dataset with no examples has only train.jsonl")

    def __init__(self, *, examples: Sequence[Mapping[str, Any]] | None = None, **kwargs):
        self._examples = examples
        super().__init__(**kwargs)

    @staticmethod
    def to_record(example: Mapping[str, Any]) -> dict[str, Any]:
        """A decoded tfds example (bytes per feature) -> the example as written (its line of train.jsonl)."""
        return {**{k: _text(example[k]) for k in TEXT_FIELDS}, **json.loads(_text(example["extras"]))}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="SFT examples from r1jax rejection sampling; 'extras' holds the other fields as JSON.",
            features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in (*TEXT_FIELDS, "extras")}),
            disable_shuffling=True,  # record i == line i of train.jsonl
        )

    def _split_generators(self, dl_manager) -> dict[str, Any]:
        del dl_manager  # local files only
        if self._examples is None:
            raise DataError(f"{self.name}: no examples to write (R1jaxSamples(examples=...) writes; see write_samples)")
        return {self.SPLITS[0]: self._generate_examples()}

    def _generate_examples(self):
        for i, ex in enumerate(self._examples):
            extras = {k: v for k, v in ex.items() if k not in TEXT_FIELDS}
            yield i, {**{k: ex[k] for k in TEXT_FIELDS}, "extras": json.dumps(extras, ensure_ascii=False)}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


BUILDERS: dict[str, type[_EvalSetBuilder] | type[R1jaxSamples]] = {
    "gsm8k": R1jaxGsm8k,
    "math500": R1jaxMath500,
    "aime2024": R1jaxAime2024,
    "samples": R1jaxSamples,
}


def _builder_class(name: str) -> type[_EvalSetBuilder] | type[R1jaxSamples]:
    if name not in BUILDERS:
        raise DataError(f"unknown tfds set {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[name]


def _download_and_prepare(builder: tfds.core.GeneratorBasedBuilder) -> None:
    tfds.disable_progress_bar()  # tfds' own bars ignore whether stderr is a terminal; r1jax reports progress itself
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
            try_download_gcs=False,
        ),
    )


def prepare(name: str, data_dir: str | os.PathLike) -> None:
    """Write eval set `name` (a key of BUILDERS) under `data_dir` as array_record; no-op if present."""
    cls = _builder_class(name)
    if not issubclass(cls, _EvalSetBuilder):
        raise DataError(f"tfds set {name!r} is not prepared from shipped files: {cls.HOW_TO_PREPARE}")
    _download_and_prepare(cls(data_dir=os.fspath(data_dir), file_format="array_record"))


def write_samples(examples: Sequence[Mapping[str, Any]], data_dir: str | os.PathLike) -> str:
    """Write SFT `examples` (dicts with str id/question/reasoning/answer, other fields JSON-serialisable)
    under `data_dir` as the array_record set "samples", split "train"; return the tfds name
    ("r1jax_samples"). tfds cannot hold an empty split: `examples` must not be empty."""
    if not examples:
        raise DataError(f"{data_dir}: no examples; tfds cannot hold an empty split")
    data_dir = Path(data_dir)
    builder = R1jaxSamples(examples=examples, data_dir=os.fspath(data_dir), file_format="array_record")
    _download_and_prepare(builder)
    downloads = data_dir / "downloads"  # tfds makes it even when nothing is downloaded
    if downloads.is_dir() and not any(p.is_file() for p in downloads.rglob("*")):
        shutil.rmtree(downloads)
    return builder.name


class TfdsSource:
    """Random-access records of a prepared set; holds only names, opens on first use per process.

    Records are what the builder's `to_record` gives: for an eval set {"id", "question", "reasoning",
    "answer"} as str, equal to the JSONL source's; for "samples" the full examples of train.jsonl.
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike):
        self.builder_name = _builder_class(name).name  # e.g. "r1jax_gsm8k"
        self.name, self.split, self.data_dir = name, split, os.fspath(data_dir)
        self._source = None
        self._pid: int | None = None
        len(self)  # fail now, not in a worker, if the set is not prepared

    def _data_source(self):
        if self._source is None or self._pid != os.getpid():
            cls = _builder_class(self.name)
            builder = cls(data_dir=self.data_dir)
            if not builder.is_prepared():
                raise DataError(
                    f"{self.data_dir}: no prepared {self.builder_name}; {cls.HOW_TO_PREPARE.format(name=self.name)}"
                )
            if self.split not in builder.info.splits:
                raise DataError(f"{self.name}: no split {self.split!r}; has {', '.join(builder.info.splits)}")
            self._source = tfds.data_source(self.builder_name, split=self.split, data_dir=self.data_dir)
            self._pid = os.getpid()
        return self._source

    def __len__(self) -> int:
        return len(self._data_source())

    def __getitem__(self, i: int) -> dict[str, Any]:
        return _builder_class(self.name).to_record(self._data_source()[i])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None, "_pid": None}

    def __repr__(self) -> str:
        return f"TfdsSource({self.builder_name!r}, split={self.split!r}, data_dir={self.data_dir!r})"


def tfds_source(name: str, split: str, data_dir: str | os.PathLike) -> TfdsSource:
    """The prepared set `name` (a key of BUILDERS), `split`, under `data_dir` as a grain random-access source."""
    return TfdsSource(name, split, data_dir)
