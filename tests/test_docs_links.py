"""What a reader of the repository follows leads somewhere: every `docs/...`, `benchmarks/...`, `experiments/...`
and `scripts/...` path that the source, README, docs and experiments name exists (a pattern such as
`docs/benchmark-*.md` aside), and none of them points outside the repository."""

from __future__ import annotations

import re

from tests.helpers import REPO

READ = [*sorted((REPO / "src").rglob("*.py")), REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")),
        *sorted((REPO / "experiments").rglob("*.md")), *sorted((REPO / "experiments").rglob("*.py")),
        *sorted((REPO / "experiments").rglob("*.sh"))]
CITED = re.compile(r"(?<![\w/.-])((?:docs|benchmarks|experiments|scripts)/[\w./-]*\w)(?![*\w-])")


def test_every_cited_repository_path_exists() -> None:
    missing = []
    for file in READ:
        for line_no, line in enumerate(file.read_text().splitlines(), 1):
            for path in CITED.findall(line):
                path = path.split("#")[0]
                if any(c in path for c in "*<{") or path.endswith(("/", ".")):
                    continue
                if not (REPO / path).exists() and not (REPO / "src" / "dualkd" / path).exists():
                    missing.append(f"{file.relative_to(REPO)}:{line_no}: {path}")
    assert not missing, "\n".join(missing)


def test_nothing_points_outside_the_repository() -> None:
    outside = [f"{file.relative_to(REPO)}:{n}: {line.strip()}" for file in READ
               for n, line in enumerate(file.read_text().splitlines(), 1) if "../shared" in line]
    assert not outside, "\n".join(outside)


def test_every_objective_has_a_row_in_the_method_notes_index() -> None:
    from dualkd.methods import METHODS

    index = (REPO / "docs" / "methods" / "README.md").read_text()
    assert all(f"`{name}`" in index for name in METHODS), [n for n in METHODS if f"`{n}`" not in index]
