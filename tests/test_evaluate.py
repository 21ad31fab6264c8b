"""Long-tail metrics on hand-computed cases, the report files, predictions files and the ``eval`` command."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from neighborlt.cli import main
from neighborlt.data import shot_groups
from neighborlt.errors import ConfigError, DataError, NeighborLTError
from neighborlt.evaluate import (
    EvalConfig,
    evaluate_predictions,
    expected_calibration_error,
    read_predictions_file,
    run_eval,
    shot_accuracy,
    write_report,
)
from neighborlt.rundir import RunDir, atomic_write_json

# Six classes: many, many, medium, medium (20 is medium), few, few (class 5 has no test images).
COUNTS = [500, 150, 50, 20, 19, 5]
NAMES = ["cat", "automobile", "deer", "airplane", "bird", "frog"]
#                0  0  0  0  1  1  2  2  3  3  4  4
LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
PREDS = np.array([0, 0, 0, 1, 1, 1, 2, 0, 3, 4, 4, 5])
# per class: 3/4, 2/2, 1/2, 1/2, 1/2, (no test) -> many mean(75, 100) = 87.5 % (micro would be 5/6 = 83.3 %)


def test_shot_groups_thresholds() -> None:
    assert shot_groups(COUNTS).tolist() == ["many", "many", "medium", "medium", "few", "few"]
    assert shot_groups([101, 100, 20, 19], many=100, few=20).tolist() == ["many", "medium", "medium", "few"]
    assert shot_groups([3, 2, 1], many=2, few=2).tolist() == ["many", "medium", "few"]
    with pytest.raises(ConfigError, match="few <= many"):
        shot_accuracy([0], [0], [5], many=10, few=30)


def test_shot_accuracy_hand_computed() -> None:
    acc = shot_accuracy(PREDS, LABELS, COUNTS)
    assert acc == pytest.approx({"overall": 800 / 12, "many": 87.5, "medium": 50.0, "few": 50.0})


def test_evaluate_predictions_hand_computed() -> None:
    m = evaluate_predictions(PREDS, LABELS, COUNTS, NAMES)
    assert m["balanced_accuracy"] == pytest.approx((75 + 100 + 50 + 50 + 50) / 5)
    assert m["balanced_error"] == pytest.approx(100 - 65)
    # three classes tie at 0.5: the lowest index wins
    assert m["worst_class"] == {"index": 2, "name": "deer", "accuracy": 50.0}
    assert m["harmonic_mean"] == pytest.approx(700 / 12)  # 3 / (1/87.5 + 1/50 + 1/50)
    assert m["harmonic_mean_splits"] == ["many", "medium", "few"]
    assert m["split_classes"] == {"many": 2, "medium": 2, "few": 2}
    assert m["split_test_samples"] == {"many": 6, "medium": 4, "few": 2}
    assert m["classes_without_test"] == ["frog"]
    frog = m["per_class"][5]
    assert frog == {"index": 5, "name": "frog", "train_count": 5, "shot": "few", "n_test": 0, "correct": 0,
                    "accuracy": None}
    assert [r["accuracy"] for r in m["per_class"][:5]] == [75.0, 100.0, 50.0, 50.0, 50.0]
    json.dumps(m, allow_nan=False)  # strictly JSON-serialisable (no NaN)


def test_empty_split_is_none_and_harmonic_uses_the_rest() -> None:
    m = evaluate_predictions([0, 1, 1, 1], [0, 0, 1, 1], [200, 300], ["a", "b"])
    assert (m["many"], m["medium"], m["few"]) == (75.0, None, None)
    assert m["harmonic_mean"] == 75.0 and m["harmonic_mean_splits"] == ["many"]
    # a split whose classes exist but have no test images is also None
    m = evaluate_predictions([0, 0], [0, 0], [200, 5], ["a", "b"])
    assert m["few"] is None and m["split_classes"]["few"] == 1


def test_harmonic_mean_zero_when_a_split_is_zero() -> None:
    m = evaluate_predictions([0, 0], [0, 1], [500, 5], ["head", "tail"])
    assert (m["many"], m["few"], m["harmonic_mean"]) == (100.0, 0.0, 0.0)
    assert m["worst_class"]["name"] == "tail"


def test_logits_argmax_ties_go_to_lowest_index() -> None:
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [5.0, 0.0, 5.0]])
    acc = shot_accuracy(logits, [0, 1, 2], [500, 50, 5])
    assert acc == {"overall": pytest.approx(200 / 3), "many": 100.0, "medium": 100.0, "few": 0.0}


def test_extra_outputs_count_as_errors() -> None:
    # a model with 2 target + 1 auxiliary output, evaluated without the direct classifier
    logits = np.array([[0.0, 1.0, 3.0], [2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    with pytest.raises(DataError, match="3 columns but the model has 2 classes"):
        shot_accuracy(logits, [1, 0, 1], [200, 10])
    m = evaluate_predictions(logits, [1, 0, 1], [200, 10], ["a", "b"], num_outputs=3)
    assert m["overall"] == pytest.approx(200 / 3) and m["predictions_outside_classes"] == 1
    assert m["few"] == 50.0 and m["num_outputs"] == 3


@pytest.mark.parametrize(
    "preds, labels, counts, match",
    [
        ([0, 1], [0, 1, 1], [10, 10], "2 predictions but 3 labels"),
        ([0, 1, 1], [0, 2, 1], [10, 10], "label 2 of sample 1 is out of range 0..1"),
        ([0, 1, 1], [0, -1, 1], [10, 10], "label -1 of sample 1 is out of range"),
        ([0, 3, 1], [0, 1, 1], [10, 10], "prediction 3 of sample 1 is out of range 0..1"),
        ([0.5, 1], [0, 1], [10, 10], "integer class indices"),
        (np.zeros((2, 2, 2)), [0, 1], [10, 10], "shape"),
        ([[0.0, np.nan], [1.0, 0.0]], [0, 1], [10, 10], "sample 0 contain NaN"),
        ([0, 1], [0, 1], [], "non-empty"),
        ([0, 1], [0, 1], [10, -1], "non-negative"),
    ],
)
def test_bad_inputs_one_line_errors(preds, labels, counts, match) -> None:
    with pytest.raises(DataError, match=match) as e:
        shot_accuracy(np.asarray(preds), labels, counts)
    assert "\n" not in str(e.value)


def test_class_names_length_mismatch() -> None:
    with pytest.raises(DataError, match="2 names but 3 training counts"):
        evaluate_predictions([0], [0], [1, 2, 3], ["a", "b"])


def test_empty_test_set() -> None:
    m = evaluate_predictions(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), [10, 200], ["a", "b"])
    assert m["overall"] is None and m["worst_class"] is None and m["harmonic_mean"] is None


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 600), min_size=1, max_size=12),
    per_class=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_balanced_test_set_split_mean_equals_micro_accuracy(counts, per_class, seed) -> None:
    """With the same number of test images per class, a split's mean per-class accuracy is its top-1."""
    rng = np.random.default_rng(seed)
    c = len(counts)
    labels = np.repeat(np.arange(c), per_class)
    logits = rng.normal(size=(len(labels), c))
    acc = shot_accuracy(logits, labels, counts)
    pred = logits.argmax(1)
    assert acc["overall"] == pytest.approx(100 * float((pred == labels).mean()))
    groups = shot_groups(counts)
    for s in ("many", "medium", "few"):
        mask = groups[labels] == s
        expect = 100 * float((pred[mask] == labels[mask]).mean()) if mask.any() else None
        assert acc[s] == (pytest.approx(expect) if expect is not None else None)


