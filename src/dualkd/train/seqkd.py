"""Sequence-level KD (Kim & Rush, 2016): the student trains on the teacher's outputs instead of the references.

The `seqkd` source is a dataset of teacher outputs made ahead of time, either by `dualkd generate --out` or
here, once, before training when `source.seqkd_data` does not exist yet: every process decodes its share of
the training prompts with the teacher (greedy, or beam search with `generation.num_beams` > 1, as Kim & Rush;
`source.seqkd_sampling: true` samples with the `generation` settings instead), the main
process writes the set (`dualkd generate`'s format: prompt/output with the original references kept), and
the run then reads it like any training file. A resumed run finds the file and reuses it. Any teacher that
writes responses serves (the `generate` capability: a live model, or a server, one request per prompt).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from dualkd.config import DataSource, GenerationConfig, RunConfig
from dualkd.data.formats import Example
from dualkd.data.readers import LoadReport, load_examples
from dualkd.errors import ConfigError, DataError
from dualkd.generate import write_generated_dataset
from dualkd.models import is_encoder_decoder
from dualkd.teachers import TeacherSite, open_teacher


def seqkd_path(cfg: RunConfig, run_dir: Path) -> Path:
    return Path(cfg.source.seqkd_data) if cfg.source.seqkd_data else run_dir / "seqkd-train.jsonl"


def seqkd_examples(cfg: RunConfig, run_dir: Path, engine: Any) -> tuple[list[Example], LoadReport]:
    """The training examples of a seqkd run (teacher outputs), generated first if the file is missing."""
    path = seqkd_path(cfg, run_dir)
    if not path.exists():
        if cfg.teacher is None:
            raise ConfigError(f"source.seqkd_data={path} does not exist and there is no `teacher` to generate it")
        write_teacher_outputs(cfg, path, run_dir, engine)
    # the generated file is prompt/output or messages records, whatever the original format was
    return load_examples(DataSource(path=str(path)), "auto", cfg.data.on_error, cfg.data.max_examples)


def teacher_decoding(cfg: RunConfig) -> GenerationConfig:
    """How the teacher writes the SeqKD set: the `generation` settings, greedy unless `seqkd_sampling`."""
    return cfg.generation if cfg.source.seqkd_sampling else cfg.generation.model_copy(update={"do_sample": False})


def write_teacher_outputs(cfg: RunConfig, path: Path, run_dir: Path, engine: Any) -> None:
    assert cfg.teacher is not None
    examples, _ = load_examples(cfg.data.train, cfg.data.format, cfg.data.on_error, cfg.data.max_examples,
                                cfg.data.translation_pair)
    mine = list(range(engine.rank, len(examples), engine.world_size))
    # equal shares: a sharded teacher decodes in lockstep on every process (the extra prompt is dropped after)
    share = -(-len(examples) // engine.world_size)
    asked = mine + [mine[-1] if mine else 0] * (share - len(mine)) if examples else []
    teacher = open_teacher(cfg.teacher, TeacherSite(run_dir=run_dir, seed=cfg.seed,
                                                    seq2seq=is_encoder_decoder(cfg.student)))
    teacher.require({"generate"}, "source.kind=seqkd (the teacher writes the training responses)")
    teacher.attach(engine.device, engine.place_teacher, contextlib.nullcontext)  # where `placement` says
    try:
        texts = teacher.generate([examples[i] for i in asked], teacher_decoding(cfg), seed=cfg.seed,
                                 label="seqkd: teacher outputs", progress=None if engine.is_main else False)
    finally:
        teacher.close()
    texts = texts[:len(mine)]
    del teacher
    part = path.with_name(f"{path.name}.part{engine.rank}")
    path.parent.mkdir(parents=True, exist_ok=True)
    part.write_text(json.dumps(dict(zip(mine, texts))), encoding="utf-8")
    engine.barrier()
    if engine.is_main:
        by_index: dict[int, str] = {}
        for r in range(engine.world_size):
            shard = path.with_name(f"{path.name}.part{r}")
            by_index.update({int(k): v for k, v in json.loads(shard.read_text(encoding="utf-8")).items()})
        written, empty = write_generated_dataset(examples, [by_index[i] for i in range(len(examples))], path)
        for r in range(engine.world_size):
            path.with_name(f"{path.name}.part{r}").unlink()
        if written == 0:
            path.unlink()
        else:
            print(f"[dualkd] seqkd: {written} teacher outputs written to {path}"
                  + (f" ({empty} empty ones left out)" if empty else ""))
    engine.barrier()
    if not path.exists():  # every process raises, none waits for the others
        raise DataError(f"seqkd: the teacher returned an empty response for all {len(examples)} training prompts; "
                        "check the teacher and the `generation` settings")
