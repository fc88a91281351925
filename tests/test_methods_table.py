"""The methods table (experiments/methods_table): every row's config builds; a quick table trains, resumes by
skipping, and is written; its record is one file that stands in for the runs on another machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from dualkd.data.synthetic import generate
from experiments.methods_table.__main__ import main
from experiments.methods_table.bench import Bench, slim_dev
from experiments.methods_table.doc import grid_markdown, markers, table_markdown
from experiments.methods_table.pretraining import outputs, pretraining_corpus
from experiments.methods_table.rows import ABLATIONS, ROWS


def test_quick_table_every_row_builds_and_reruns_skip(tmp_path: Path) -> None:
    out, doc = tmp_path / "table", tmp_path / "methods-table.md"
    rows = ["sft", "own-dskdv2-eta"]
    records = tmp_path / "records"
    record = records / "scratch.jsonl"  # the table's record: one file per table
    base = ["--quick", "--output-dir", str(out), "--doc", str(doc), "--records", str(records)]
    assert main([*base, "--rows", *rows]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == rows  # the order runs are made in: the comparison the issue is about first
    for name in rows:
        assert set(results[name]["seeds"]) == {"10", "11"}
        for s in results[name]["seeds"].values():
            assert 0 <= s["rougeL"] <= 100 and 0 <= s["exact_match"] <= 100 and 0 <= s["invented"] <= 100
    text = doc.read_text()
    assert "| own-dskdv2-eta | DSKDv2-ETA |" in text and (tmp_path / "methods-table.png").is_file()

    # a rerun trains nothing (every run is final) and keeps the hand-written part of the document
    doc.write_text("# mine\n\nprose above\n" + text[text.index("<!-- generated"):] + "\nprose below\n")
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("final/model.safetensors")}
    assert main([*base, "--rows", *rows]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("final/model.safetensors")} == stamps
    again = doc.read_text()
    assert again.startswith("# mine\n\nprose above\n") and again.endswith("\nprose below\n")

    # --report-only trains nothing and tables what is finished: here every row; an unknown row is refused
    results_before = (out / "results.json").read_text()
    assert main([*base, "--rows", *rows, "--report-only"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("final/model.safetensors")} == stamps
    reported = json.loads((out / "results.json").read_text())
    assert {n: r["seeds"] for n, r in reported.items()} == {n: r["seeds"] for n, r in
                                                            json.loads(results_before).items()}
    assert "### Learning-rate search" in doc.read_text()
    with pytest.raises(SystemExit) as e:
        main([*base, "--rows", "no-such-row", "--report-only"])
    assert e.value.code == 2
    # the record: one line per run of the grid and the seeds (quick: one lr, two seeds per row)
    keys = [json.loads(line)["run"] for line in record.read_text().splitlines()]
    assert keys == sorted(f"{row}/lr0.003/seed{seed}" for row in rows for seed in (10, 11))

    # on another machine (a fresh output folder, the data and teacher remade) the record stands in for the
    # runs: nothing is trained again, the same table is written
    other = tmp_path / "elsewhere"
    assert main(["--quick", "--output-dir", str(other), "--doc", str(tmp_path / "again.md"),
                 "--records", str(records), "--rows", *rows]) == 0
    assert not (other / "runs").exists()
    assert json.loads((other / "results.json").read_text()) == json.loads((out / "results.json").read_text())

    # every row's config builds against the trained teacher: one architecture, the tokenizer differs
    bench = Bench(out, quick=True, console=Console(quiet=True))
    teacher = out / "teacher" / "final"
    configs = {row.name: bench.config(row, 3e-3, 10, teacher) for row in ROWS}
    arch = {c.student.arch["model_type"] for c in configs.values()}
    assert arch == {"gpt2"}
    teacher_vocab = len(json.loads((teacher / "tokenizer.json").read_text())["model"]["vocab"])
    assert {c.student.train_tokenizer.vocab_size for n, c in configs.items() if n.startswith("own-")} == {teacher_vocab}
    assert {str(c.student.tokenizer) for n, c in configs.items() if not n.startswith("own-")} == {str(teacher)}
    assert configs["seqkd"].source.kind == "seqkd" and configs["on-policy-kd-fkl"].source.kind == "on_policy"
    assert configs["sft"].teacher is None and configs["seqkd"].teacher is not None

    # every ablation builds: DSKDv2-ETA with one setting changed; the teacher-vocabulary one reads a teacher
    # trained with its own tokenizer size while the student's tokenizer keeps the main teacher's
    ablations = {row.name: bench.config(row, 3e-3, 10, teacher) for row in ABLATIONS}
    base = configs["own-dskdv2-eta"].objective
    old = ablations["eta-projector_lr-5e-4"].objective
    assert base.projector_lr is None and old == base.model_copy(update={"projector_lr": 5e-4})
    assert ablations["eta-kd_rate-0.9"].objective == old.model_copy(update={"kd_rate": 0.9})
    assert ablations["eta-tau-2"].objective == old.model_copy(update={"temperature": 2.0})
    assert ablations["eta-projector_lr-5e-3"].objective == old.model_copy(update={"projector_lr": 5e-3})
    assert ablations["eta-spaces-teacher"].objective == old.model_copy(update={"spaces": "teacher"})
    small = ablations["eta-teacher_vocab-300"]
    assert small.objective == old and str(small.teacher.path) == str(out / "teacher-vocab300" / "final")
    assert small.student.train_tokenizer.vocab_size == teacher_vocab
    assert len(json.loads((out / "teacher-vocab300" / "final" / "tokenizer.json").read_text())["model"]["vocab"]) \
        == 300


def seeds(*values: float) -> dict[str, dict[str, float]]:
    return {str(k): {"rougeL": x, "exact_match": x, "dev_ce": 1.0, "invented": 0.0} for k, x in enumerate(values)}


def test_partial_rows_say_how_many_seeds() -> None:
    results = {"sft": {"tokenizer": "teacher", "what": "SFT", "lr": 1e-3, "seeds": seeds(50, 52, 54),
                       "dev_ce_by_lr": {"0.001": 1.0, "0.003": 1.2}},
               "kd-fkl": {"tokenizer": "teacher", "what": "KD", "lr": 1e-3, "seeds": seeds(51),
                          "dev_ce_by_lr": {"0.001": 0.9, "0.003": 1.1}},
               "kd-rkl": {"tokenizer": "teacher", "what": "KD", "lr": None, "seeds": {},
                          "dev_ce_by_lr": {"0.001": 1.3}}}
    table = table_markdown(results)
    assert "| kd-fkl | KD (1 seed) |" in table and "kd-rkl" not in table
    grid = grid_markdown(results)
    assert "| kd-rkl | 1.300 | — | — |" in grid and "| sft | 1.000 | 1.200 | 0.001 |" in grid


def test_overlap_marks() -> None:
    results = {"sft": {"tokenizer": "teacher", "what": "SFT", "lr": 1e-3, "seeds": seeds(50, 52)},
               "kd-fkl": {"tokenizer": "teacher", "what": "KD", "lr": 1e-3, "seeds": seeds(51, 53)},
               "kd-rkl": {"tokenizer": "teacher", "what": "KD", "lr": 1e-3, "seeds": seeds(60, 62)}}
    table = table_markdown(results)
    assert "| kd-fkl | KD | 0.001 | 1.000 ± 0.000 | 52.00 ± 1.41 ~ |" in table
    assert "| kd-rkl | KD | 0.001 | 1.000 ± 0.000 | 61.00 ± 1.41 |" in table


def test_ablations_are_tabled_beside_their_base() -> None:
    results = {"own-sft": {"tokenizer": "own", "what": "SFT", "lr": 1e-3, "seeds": seeds(50, 52, 54),
                           "dev_ce_by_lr": {"0.001": 1.0}},
               "own-dskdv2-eta": {"tokenizer": "own", "what": "DSKDv2-ETA", "lr": 1e-3, "seeds": seeds(48, 49, 50),
                                  "dev_ce_by_lr": {"0.001": 0.9}},
               "eta-tau-2": {"tokenizer": "own", "what": "DSKDv2-ETA, τ 2", "lr": 1e-3, "seeds": seeds(60, 61, 62),
                             "dev_ce_by_lr": {"0.001": 0.9}, "base": "own-dskdv2-eta"}}
    table = table_markdown(results)
    main_part, _, ablations = table.partition("### Ablations")
    assert "eta-tau-2" not in main_part and "| own-dskdv2-eta | DSKDv2-ETA |" in main_part
    lines = [line for line in ablations.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0] for line in lines] == ["| own-sft", "| own-dskdv2-eta", "| eta-tau-2"]
    assert "| +12.00 |" in lines[2]  # 61 - 49, intervals apart
    assert "eta-tau-2" not in grid_markdown(results)


def test_the_pretrained_setting(tmp_path: Path) -> None:
    """Each tokenizer's student is pretrained once as a plain LM on unlabeled text disjoint from every labeled
    set; every row fine-tunes from its tokenizer's student at the lr its half's SFT grid chose; the table goes
    to its own section of the document and its runs to their own keys of the record."""
    out, doc, records = tmp_path / "table", tmp_path / "methods-table.md", tmp_path / "records"
    doc.write_text("# mine\n\n<!-- generated -->\n<!-- end generated -->\n")
    rows = ["own-sft", "own-dskdv2-eta"]
    assert main(["--quick", "--setting", "pretrained", "--output-dir", str(out), "--doc", str(doc),
                 "--records", str(records), "--rows", *rows]) == 0
    assert [p.name for p in records.iterdir()] == ["pretrained.jsonl"]  # the table's own record file
    record = records / "pretrained.jsonl"
    results = json.loads((out / "results-pretrained.json").read_text())
    assert set(results) == set(rows) and all(set(r["seeds"]) == {"10", "11"} for r in results.values())
    assert results["own-dskdv2-eta"]["grid_from"] == "own-sft"
    assert results["own-dskdv2-eta"]["lr"] == results["own-sft"]["lr"]
    keys = [json.loads(line)["run"] for line in record.read_text().splitlines()]
    assert keys and all(k.startswith("pretrained/") for k in keys)
    text = doc.read_text()
    assert text.index("<!-- end generated -->") < text.index("<!-- pretrained generated")
    assert "| own-dskdv2-eta | DSKDv2-ETA |" in text and (tmp_path / "methods-table-pretrained.png").is_file()

    # the corpus: documents of the benchmark's sentences, no template, no record of a labeled set
    docs = [json.loads(line) for line in (out / "data" / "pretrain.jsonl").read_text().splitlines()]
    assert docs and all(d["prompt"] == "" and "###" not in d["output"] for d in docs)
    generated = generate("instructions", 40, 21)  # the corpus's own records: labeled, they all drop out
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text("".join(json.dumps(r) + "\n" for r in generated))
    assert pretraining_corpus(40, [], seed=21) and pretraining_corpus(40, [labeled], seed=21) == []

    # a row's config starts from its tokenizer's pretrained student, whose tokenizer it reads
    bench = Bench(out, quick=True, console=Console(quiet=True), setting="pretrained")
    cfg = bench.config(ROWS[[r.name for r in ROWS].index("own-dskdv2-eta")], 3e-3, 10, out / "teacher" / "final")
    assert cfg.student.init == "pretrained" and cfg.student.train_tokenizer is None
    assert str(cfg.student.path) == str(out / "pretrained-student-own" / "final")


def test_the_pretraining_corpus_variants() -> None:
    """The recorded corpus is the first sitting's documents, each followed by a verbatim copy of one of its four
    segments; `paired` keeps a record's input on the line before its answer; no variant holds a template."""
    plain = [d["output"] for d in pretraining_corpus(60, [], seed=21)]
    repeated = [d["output"] for d in pretraining_corpus(60, [], seed=21, repeats=1)]
    assert len(plain) == len(repeated) and all(r.startswith(p + " ") for p, r in zip(plain, repeated))
    records = generate("instructions", 60, 21)
    segments = {s for r in records for s in [*outputs(r), *(line[len("### Input: "):] for line in
                                                           r["prompt"].splitlines() if line.startswith("### Input"))]}
    assert all(r[len(p) + 1:] in segments for p, r in zip(plain, repeated))
    paired = [d["output"] for d in pretraining_corpus(60, [], seed=21, paired=True)]
    assert len(paired) == len(records) and not any("###" in d for d in paired)
    with_input = [d for d in paired if "\n" in d]
    assert with_input and all(set(d.split("\n")[1].split()) <= set(d.split("\n")[0].split()) | {"There", "are",
                              "words.", *"zero one two three four five six seven eight nine ten".split()}
                              for d in with_input)