def test_write_report_files_parse(tmp_path) -> None:
    m = evaluate_predictions(PREDS, LABELS, COUNTS, ["cat", "auto|mobile", "deer", "airplane", "bird", "frog"])
    paths = write_report(tmp_path / "eval", m, title="unit", source="hand")
    assert {p.name for p in paths.values()} == {"metrics.json", "per_class.csv", "report.md", "per_class.png"}
    assert json.loads(paths["metrics"].read_text()) == json.loads(json.dumps(m))
    rows = list(csv.DictReader(paths["per_class"].open()))
    assert [r["name"] for r in rows] == ["cat", "auto|mobile", "deer", "airplane", "bird", "frog"]
    assert rows[0]["accuracy"] == "75.0000" and rows[5]["accuracy"] == "" and rows[5]["n_test"] == "0"
    assert rows[4]["shot"] == "few" and rows[3]["train_count"] == "20"
    md = paths["report"].read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and "overall" not in ln and "---" not in ln]
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[:5] == ["66.67", "87.50", "50.00", "50.00", "35.00"]
    assert cells[5] == "50.00 (deer)" and cells[6] == "58.33"
    assert "auto\\|mobile" in md  # pipes in class names do not break the table
    assert "frog" in md and "no test images" in md
    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_report_marks_empty_split(tmp_path) -> None:
    m = evaluate_predictions([0, 1], [0, 1], [200, 300], ["a", "b"])
    md = write_report(tmp_path, m)["report"].read_text()
    assert "| 100.00 | 100.00 | n/a | n/a |" in md and "split(s) medium, few" in md


