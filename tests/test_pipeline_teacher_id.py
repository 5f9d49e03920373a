"""The fingerprint cache of `sga label` (pipeline.teacher_id): what invalidates a recorded fingerprint."""

import os

from pipeline import teacher_id


def test_the_cache_key_follows_the_teacher_folder_and_the_teacher_code(tmp_path, monkeypatch):
    folder, code = tmp_path / "teacher_dir", tmp_path / "code"
    folder.mkdir()
    code.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (code / "grounding.py").write_text("# inference\n")
    monkeypatch.setattr(teacher_id, "_package_dir", lambda: code)

    def key():
        return teacher_id.cache_key(str(folder), "cpu", 0.05, 10)

    first = key()
    assert first is not None and key() == first
    assert teacher_id.cache_key(str(folder), "cpu", 0.1, 10) != first
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "grounding.cpython-311.pyc").write_bytes(b"compiled")
    assert key() == first                                    # compiled files are not the code
    (code / "grounding.py").write_text("# inference, grounded in windows now\n")
    second = key()
    assert second != first                                   # new inference code: learn the fingerprint again
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert key() != second                                   # other weights in the same folder
    teacher_id.record(str(tmp_path / "out"), key(), "t", "abc")
    assert teacher_id.lookup(str(tmp_path / "out"), key()) == {"name": "t", "fingerprint": "abc"}
    assert teacher_id.cache_key(str(tmp_path / "nowhere"), "cpu", 0.05, 10) is None
