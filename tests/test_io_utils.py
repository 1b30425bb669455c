"""Atomic writes (neuro_mar.io_utils): the final name holds either the old or the whole new
content, and no temporary file is left behind."""
import pytest

from neuro_mar.io_utils import atomic_savefig, atomic_target, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_target(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_savefig_writes_a_png_into_a_new_folder(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "plots" / "curve.png"
    atomic_savefig(fig, path)
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["curve.png"]


def test_written_files_and_folders_are_readable_by_others(tmp_path):
    """tempfile makes owner-only files (0600 / 0700); what we rename into place gets the
    permissions any tool would give it under the umask (0644 / 0755 under 022)."""
    import os
    import stat

    from neuro_mar.io_utils import make_temp

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.json", "{}")
        folder = make_temp(tmp_path / "student", folder=True)
        os.umask(0o077)  # a stricter umask is honoured too
        atomic_write_text(tmp_path / "private.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