# --------------------------------------------------------------------------------------------- files + stage


def _classes_json(run, counts=COUNTS, names=NAMES) -> None:
    atomic_write_json(run / "classes.json", {
        "schema": 1, "dataset": "unit", "thresholds": {"many": 100, "few": 20},
        "classes": [{"index": i, "name": n, "id": n, "train_count": c} for i, (n, c) in enumerate(zip(names, counts))],
    })


def test_predictions_csv_and_npz_roundtrip(tmp_path) -> None:
    p = tmp_path / "preds.csv"
    p.write_text("label,prediction\n" + "".join(f"{y},{q}\n" for y, q in zip(LABELS, PREDS)))
    d = read_predictions_file(p)
    assert d["labels"].tolist() == LABELS.tolist() and d["predictions"].tolist() == PREDS.tolist()
    logits = np.eye(6)[PREDS]
    q = tmp_path / "logits.csv"
    q.write_text("label," + ",".join(f"logit_{i}" for i in range(6)) + "\n"
                 + "".join(f"{y}," + ",".join(map(str, r)) + "\n" for y, r in zip(LABELS, logits)))
    assert read_predictions_file(q)["predictions"].shape == (12, 6)
    z = tmp_path / "p.npz"
    np.savez(z, labels=LABELS, logits=logits, train_counts=np.array(COUNTS), class_names=np.array(NAMES))
    d = read_predictions_file(z)
    assert d["class_names"] == NAMES and d["predictions"].shape == (12, 6)


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("a.csv", "", r"a.csv:1: empty file"),
        ("b.csv", "lbl,prediction\n0,0\n", r"b.csv:1: no 'label' column"),
        ("c.csv", "label,pred\n0,0\n", r"c.csv:1: no 'prediction' or 'logit_0..'"),
        ("d.csv", "label,prediction\n0,0\n1,x\n", r"d.csv:3: non-numeric"),
        ("e.csv", "label,prediction\n0,0,1\n", r"e.csv:2: 3 fields but the header has 2"),
        ("f.csv", "label,logit_0,logit_2\n0,1,2\n", r"f.csv:1: logit columns must be logit_0"),
        ("g.txt", "label,prediction\n", r"g.txt: unknown predictions format '.txt'"),
        ("h.npz", "not a zip", r"h.npz: cannot read .npz"),
    ],
)
def test_bad_predictions_files(tmp_path, name, text, match) -> None:
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(DataError, match=match) as e:
        read_predictions_file(p)
    assert "\n" not in str(e.value)


