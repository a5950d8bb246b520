"""``predict`` over many cases: a folder, a ``.txt`` list or a ``dataset.json`` as the input; the progress bar
over cases; ``predictions.csv`` (a row per case, kept on resume and after an interruption, every replica's
rows under torchrun) and the summary line; a bad list is a config error naming ``predict.input``."""
from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import compose, lampseg, torchrun

from lampseg.commands import predict as predict_module
from lampseg.commands.predict_cases import CSV_NAME, CaseProgress, case_inputs
from lampseg.config import ConfigError

COLUMNS = ["case", "input", "output", "status", "seconds", "mode", "window", "input_shape",
           "process_peak_rss_mb"]


def _dataset(trained_run: Path) -> tuple[Path, dict]:
    root = Path(json.loads((trained_run / "summary.json").read_text())["dataset"])
    return root, json.loads((root / "dataset.json").read_text())


def _images(trained_run: Path, n: int) -> list[Path]:
    """``n`` images of the trained run's dataset: its test images, then training images."""
    root, meta = _dataset(trained_run)
    images = [root / p for p in meta["test"]] + [root / c["image"] for c in meta["training"]]
    assert len(images) >= n
    return images[:n]


def _folder(tmp_path: Path, images: list[Path]) -> Path:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for p in images:
        shutil.copy(p, inputs)
    return inputs


def _csv(out: Path) -> tuple[list[str], list[dict]]:
    with open(out / CSV_NAME, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _predict_here(*overrides: str) -> list[str]:
    """``run_predict`` in this process, as ``python -m lampseg predict OVERRIDES`` calls it; its lines."""
    from lampseg.commands.predict import run_predict
    from lampseg.config import checked
    from lampseg.config.loading import qualify

    overrides = tuple(qualify("predict", overrides))
    lines: list[str] = []
    run_predict(checked(compose(*overrides)), list(overrides), log=lines.append)
    return lines


def _args(trained_run: Path, tmp_path: Path, inputs: Path, out: Path) -> list[str]:
    return [f"ckpt={trained_run / 'checkpoints' / 'best.pt'}", f"input={inputs}", f"output={out}",
            f"run_dir={tmp_path / 'r'}"]


def test_folder_through_the_cli_writes_a_row_per_case_and_a_summary(tmp_path, trained_run):
    images = _images(trained_run, 3)
    inputs, out = _folder(tmp_path, images), tmp_path / "preds"
    proc = lampseg("predict", *_args(trained_run, tmp_path, inputs, out))
    columns, rows = _csv(out)
    assert columns == COLUMNS
    names = sorted(p.name for p in images)
    assert [Path(r["output"]).name for r in rows] == names  # the folder's (sorted) order
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, CSV_NAME])
    for row in rows:
        assert row["status"] == "written" and row["mode"] == "whole" and row["window"] == ""
        assert row["case"] == Path(row["output"]).name.removesuffix(".nii.gz")
        assert Path(row["input"]) == inputs / Path(row["output"]).name
        assert float(row["seconds"]) > 0 and float(row["process_peak_rss_mb"]) > 0
        assert row["input_shape"] == "32x32x32x4"  # the smoke dataset's four modalities
    assert "3 case(s) predicted in " in proc.stdout and " cases/s), peak memory " in proc.stdout
    assert f"-> {out / CSV_NAME}" in proc.stdout
    assert "case/s" not in proc.stderr  # not a terminal: no bar, the lines stay readable


def test_txt_and_dataset_json_lists(tmp_path, trained_run):
    root, meta = _dataset(trained_run)
    images = _images(trained_run, 3)
    lists = tmp_path / "lists"
    lists.mkdir()
    # Relative paths are relative to the list's folder; blank lines and comments are skipped.
    text = ["# cases to label", str(images[0]), "", f"../{Path(shutil.copy(images[1], tmp_path)).name}"]
    (lists / "cases.txt").write_text("\n".join(text) + "\n")
    out = tmp_path / "from_txt"
    _predict_here(*_args(trained_run, tmp_path, lists / "cases.txt", out))
    _, rows = _csv(out)
    assert [r["input"] for r in rows] == [str(images[0]), str(lists / ".." / images[1].name)]
    assert all((out / images[k].name).is_file() for k in (0, 1))

    out = tmp_path / "from_json"  # MSD's dataset.json: its "test" list, relative to its folder
    lines = _predict_here(*_args(trained_run, tmp_path, root / "dataset.json", out), "inference=sliding")
    _, rows = _csv(out)
    assert [r["input"] for r in rows] == [str(root / p) for p in meta["test"]]
    assert {(r["mode"], r["window"]) for r in rows} == {("sliding", "32x32x32")}  # +exp=smoke's patch
    assert any(line.startswith(f"{len(meta['test'])} case(s) predicted in ") for line in lines)
    (lists / "some.json").write_text(json.dumps([str(images[2]), {"image": str(images[0])}]))
    assert case_inputs(lists / "some.json") == [images[2], images[0]]  # a bare list, of paths or entries


