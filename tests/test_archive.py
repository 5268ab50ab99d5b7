"""The verdict archive: every row kept and queryable, images under a quota, export to CSV + images."""

from __future__ import annotations

import csv
import errno
from pathlib import Path

import numpy as np
import pytest

from anomalygpt_edge.cli import main
from anomalygpt_edge.runtime.delivery.archive import Archive, ArchiveError, ArchiveWriter


def verdict(i: int, kind: str = "OK", camera: str = "cam1", recipe: str = "bracket", minute: int = 0) -> dict:
    return {
        "id": f"dev-{i:05d}",
        "camera": camera,
        "recipe": recipe,
        "verdict": kind,
        "score": 0.1 * i,
        "threshold": 0.5,
        "part_id": f"P{i}",
        "frame_seq": i,
        "captured_at": f"2026-11-23T08:{minute:02d}:{i % 60:02d}.000+00:00",
        "sentence": "No, there are no anomalies in the image.",
        "location": None if kind == "OK" else "top left",
    }


def image(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def three_image_archive(root: Path) -> Archive:
    """An archive at ``root/arch`` whose image quota holds three and a half of :func:`image`'s NG
    images: the fourth one evicts the oldest. (The size of one is measured in ``root/probe``.)"""
    probe = Archive(root / "probe")
    probe.record(verdict(0, "NG"), image(0))
    return Archive(root / "arch", quota_bytes=int(probe.stats.bytes_used * 3.5))


def test_every_verdict_is_a_row_queryable_by_time_camera_recipe_and_verdict(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch")
    for i in range(10):
        archive.record(verdict(i, "NG" if i % 4 == 0 else "OK", camera=f"cam{i % 2}", minute=i))
    assert archive.count() == 10
    assert [r["id"] for r in archive.query("2026-11-23T08:02:00Z", "2026-11-23T08:05:00Z")] == [
        "dev-00002",
        "dev-00003",
        "dev-00004",
    ]
    assert {r["camera"] for r in archive.query(camera="cam1")} == {"cam1"}
    assert len(archive.query(camera="cam1")) == 5
    assert [r["id"] for r in archive.query(verdict="NG")] == ["dev-00000", "dev-00004", "dev-00008"]
    assert archive.query(recipe="other") == []
    assert archive.query(recipe="bracket", verdict="NG", camera="cam0", limit=1)[0]["id"] == "dev-00000"


def test_a_redelivered_verdict_keeps_its_first_row(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch")
    archive.record(verdict(1))
    archive.record({**verdict(1), "redelivered": True})
    assert archive.count() == 1
    assert "redelivered" not in archive.query()[0]


def test_ng_images_and_heatmaps_are_written_ok_images_only_at_the_sample_rate(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch", ok_sample_rate=0.25)
    archive.record(verdict(0, "NG"), image(0), heatmap=image(1))
    for i in range(1, 9):
        archive.record(verdict(i, "OK"), image(i))
    (ng,) = archive.query(verdict="NG")
    assert (archive.images_dir / ng["image"]).is_file() and (archive.images_dir / ng["heatmap"]).is_file()
    ok_with_images = [r for r in archive.query(verdict="OK") if r["image"]]
    assert len(ok_with_images) == 2  # 8 OK parts at 25 %
    assert archive.stats.ok_sampled == 2 and archive.stats.images_written == 4


def test_images_beyond_the_quota_evict_the_oldest_first_and_rows_stay(tmp_path: Path) -> None:
    archive = three_image_archive(tmp_path)
    for i in range(6):
        archive.record(verdict(i, "NG", minute=i), image(i))
    assert archive.stats.bytes_used <= archive.quota_bytes
    assert archive.stats.images_evicted == 3
    rows = archive.query()
    assert len(rows) == 6
    assert [r["image"] is not None for r in rows] == [False, False, False, True, True, True]
    files = list(archive.images_dir.rglob("*.jpg"))
    assert len(files) == 3 and sum(f.stat().st_size for f in files) == archive.stats.bytes_used


def test_quota_survives_reopening(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch")
    archive.record(verdict(0, "NG"), image(0))
    used = archive.stats.bytes_used
    archive.close()
    assert used > 0 and Archive(tmp_path / "arch").stats.bytes_used == used


def test_an_image_larger_than_the_quota_is_skipped_and_counted(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch", quota_bytes=100)
    assert archive.record(verdict(0, "NG"), image(0)) is True
    assert archive.query()[0]["image"] is None
    assert archive.stats.images_skipped_quota == 1 and "quota" in archive.stats.last_error


def test_disk_full_is_counted_and_recording_carries_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = Archive(tmp_path / "arch")
    real_open = open

    def full_disk(path, mode="r", *a, **kw):  # noqa: ANN001, ANN202 - stand-in for builtins.open
        if "w" in mode and str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", full_disk)
    for i in range(3):
        assert archive.record(verdict(i, "NG"), image(i)) is True
    monkeypatch.undo()
    assert archive.count() == 3
    assert archive.stats.images_failed == 3 and "disk full" in archive.stats.last_error
    assert not list(archive.images_dir.rglob("*.tmp"))


def test_a_verdict_without_an_id_is_counted_not_raised(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch")
    assert archive.record({"verdict": "OK"}) is False
    assert archive.stats.rows_failed == 1


def test_background_writer_archives_everything_submitted(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch")
    writer = ArchiveWriter(archive, maxsize=100)
    for i in range(20):
        assert writer.submit(verdict(i, "NG" if i % 5 == 0 else "OK"), image(i))
    writer.close()
    assert archive.count() == 20 and archive.stats.images_written == 4


def test_export_writes_a_csv_and_the_images_of_the_range(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch")
    for i in range(6):
        archive.record(verdict(i, "NG" if i in (1, 4) else "OK", minute=i), image(i), heatmap=image(i + 100))
    archive.close()
    out = tmp_path / "out"
    code = main(
        [
            "archive",
            "export",
            "--archive",
            str(tmp_path / "arch"),
            "--from",
            "2026-11-23T08:01:00Z",
            "--to",
            "2026-11-23T08:04:00",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    with open(out / "verdicts.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == ["dev-00001", "dev-00002", "dev-00003"]
    ng = rows[0]
    assert ng["verdict"] == "NG" and ng["location"] == "top left" and ng["camera"] == "cam1"
    assert (out / ng["image"]).is_file() and (out / ng["heatmap"]).is_file()
    assert rows[1]["image"] == ""  # OK parts keep no image at the default sample rate of 0
    assert len(list((out / "images").rglob("*.jpg"))) == 2


def test_export_refuses_a_reversed_range_and_a_bad_time(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch")
    with pytest.raises(ArchiveError, match="after"):
        archive.export("2026-11-23T09:00", "2026-11-23T08:00", tmp_path / "o")
    with pytest.raises(ArchiveError, match="ISO-8601"):
        archive.query(start="yesterday")


def test_export_command_names_a_missing_archive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no archive"):
        main(["archive", "export", "--archive", str(tmp_path / "none"), "--from", "2026", "--to", "2027", "--out", "o"])


def test_stats_command_summarises_the_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = Archive(tmp_path / "arch")
    archive.record(verdict(0, "NG"), image(0))
    archive.record(verdict(1, "OK"))
    archive.close()
    assert main(["archive", "stats", "--archive", str(tmp_path / "arch")]) == 0
    out = capsys.readouterr().out
    assert "2 verdicts (NG 1, OK 1)" in out and "oldest 2026-11-23T08:00:00" in out


def test_export_quotes_text_a_spreadsheet_would_run_as_a_formula(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "arch")
    archive.record({**verdict(1, "NG", minute=1), "part_id": '=HYPERLINK("http://x")', "sentence": "@SUM(A1)"})
    archive.close()
    archive = Archive(tmp_path / "arch")
    archive.export("2026-11-23T08:00:00Z", "2026-11-23T08:05:00Z", tmp_path / "out")
    with open(tmp_path / "out" / "verdicts.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["part_id"] == '\'=HYPERLINK("http://x")' and row["sentence"] == "'@SUM(A1)"
    assert row["score"] and not row["score"].startswith("'")  # numbers are left alone


def test_an_archive_that_cannot_be_opened_is_moved_aside_and_its_images_kept_under_the_quota(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    first = Archive(root, quota_bytes=10**7)
    first.record(verdict(1, "NG"), image(1))
    first.close()
    used = first.stats.bytes_used
    (root / "archive.db").write_bytes(b"\x00garbage" * 512)  # a damaged database
    for side in ("-wal", "-shm"):
        (root / f"archive.db{side}").unlink(missing_ok=True)
    again = Archive(root, quota_bytes=10**7)
    assert again.events[0]["kind"] == "moved_aside" and "moved aside" in again.stats.last_error
    assert list(root.glob("archive.db.corrupt-*")), "the damaged file is kept as evidence"
    assert again.stats.bytes_used == used > 0, "images on disk are back in the quota ledger"
    assert again.record(verdict(2)) and again.count() == 1


def test_below_the_free_space_floor_images_stop_first_then_rows_wait_in_memory_and_catch_up(tmp_path: Path) -> None:
    from anomalygpt_edge.runtime.delivery.archive import DiskBudget
    from anomalygpt_edge.runtime.delivery.spool import free_bytes

    free = free_bytes(tmp_path)
    disk = DiskBudget(tmp_path, floor_bytes=free // 2 + 1, interval_s=0)  # free < 2 x floor: "low"
    archive = Archive(tmp_path / "archive", disk=disk)
    assert disk.level() == "low"
    assert archive.record(verdict(1, "NG"), image(1)), "rows are still written"
    assert archive.stats.images_skipped_disk == 1 and archive.stats.images_written == 0
    disk.floor_bytes = free * 2  # free < floor: "critical"
    assert not archive.record(verdict(2, "NG"), image(2))
    assert archive.stats.rows_deferred == 1 and archive.count() == 1, "the row waits in memory"
    disk.floor_bytes = 0  # space returns
    assert archive.flush_deferred() == 0 and archive.count() == 2
    assert archive.record(verdict(3, "NG"), image(3)) and archive.stats.images_written == 1


def test_the_disk_budget_counts_every_file_and_caps_the_image_quota(tmp_path: Path) -> None:
    from anomalygpt_edge.runtime.delivery.archive import DiskBudget
    from anomalygpt_edge.runtime.delivery.spool import VerdictSpool

    budget = 3_000_000
    disk = DiskBudget(tmp_path, budget_bytes=budget, interval_s=0)
    spool = VerdictSpool(tmp_path / "spool.db")
    disk.track(spool.path)
    archive = Archive(tmp_path / "archive", quota_bytes=10**9, disk=disk)  # quota far above the budget
    for i in range(120):
        archive.record(verdict(i, "NG"), image(i, 128))
    stats = disk.stats()
    assert stats["used_bytes"] <= budget, stats
    assert archive.stats.images_evicted > 0, "the budget, not the larger quota, bounded the images"
    assert archive.count() == 120 and archive.stats.rows_deferred == 0, "rows still fit: images gave way"
    spool.close()


def test_the_archive_wal_is_kept_small(tmp_path: Path) -> None:
    from anomalygpt_edge.runtime.delivery.spool import JOURNAL_SIZE_LIMIT

    archive = Archive(tmp_path / "archive")
    for i in range(3000):
        archive.record({**verdict(i), "pad": "x" * 2000})
    wal = tmp_path / "archive" / "archive.db-wal"
    assert wal.stat().st_size <= JOURNAL_SIZE_LIMIT + 2 * 1024 * 1024