def test_bad_npz_keys(tmp_path) -> None:
    z = tmp_path / "x.npz"
    np.savez(z, predictions=PREDS)
    with pytest.raises(DataError, match="no 'labels' array"):
        read_predictions_file(z)
    np.savez(z, labels=LABELS)
    with pytest.raises(DataError, match="no 'predictions' or 'logits'"):
        read_predictions_file(z)
    with pytest.raises(DataError, match="not found"):
        read_predictions_file(tmp_path / "missing.npz")


def test_run_eval_from_predictions_file_is_idempotent(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _classes_json(run)
    p = tmp_path / "preds.csv"
    p.write_text("label,prediction\n" + "".join(f"{y},{q}\n" for y, q in zip(LABELS, PREDS)))
    m = run_eval(EvalConfig(predictions=p), run)
    assert m["few"] == 50.0 and m["many"] == 87.5 and m["source"] == str(p)
    files = {f: (run / "eval" / f).stat().st_mtime_ns for f in ("metrics.json", "report.md", "per_class.png")}
    assert (run / "records" / "eval.config.json").exists() and (run / "records" / "eval.env.json").exists()
    assert run_eval(EvalConfig(predictions=p), run) == json.loads((run / "eval" / "metrics.json").read_text())
    assert {f: (run / "eval" / f).stat().st_mtime_ns for f in files} == files  # skipped, not rewritten
    # changed thresholds -> recomputed
    m2 = run_eval(EvalConfig(predictions=p, many=400, few=100), run)
    assert m2["split_classes"] == {"many": 1, "medium": 1, "few": 4}
    assert m2["few"] == pytest.approx((50 + 50 + 50) / 3)


def test_run_eval_unmasked_logits_file(tmp_path) -> None:
    """Logits with L + K columns (the full model, not exported): auxiliary argmaxes count as errors."""
    run = tmp_path / "run"
    run.mkdir()
    _classes_json(run)
    logits = np.eye(8)[PREDS]
    logits[0] = np.eye(8)[7]  # sample 0 (class 0) goes to auxiliary output 7
    z = tmp_path / "full.npz"
    np.savez(z, labels=LABELS, logits=logits)
    m = run_eval(EvalConfig(predictions=z), run)
    assert m["num_outputs"] == 8 and m["predictions_outside_classes"] == 1
    assert m["overall"] == pytest.approx(700 / 12) and m["many"] == pytest.approx((50 + 100) / 2)
    assert "fell on the model's extra (auxiliary) outputs" in (run / "eval" / "report.md").read_text()


def test_run_eval_needs_class_info(tmp_path) -> None:
    p = tmp_path / "preds.npz"
    np.savez(p, labels=LABELS, predictions=PREDS)
    with pytest.raises(NeighborLTError, match="no class_names/train_counts in the file"):
        run_eval(EvalConfig(predictions=p), tmp_path / "run")
    with pytest.raises(NeighborLTError, match="export.model.safetensors: not found; run `neighborlt export"):
        run_eval(EvalConfig(), tmp_path / "run")


def test_cli_eval_predictions_and_errors(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _classes_json(run)
    z = tmp_path / "preds.npz"
    np.savez(z, labels=LABELS, predictions=PREDS)
    main(["eval", str(run), "--predictions", str(z)])
    out = capsys.readouterr().out
    assert "| 66.67 | 87.50 | 50.00 | 50.00 |" in out
    assert json.loads((run / "eval" / "metrics.json").read_text())["overall"] == pytest.approx(800 / 12)

    np.savez(z, labels=LABELS[:-1], predictions=PREDS)
    with pytest.raises(SystemExit) as e:
        main(["eval", str(run), "--predictions", str(z)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: predictions: 12 predictions but 11 labels; both must describe the same test samples"

    with pytest.raises(SystemExit) as e:
        main(["eval", str(run), "--few", "-1", "--predictions", str(z)])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --few:")


def test_nan_never_in_metrics_json(tmp_path) -> None:
    m = evaluate_predictions([0], [0], [500, 3, 50], ["a", "b", "c"])
    p = write_report(tmp_path, m)["metrics"]
    data = json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert data["few"] is None and data["medium"] is None and not math.isnan(data["overall"])


def test_run_eval_uses_recorded_thresholds(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _classes_json(run)
    doc = json.loads((run / "classes.json").read_text())
    doc["thresholds"] = {"many": 400, "few": 100}
    atomic_write_json(run / "classes.json", doc)
    z = tmp_path / "preds.npz"
    np.savez(z, labels=LABELS, predictions=PREDS)
    m = run_eval(EvalConfig(predictions=z), run)
    assert m["thresholds"] == {"many": 400, "few": 100} and m["split_classes"] == {"many": 1, "medium": 1, "few": 4}
    m = run_eval(EvalConfig(predictions=z, few=10), run)  # an explicit option wins
    assert m["thresholds"] == {"many": 400, "few": 10}


# --------------------------------------------------------------------------------------------- model on real data


@pytest.mark.slow  # ~11 s warm; ~35 s when it is the first test to extract cifar10.tar.gz
def test_eval_model_on_cifar10_protocol(data_dir, tmp_path, capsys) -> None:
    """classes -> (engine-format weights) -> export -> eval on the real CIFAR-10 split-neighbour protocol."""
    import torch
    from safetensors.torch import save_file

    from neighborlt.classes import ClassesConfig, run_classes
    from neighborlt.export import export_direct
    from neighborlt.train import predict_logits
    from neighborlt.train.models import classifier_keys, create_model

    torch.manual_seed(0)
    run = tmp_path / "run"
    # the two auxiliary outputs' classes as the pool (not 5: 10,000 pool rows, not 25,000, that eval never reads)
    run_classes(ClassesConfig(protocol="cifar10-neighbours", pool=["dog", "truck"], data_dir=str(data_dir)), run)
    names = [r["name"] for r in json.loads((run / "classes.json").read_text())["classes"]]
    model = create_model("resnet8_cifar", num_classes=len(names) + 2)
    w, b = classifier_keys(model)
    (run / "train").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "train" / "model.safetensors"))
    atomic_write_json(run / "train" / "model.json", {
        "schema": 1, "architecture": "resnet8_cifar", "init": "random", "image_size": 32,
        "num_classes": len(names) + 2, "num_target_classes": len(names), "class_names": names + ["dog", "truck"],
        "classifier": {"weight": w, "bias": b}, "frozen": None, "weights": "model.safetensors",
    })
    export_direct(run)
    direct = run_eval(EvalConfig(max_test_per_class=20, batch_size=64), run)
    assert direct["n_test"] == 100 and direct["split_classes"] == {"many": 2, "medium": 1, "few": 2}
    assert direct["thresholds"] == {"many": 100, "few": 20}
    # independent recomputation from the model's logits on the same 20 images per class
    from neighborlt.data import load_targets

    test = load_targets(RunDir(run)).target_test
    keep = np.sort(np.concatenate([np.flatnonzero(test.labels == c)[:20] for c in range(len(names))]))
    logits = predict_logits(run / "export", test.subset(keep))
    assert logits.shape == (100, len(names))
    expect = shot_accuracy(logits, test.labels[keep], [500, 158, 50, 15, 5])
    assert {k: direct[k] for k in expect} == pytest.approx(expect)
    # the unmasked L + K model can only lose: a correct full-model argmax is also the target-rows argmax
    full = run_eval(EvalConfig(model="train", max_test_per_class=20, batch_size=64, out=run / "eval-train"), run)
    assert full["num_outputs"] == len(names) + 2
    for d, f in zip(direct["per_class"], full["per_class"]):
        assert f["correct"] <= d["correct"]
    assert (run / "eval" / "report.md").exists() and (run / "eval-train" / "per_class.png").exists()
    main(["eval", str(run), "--max-test-per-class", "20", "--batch-size", "64"])  # same config: skipped
    assert f"| {direct['overall']:.2f} |" in capsys.readouterr().out


# ECE: 3 targets + 1 auxiliary output (column 3, the largest logit everywhere: it must be masked). Target
# probabilities are given as log-probabilities, so softmax over the targets returns them exactly.
ECE_PROBS = np.array([[0.90, 0.05, 0.05],   # conf 0.90, correct -> bin 13 (13/15, 14/15]
                      [0.62, 0.28, 0.10],   # conf 0.62, wrong   -> bin 9 (9/15, 10/15]
                      [0.20, 0.70, 0.10],   # conf 0.70, correct -> bin 10 (10/15, 11/15]
                      [0.10, 0.25, 0.65]])  # conf 0.65, wrong   -> bin 9
ECE_LABELS = np.array([0, 1, 1, 0])
# bin 13: 1/4 * |1 - 0.9| ; bin 9: 2/4 * |0 - (0.62 + 0.65) / 2| ; bin 10: 1/4 * |1 - 0.7|
ECE_EXPECTED = 100 * (0.25 * 0.1 + 0.5 * 0.635 + 0.25 * 0.3)  # = 41.75 %


def _ece_logits() -> np.ndarray:
    return np.concatenate([np.log(ECE_PROBS), np.full((4, 1), 5.0)], 1)


def test_ece_hand_computed() -> None:
    assert expected_calibration_error(_ece_logits(), ECE_LABELS, num_target=3) == pytest.approx(ECE_EXPECTED)
    assert ECE_EXPECTED == pytest.approx(41.75)
    # unmasked, the auxiliary column would take every prediction: a different number
    assert expected_calibration_error(_ece_logits(), ECE_LABELS) != pytest.approx(ECE_EXPECTED)
    # one bin: |accuracy - mean confidence| = |0.5 - 0.7175|
    assert expected_calibration_error(_ece_logits(), ECE_LABELS, 3, bins=1) == pytest.approx(21.75)
    # perfectly confident and right: 0; shift-invariant logits
    assert expected_calibration_error(np.array([[50.0, 0.0], [0.0, 50.0]]), [0, 1]) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(_ece_logits() + 3.0, ECE_LABELS, 3) == pytest.approx(ECE_EXPECTED)
    assert expected_calibration_error(np.zeros((0, 3)), np.zeros(0, np.int64)) is None
    with pytest.raises(DataError, match="logit rows"):
        expected_calibration_error(_ece_logits(), ECE_LABELS[:2], 3)


def test_ece_in_metrics_and_eval(tmp_path) -> None:
    m = evaluate_predictions(_ece_logits(), ECE_LABELS, [50, 30, 10], ["a", "b", "c"], num_outputs=4)
    assert m["ece"] == pytest.approx(ECE_EXPECTED) and m["ece_bins"] == 15 and m["num_outputs"] == 4
    assert evaluate_predictions(ECE_LABELS, ECE_LABELS, [50, 30, 10], ["a", "b", "c"])["ece"] is None  # indices only
    run = tmp_path / "run"
    run.mkdir()
    z = tmp_path / "full.npz"
    np.savez(z, labels=ECE_LABELS, logits=_ece_logits(), class_names=np.array(["a", "b", "c"]),
             train_counts=np.array([50, 30, 10]))
    out = run_eval(EvalConfig(predictions=z), run)
    assert json.loads((run / "eval" / "metrics.json").read_text())["ece"] == pytest.approx(ECE_EXPECTED)
    assert out["ece"] == pytest.approx(ECE_EXPECTED)
    assert "Expected calibration error: 41.75 %" in (run / "eval" / "report.md").read_text()
