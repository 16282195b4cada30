"""The shipped evaluation sets as TensorFlow Datasets builders, stored as array_record, no TensorFlow.

`prepare(name, data_dir)` writes a set with `file_format="array_record"` from the JSONL files in
`r1jax/data/eval/` (nothing is downloaded). `tfds_source(name, split, data_dir)` reads it back with
`tfds.data_source` as a grain random-access source of the same records `sources.EVAL_SETS` gives,
in the same order (the builders disable tfds's shuffling). Neither path imports TensorFlow:
tfds encodes and decodes text features with its own protobuf code when TF is absent.

The builders stay out of tfds's global catalog (`skip_registration`), so re-importing this module
never collides; `tfds.data_source` finds a prepared set by name from the files in `data_dir`.
"""

from __future__ import annotations

import os
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


BUILDERS: dict[str, type[_EvalSetBuilder]] = {
    "gsm8k": R1jaxGsm8k,
    "math500": R1jaxMath500,
    "aime2024": R1jaxAime2024,
}


def _builder_class(name: str) -> type[_EvalSetBuilder]:
    if name not in BUILDERS:
        raise DataError(f"unknown tfds eval set {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[name]


def prepare(name: str, data_dir: str | os.PathLike) -> None:
    """Write eval set `name` (a key of BUILDERS) under `data_dir` as array_record; no-op if present."""
    builder = _builder_class(name)(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
            try_download_gcs=False,
        ),
    )


class TfdsSource:
    """Random-access records of a prepared eval set; holds only names, opens on first use per process.

    Records are {"id", "question", "reasoning", "answer"} as str, equal to the JSONL source's.
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike):
        self.builder_name = _builder_class(name).name  # e.g. "r1jax_gsm8k"
        self.name, self.split, self.data_dir = name, split, os.fspath(data_dir)
        self._source = None
        self._pid: int | None = None
        len(self)  # fail now, not in a worker, if the set is not prepared

    def _data_source(self):
        if self._source is None or self._pid != os.getpid():
            builder = _builder_class(self.name)(data_dir=self.data_dir)
            if not builder.is_prepared():
                raise DataError(
                    f"{self.data_dir}: no prepared {self.builder_name}; run r1jax.data.tfds_builders.prepare"
                    f"({self.name!r}, data_dir)"
                )
            if self.split not in builder.info.splits:
                raise DataError(f"{self.name}: no split {self.split!r}; has {', '.join(builder.info.splits)}")
            self._source = tfds.data_source(self.builder_name, split=self.split, data_dir=self.data_dir)
            self._pid = os.getpid()
        return self._source

    def __len__(self) -> int:
        return len(self._data_source())

    def __getitem__(self, i: int) -> dict[str, str]:
        example = self._data_source()[i]
        return {k: example[k].decode("utf-8") for k in TEXT_FIELDS}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None, "_pid": None}

    def __repr__(self) -> str:
        return f"TfdsSource({self.builder_name!r}, split={self.split!r}, data_dir={self.data_dir!r})"


def tfds_source(name: str, split: str, data_dir: str | os.PathLike) -> TfdsSource:
    """The prepared eval set `name`/`split` under `data_dir` as a grain random-access source."""
    return TfdsSource(name, split, data_dir)
