"""Labels on archived verdicts: rows of their own (who, when, source), relabels kept as history,
labelled images evicted last, and refusals that change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalygpt_edge.runtime.delivery.archive import Archive, DiskBudget
from anomalygpt_edge.runtime.delivery.archive_labels import LABELS, LabelWriteError, UnknownVerdict
from anomalygpt_edge.runtime.delivery.spool import free_bytes
from tests.test_archive import image, three_image_archive, verdict


def test_a_label_is_a_row_with_author_and_source_and_a_relabel_keeps_the_history(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch")
    archive.record(verdict(1, "NG"), image(1))
    before = archive.query()[0]
    first = archive.add_label("dev-00001", "defect", author="ana", source="station", defect_type="scratch")
    second = archive.add_label("dev-00001", "good", author="bo", source="mqtt", note="false reject")
    history = archive.label_history("dev-00001")
    assert [(x.label, x.author, x.source) for x in history] == [("defect", "ana", "station"), ("good", "bo", "mqtt")]
    assert history == [first, second] and first.defect_type == "scratch" and second.note == "false reject"
    assert archive.query()[0] == before, "the verdict row itself is never edited"
    (current,) = archive.labelled()
    assert (current.verdict_id, current.label, current.author, current.verdict) == ("dev-00001", "good", "bo", "NG")
    assert current.image_path is not None and current.image_path.is_file()
    assert archive.current_labels(["dev-00001", "dev-00002"]) == {"dev-00001": second}
    assert LABELS == ("good", "defect")


def test_labels_survive_reopening_and_filter_by_recipe_and_time(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch")
    archive.record(verdict(1, recipe="bracket"))
    archive.record(verdict(2, recipe="hinge"))
    archive.add_label("dev-00001", "good", author="ana", source="cli")
    late = archive.add_label("dev-00002", "defect", author="ana", source="cli")
    archive.close()
    again = Archive(tmp_path / "arch")
    assert [v.verdict_id for v in again.labelled(recipe="hinge")] == ["dev-00002"]
    assert [v.verdict_id for v in again.labelled(since=late.at)] == ["dev-00002"]
    assert len(again.labelled()) == 2


def test_an_unknown_verdict_or_a_bad_field_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch")
    archive.record(verdict(1))
    with pytest.raises(UnknownVerdict, match="no verdict 'nope'"):
        archive.add_label("nope", "good", author="ana", source="station")
    bad = [
        ({"label": "maybe"}, "field 'label' must be one of good, defect"),
        ({"defect_type": "a/b", "label": "defect"}, "field 'defect_type'"),
        ({"defect_type": "scratch"}, "only for a 'defect' label"),
        ({"note": "x" * 501}, "field 'note'"),
        ({"author": " "}, "author"),
        ({"source": "fax"}, "source"),
    ]
    for change, message in bad:
        args = {"label": "good", "author": "ana", "source": "station", **change}
        label = args.pop("label")
        with pytest.raises(ValueError, match=message):
            archive.add_label("dev-00001", label, **args)
    assert archive.label_history("dev-00001") == [] and archive.labelled() == []


def test_labelled_images_are_evicted_only_after_every_unlabelled_one(tmp_path: Path) -> None:
    archive = three_image_archive(tmp_path)
    for i in range(3):
        archive.record(verdict(i, "NG", minute=i), image(i))
    archive.add_label("dev-00000", "defect", author="ana", source="station")  # the oldest image
    for i in range(3, 6):
        archive.record(verdict(i, "NG", minute=i), image(i))
    kept = {r["id"] for r in archive.query() if r["image"]}
    assert kept == {"dev-00000", "dev-00004", "dev-00005"}, "the labelled oldest image outlived newer unlabelled ones"
    assert archive.verdict_image("dev-00000") is not None


def test_an_ok_verdict_without_a_kept_image_is_labelled_but_has_no_image(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch", ok_sample_rate=0.0)
    archive.record(verdict(1, "OK"), image(1))
    archive.add_label("dev-00001", "defect", author="ana", source="station")
    assert archive.verdict_image("dev-00001") is None
    assert archive.labelled()[0].image_path is None


def test_a_label_for_a_row_held_in_memory_waits_for_room_with_a_clear_error(tmp_path: Path) -> None:
    free = free_bytes(tmp_path)
    disk = DiskBudget(tmp_path, floor_bytes=free * 2, interval_s=0)  # critical: rows wait in memory
    archive = Archive(tmp_path / "arch", disk=disk)
    assert not archive.record(verdict(1, "NG"))
    with pytest.raises(LabelWriteError, match="held in memory until the disk has room"):
        archive.add_label("dev-00001", "good", author="ana", source="mqtt")
    disk.floor_bytes = 0  # space returns: the row goes in first, then the label
    archive.add_label("dev-00001", "good", author="ana", source="mqtt")
    assert archive.count() == 1 and [x.author for x in archive.label_history("dev-00001")] == ["ana"]


def test_a_label_write_that_fails_raises_and_stores_nothing(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch")
    archive.record(verdict(1))
    archive._db.execute("CREATE TRIGGER full BEFORE INSERT ON labels BEGIN SELECT RAISE(FAIL, 'disk is full'); END")
    with pytest.raises(LabelWriteError, match="label for dev-00001 not stored: disk is full"):
        archive.add_label("dev-00001", "good", author="ana", source="cli")
    archive._db.execute("DROP TRIGGER full")
    assert archive.label_history("dev-00001") == []
