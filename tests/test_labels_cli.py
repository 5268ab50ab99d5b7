"""``anomalygpt-edge label --from CSV``: bulk labels land in the archive with their author and
``source: cli``; a file with a bad row (unknown id, bad label, bad defect type, extra cells) is
listed row by row and writes nothing unless ``--skip-bad``."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalygpt_edge.cli import main
from anomalygpt_edge.runtime.delivery.archive import Archive
from tests.test_archive import verdict


def _archive(root: Path, n: int = 3) -> Path:
    archive = Archive(root)
    for i in range(n):
        archive.record(verdict(i, "NG"))
    archive.close()
    return root


def test_a_csv_of_labels_is_stored_with_its_author_and_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _archive(tmp_path / "arch")
    src = tmp_path / "labels.csv"
    src.write_text("id,label,defect_type,note\ndev-00000,defect,scratch,seen at QC\ndev-00001,good,,\n")
    assert main(["label", "--archive", str(root), "--from", str(src), "--author", "qc-anna"]) == 0
    assert "2 labels written" in capsys.readouterr().out
    archive = Archive(root)
    (first,) = archive.label_history("dev-00000")
    assert (first.label, first.defect_type, first.note, first.author, first.source) == (
        "defect", "scratch", "seen at QC", "qc-anna", "cli",
    )  # fmt: skip
    assert [x.label for x in archive.label_history("dev-00001")] == ["good"]


def test_a_headerless_csv_uses_the_column_order(tmp_path: Path) -> None:
    root = _archive(tmp_path / "arch")
    src = tmp_path / "labels.csv"
    src.write_text("dev-00002,defect,dent\n")
    assert main(["label", "--archive", str(root), "--from", str(src), "--author", "qc"]) == 0
    assert Archive(root).label_history("dev-00002")[0].defect_type == "dent"


def test_a_file_with_bad_rows_names_each_and_writes_nothing_unless_skip_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _archive(tmp_path / "arch")
    src = tmp_path / "labels.csv"
    src.write_text(
        "id,label,defect_type\n"
        "dev-00000,good,\n"
        "nope-1,good,\n"
        "dev-00001,maybe,\n"
        "dev-00002,defect,../x\n"
        "dev-00002,good,,note,surplus\n"
    )
    assert main(["label", "--archive", str(root), "--from", str(src), "--author", "qc"]) == 2
    err = capsys.readouterr()
    assert "row 3: no verdict 'nope-1' in the archive" in err.err
    assert "row 4: field 'label' must be one of good, defect" in err.err
    assert "row 5: field 'defect_type'" in err.err
    assert "row 6: more cells than the columns" in err.err
    assert "nothing written" in err.out
    assert Archive(root).labelled() == [], "a file with errors changes nothing"

    assert main(["label", "--archive", str(root), "--from", str(src), "--author", "qc", "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "1 labels written" in out and "4 bad rows skipped" in out
    assert [v.verdict_id for v in Archive(root).labelled()] == ["dev-00000"]


def test_a_header_with_an_unknown_column_and_a_missing_archive_are_refused(tmp_path: Path) -> None:
    root = _archive(tmp_path / "arch")
    src = tmp_path / "labels.csv"
    src.write_text("id,label,comment\ndev-00000,good,x\n")
    with pytest.raises(SystemExit, match="the header must name id, label"):
        main(["label", "--archive", str(root), "--from", str(src)])
    src.write_text("id,label\ndev-00000,good\n")
    with pytest.raises(SystemExit, match="no archive at"):
        main(["label", "--archive", str(tmp_path / "none"), "--from", str(src)])