def test_resume_keeps_the_rows_of_skipped_cases_and_of_earlier_runs(tmp_path, trained_run):
    images = _images(trained_run, 3)
    inputs, out = _folder(tmp_path, images), tmp_path / "preds"
    args = _args(trained_run, tmp_path, inputs, out)
    _predict_here(*args)
    _, first = _csv(out)
    redo = images[1].name
    (out / redo).unlink()  # an interrupted run: this case's prediction (written atomically) is absent
    lines = _predict_here(*args)
    _, again = _csv(out)
    assert [r["output"] for r in again] == [r["output"] for r in first]
    for old, new in zip(first, again):
        if Path(new["output"]).name == redo:
            assert new["status"] == "written"
        else:  # old timings and shapes kept, marked skipped
            assert new == {**old, "status": "skipped"}
    assert any(line.startswith("3 case(s): 1 predicted, 2 skipped") for line in lines), lines
    _predict_here(*args, "overwrite=true")
    _, redone = _csv(out)
    assert [r["status"] for r in redone] == ["written"] * 3
    # Another run into the same folder: its case first, the earlier cases' rows kept after it.
    other = _images(trained_run, 4)[3]
    _predict_here(*_args(trained_run, tmp_path, other, out))
    _, rows = _csv(out)
    assert [Path(r["output"]).name for r in rows] == [other.name, *(Path(r["output"]).name for r in redone)]
    assert rows[1:] == redone


def test_an_interrupted_run_keeps_the_rows_of_its_finished_cases(tmp_path, trained_run, monkeypatch):
    images = _images(trained_run, 3)
    inputs, out = _folder(tmp_path, images), tmp_path / "preds"
    segment, calls = predict_module.segment_image, []

    def fail_on_the_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return segment(*args, **kwargs)

    monkeypatch.setattr(predict_module, "segment_image", fail_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _predict_here(*_args(trained_run, tmp_path, inputs, out))
    _, rows = _csv(out)
    assert [(Path(r["output"]).name, r["status"]) for r in rows] == [(calls[0].name, "written")]


def test_progress_bar_on_a_terminal_only(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for enabled, terminal in ((True, True), (False, True), (True, False)):
        stderr, stdout = (Terminal() if terminal else io.StringIO()), io.StringIO()
        monkeypatch.setattr(sys, "stderr", stderr)
        monkeypatch.setattr(sys, "stdout", stdout)
        bar = CaseProgress(2, enabled)
        for k in range(2):
            bar.log(print, f"case {k}")
            bar.update()
        bar.close()
        assert stdout.getvalue() == "case 0\ncase 1\n"  # the per-case lines are unchanged either way
        shown = "2/2" in stderr.getvalue() and "case/s" in stderr.getvalue()
        assert shown == (enabled and terminal), stderr.getvalue()


@pytest.mark.parametrize("name,content,expected", [
    ("absent.txt", None, "does not exist"),
    ("empty.txt", "\n# nothing\n", "the list names no image"),
    ("missing.txt", "imagesTs/absent.nii.gz\n", "1 listed image(s) do not exist"),
    ("bad.json", '{"test": [', "not valid JSON"),
    ("object.json", '{"training": []}', "without a 'test' list"),
    ("entry.json", '{"test": [3]}', "entry 0 is not an image path"),
    ("binary.txt", b"\xff\xfe\x00", "cannot read the list"),
    ("cases.csv", "a.nii.gz\n", "expected a .nii/.nii.gz image, a folder of them, a .txt list"),
])
def test_a_bad_list_names_the_key_and_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as error:
        case_inputs(path)
    message = str(error.value)
    assert message.startswith(f"config key 'predict.input': {path}: ") and expected in message


def test_two_listed_images_of_one_name_would_share_an_output(tmp_path, trained_run):
    image = _images(trained_run, 1)[0]
    (tmp_path / "copy").mkdir()
    copy = shutil.copy(image, tmp_path / "copy")
    (tmp_path / "twice.txt").write_text(f"{image}\ncopy/{image.name}\n")
    with pytest.raises(ConfigError, match=f"{image} and {copy} would both be predicted to {image.name}"):
        case_inputs(tmp_path / "twice.txt")


def test_a_bad_list_through_the_cli_is_one_line_before_the_model_loads(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    proc = lampseg("predict", f"ckpt={tmp_path / 'absent.pt'}", f"input={tmp_path / 'empty.txt'}",
                   f"output={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"config key 'predict.input': {tmp_path / 'empty.txt'}: the list names no image" in proc.stderr


@pytest.mark.extended  # two processes loading torch: 13 s on an idle 2-core CPU, about 30 s on a busy one
def test_data_parallel_replicas_share_one_csv(tmp_path, trained_run):
    """Under torchrun each replica predicts every other case; rank 0 writes every row, in input order."""
    images = _images(trained_run, 3)
    inputs, out = _folder(tmp_path, images), tmp_path / "preds"
    proc = torchrun(2, "predict", *_args(trained_run, tmp_path, inputs, out), "parallel=ddp")
    _, rows = _csv(out)
    assert [Path(r["output"]).name for r in rows] == sorted(p.name for p in images)
    assert all(r["status"] == "written" for r in rows) and all((out / p.name).is_file() for p in images)
    assert proc.stdout.count("3 case(s) predicted in ") == 1  # rank 0's summary, over both replicas