def test_another_budget_is_a_table_of_its_own(tmp_path: Path) -> None:
    """`--epochs N`: the runs sit under e<N>/ and train N epochs, every row takes its half's SFT-grid lr, and
    the document gets a section of its own (the recipe's budget keeps its keys and markers)."""
    bench = Bench(tmp_path, quick=True, console=Console(quiet=True), epochs=120)
    row = ROWS[[r.name for r in ROWS].index("own-dskdv2-eta")]
    assert bench.table == "scratch-e120"
    assert bench.path(row, 3e-3, 10) == tmp_path / "runs" / "e120" / "own-dskdv2-eta" / "lr0.003" / "seed10"
    teacher = tmp_path / "teacher" / "final"  # what the config reads of the teacher: its vocabulary's size
    teacher.mkdir(parents=True)
    (teacher / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(733)}}}))
    assert bench.config(row, 3e-3, 10, teacher).optimization.epochs == 120
    assert bench.grid_row(row).name == "own-sft"
    recipe_budget = Bench(tmp_path, quick=True, console=Console(quiet=True))
    assert recipe_budget.table == "scratch" and recipe_budget.grid_row(row) is row
    assert markers("scratch-e120") == ("<!-- scratch-e120 generated", "<!-- end scratch-e120 generated -->")


def test_the_record_keeps_dev_evaluations_slim() -> None:
    """The record keeps each dev evaluation without its wall-clock time, every metric to 8 significant digits
    (enough that no 3-decimal figure of the tables moves; the step stays an integer)."""
    kept = slim_dev({"kind": "dev", "time": 1796653280.864, "step": 4320, "ce": 0.26761831709178580,
                     "loss": 0.23940235128111434})
    assert kept == {"step": 4320, "ce": 0.26761832, "loss": 0.23940235} and isinstance(kept["step"], int)
