import os

import pytest

from nestlearn.atomic import atomic_directory, atomic_write_text, remove_staging_leftovers


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "first"
    with atomic_directory(target) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_keeps_the_old_folder_and_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / ".tmp-out-123").mkdir()
    (tmp_path / ".old-out-456").mkdir()
    (tmp_path / "out").mkdir()
    remove_staging_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(("umask", "file_mode", "folder_mode"),
                         [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o077, 0o600, 0o700)])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, file_mode, folder_mode):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "text")
        with atomic_directory(tmp_path / "folder") as staging:
            (staging / "b.txt").write_text("text")
            os.close(os.open(staging / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "folder").stat().st_mode & 0o777 == folder_mode
    assert (tmp_path / "folder" / "b.txt").stat().st_mode & 0o777 == file_mode
    # a writer that creates its files 0600 (as safetensors does) is widened to the umask's mode
    assert (tmp_path / "folder" / "private.bin").stat().st_mode & 0o777 == file_mode
