"""Gradients and training through spa.torch: the gradient criteria, spa finetune (with resume),
spa train-sparse and the exact removal of its zeroed channels (spa prune --zeros)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from spa.backends import ort as ort_backend

import spa
from spa import api
from spa.api.train import finetune, train_sparse
from spa.cli.app import main
from spa.core import cost
from spa.core.errors import UsageError
from spa.scoring import criteria, gradients

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
from models import digits
from spa.torch import to_torch, write_back


def tiny_cnn(seed: int = 0, dead: int | None = None) -> onnx.ModelProto:
    """Conv(1->8) Relu Conv(8->12) Relu Flatten Gemm(768->10) on 1x8x8 digits; channel `dead`
    of the first conv has zero weights and bias."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 1, 3, 3)).astype(np.float32) * 0.6
    b1 = rng.standard_normal(8).astype(np.float32) * 0.1
    if dead is not None:
        w1[dead], b1[dead] = 0, 0
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(rng.standard_normal((12, 8, 3, 3)).astype(np.float32) * 0.2, "w2"),
             numpy_helper.from_array(np.zeros(12, np.float32), "b2"),
             numpy_helper.from_array(rng.standard_normal((10, 768)).astype(np.float32) * 0.05, "w3"),
             numpy_helper.from_array(np.zeros(10, np.float32), "b3")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def data():
    return digits.load_data()


@pytest.fixture
def files(tmp_path, data):
    """tiny.onnx, train.npz (x, labels), test.npz in tmp_path."""
    onnx.save(tiny_cnn(), tmp_path / "tiny.onnx")
    np.savez(tmp_path / "train.npz", x=data["x_train"], labels=data["y_train"])
    np.savez(tmp_path / "test.npz", x=data["x_test"], labels=data["y_test"])
    return tmp_path


def _accuracy(path, data) -> float:
    out = ort_backend.run(str(path), {"x": data["x_test"]})["logits"]
    return float((out.argmax(1) == data["y_test"]).mean())


def _cli_json(capsys, *args) -> dict:
    code = main([*map(str, args), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _params(proto) -> int:
    return cost.summary(api.reinfer(proto))["params"]


def _first_group(analysis):
    return next(g for g in analysis.groups if g.prunable and any(m.tensor == "w1" for m in g.members))


# -- gradient criteria --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", gradients.KINDS)
def test_dead_channel_has_zero_gradient_saliency(data, kind):
    analysis = spa.analyze(api.reinfer(tiny_cnn(dead=3)))
    sal = api.saliency(analysis, kind, {"x": data["x_train"][:128]}, labels=data["y_train"][:128])
    scores = criteria.score(analysis, kind, data=sal)[_first_group(analysis).id]
    assert scores[3] == 0
    assert np.count_nonzero(scores) >= len(scores) // 2  # (a channel whose ReLU never fires is dead too)
    if kind != "grasp":  # grasp's sums are signed: the dead channel is not necessarily the lowest
        assert scores.min() == 0


def test_taylor_is_the_derivative_of_the_loss_along_a_channel(data):
    """|dL/da| for the channel's member slices scaled by a, by central differences in ONNX Runtime."""
    proto = tiny_cnn()
    analysis = spa.analyze(api.reinfer(proto))
    x, y = data["x_train"][:200], data["y_train"][:200]
    sal = api.saliency(analysis, "taylor", {"x": x}, labels=y)
    group = _first_group(analysis)
    scores = criteria.score(analysis, "taylor", data=sal)[group.id]

    def loss(channel, a):
        values = {}
        for m in group.members:
            arr = values.setdefault(m.tensor, numpy_helper.to_array(
                next(t for t in proto.graph.initializer if t.name == m.tensor)).astype(np.float64))
            idx = [slice(None)] * arr.ndim
            idx[m.axis] = np.asarray(m.positions[channel])
            arr[tuple(idx)] *= a
        logits = ort_backend.run(api.with_values(proto, {k: v.astype(np.float32) for k, v in values.items()}),
                                 {"x": x})["logits"].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        return -logp[np.arange(len(y)), y].mean()

    eps = 1e-2
    for c in (0, 5):
        numeric = abs(loss(c, 1 + eps) - loss(c, 1 - eps)) / (2 * eps)
        assert scores[c] == pytest.approx(numeric, rel=0.05, abs=1e-5)


def test_without_labels_the_models_own_predictions_are_the_targets(data):
    analysis = spa.analyze(api.reinfer(tiny_cnn()))
    feeds = {"x": data["x_train"][:64]}
    with torch.no_grad():
        own = to_torch(analysis.model.proto).run(feeds)["logits"].argmax(-1).numpy()
    a = api.saliency(analysis, "snip", feeds)
    b = api.saliency(analysis, "snip", feeds, labels=own)
    assert not a.labels and b.labels
    assert all(np.allclose(a.scores[k], b.scores[k]) for k in a.scores)


def test_gradient_criterion_without_data_is_one_line(files, capsys):
    code = main(["prune", str(files / "tiny.onnx"), "--ratio", "0.5", "--criterion", "snip", "-o",
                 str(files / "out.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "needs calibration data" in err and len(err.strip().splitlines()) == 1  # a usage error
    assert not (files / "out.onnx").exists()


def test_cli_prune_with_a_gradient_criterion(files, capsys):
    doc = _cli_json(capsys, "prune", files / "tiny.onnx", "--ratio", "0.5", "--criterion", "grasp", "--calib",
                    files / "train.npz", "--labels", "labels", "--calib-samples", "256", "-o", files / "p.onnx")
    assert doc["statistics"] == {"source": "gradients", "samples": 256, "labels": "data"}
    assert doc["after"]["params"] < doc["before"]["params"]


# -- fine-tuning ----------------------------------------------------------------------------------

def test_finetune_learns_and_writes_back_into_the_same_graph(files, capsys, data):
    before = _accuracy(files / "tiny.onnx", data)
    doc = _cli_json(capsys, "finetune", files / "tiny.onnx", "--data", files / "train.npz", "--labels", "labels",
                    "--epochs", "4", "--lr", "0.01", "-o", files / "ft.onnx")
    after = _accuracy(files / "ft.onnx", data)
    assert after > before + 0.3, (before, after)
    assert [h["epoch"] for h in doc["history"]] == [1, 2, 3, 4]
    assert doc["metric"] == "accuracy" and doc["best"] == max(h["accuracy"] for h in doc["history"])
    assert doc["write_back_max_rel_err"] < 1e-5
    old, new = onnx.load(files / "tiny.onnx"), onnx.load(files / "ft.onnx")
    assert old.graph.node == new.graph.node and old.graph.input == new.graph.input
    assert old.graph.output == new.graph.output
    assert [t.name for t in old.graph.initializer] == [t.name for t in new.graph.initializer]
    assert (files / "ft.onnx.ckpt").is_file()


def test_resume_continues_to_the_same_weights(files, data):
    from spa.training.train import FitConfig, fit

    proto = tiny_cnn()
    feeds, y = {"x": data["x_train"][:512]}, data["y_train"][:512]
    val = ({"x": data["x_test"][:128]}, data["y_test"][:128])
    cfg = FitConfig(epochs=4, lr=0.01, batch_size=64)
    straight = fit(proto, feeds, y, val=val, cfg=cfg)
    ckpt = files / "run.ckpt"

    def interrupt(done, total, loss):
        if done == 2 * 8 + 3:  # in epoch 3, after epoch 2's checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(proto, feeds, y, val=val, cfg=cfg, checkpoint=ckpt, progress=interrupt)
    resumed = fit(proto, feeds, y, val=val, cfg=cfg, checkpoint=ckpt, resume=True)
    assert resumed.resumed_from == 2 and len(resumed.history) == 4
    a = {t.name: numpy_helper.to_array(t) for t in straight.proto.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in resumed.proto.graph.initializer}
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("criterion", ["taylor", "obspa"])
def test_finetune_with_ratio_prunes_then_distills(files, capsys, criterion):
    doc = _cli_json(capsys, "finetune", files / "tiny.onnx", "--data", files / "train.npz", "--labels", "labels",
                    "--ratio", "0.5", "--criterion", criterion, "--epochs", "1", "--threads", "1",
                    "-o", files / "pft.onnx")
    first = doc["pruned_first"]
    assert first["criterion"] == criterion and first["channels_removed"] > 0
    assert first["compensated"] == (criterion == "obspa")  # as spa prune's default
    assert doc["after"]["params"] < doc["before"]["params"]
    assert doc["distill_from"] is None  # the dense input is the teacher unless --no-distill
    assert spa.load(files / "pft.onnx").proto.graph.initializer


@pytest.mark.parametrize("extra,message,exit_code", [
    ([], "no labels and no teacher", 2),
    (["--labels", "nope"], "no labels key 'nope'", 1),
    (["--labels", "labels", "--epochs", "0"], "invalid --epochs 0", 2),
    (["--labels", "labels", "--resume"], "cannot resume: no checkpoint", 1),
    (["--labels", "labels", "--distill-from", "missing.onnx"], "no such file", 1),
    (["--labels", "labels", "--val-split", "1.5"], "invalid --val-split", 2),
])
def test_finetune_bad_input_is_one_line(files, capsys, extra, message, exit_code):
    out = files / "bad.onnx"
    code = main(["finetune", str(files / "tiny.onnx"), "--data", str(files / "train.npz"), *extra, "-o", str(out)])
    err = capsys.readouterr().err
    assert code == exit_code and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


# -- the Python API: spa.api.train.finetune / train_sparse, the same documents as the commands ------

def _without_timings(doc: dict) -> dict:
    """The document less what depends on the run's speed: each epoch's "seconds"."""
    return {**doc, "history": [{k: v for k, v in h.items() if k != "seconds"} for h in doc["history"]]}


def test_finetune_api_gives_the_cli_document(files, capsys):
    out = files / "ft.onnx"
    cli = _cli_json(capsys, "finetune", files / "tiny.onnx", "--data", files / "train.npz", "--labels", "labels",
                    "--ratio", "0.5", "--epochs", "1", "--lr", "0.01", "--threads", "1", "-o", out)
    steps = []
    result = finetune(str(files / "tiny.onnx"), data=str(files / "train.npz"), labels="labels", ratio=0.5, epochs=1,
                      lr=0.01, threads=1, output=str(out), progress=lambda what: steps.append(what) or contextlib.nullcontext())
    assert _without_timings(result.to_json()) == _without_timings(cli)
    assert steps == ["load + shape inference", "analysis", "scoring (l1) + planning", "pruning", "saving + checking"]
    assert capsys.readouterr().out == ""  # the API prints nothing
    onnx.checker.check_model(result.model)
    assert _params(result.model) == cli["after"]["params"] < cli["before"]["params"]


def test_train_sparse_api_gives_the_cli_document(files, capsys):
    out, plan_file = files / "sparse.onnx", files / "plan.json"
    cli = _cli_json(capsys, "train-sparse", files / "tiny.onnx", "--data", files / "train.npz", "--labels", "labels",
                    "--target-ratio", "0.5", "--epochs", "2", "--lr", "0.01", "--threads", "1",
                    "--save-plan", plan_file, "-o", out)
    result = train_sparse(str(files / "tiny.onnx"), data=str(files / "train.npz"), labels="labels", target_ratio=0.5,
                          epochs=2, lr=0.01, threads=1, save_plan=str(plan_file), output=str(out))
    assert _without_timings(result.to_json()) == _without_timings(cli)
    assert json.loads(plan_file.read_text())["groups"] == result.plan
    onnx.checker.check_model(result.model)


def test_finetune_api_in_memory(data, tmp_path):
    """A ModelProto and arrays in, a ModelProto out; nothing written until .save()."""
    arrays = {"x": data["x_train"][:256], "labels": data["y_train"][:256]}
    result = finetune(tiny_cnn(), data=arrays, labels="labels", epochs=1, threads=1)
    doc = result.to_json()
    assert doc["input"] is None and doc["output"] is None and doc["checkpoint"] is None
    assert doc["write_back_max_rel_err"] < 1e-5 and [h["epoch"] for h in doc["history"]] == [1]
    assert isinstance(result.model, onnx.ModelProto) and list(tmp_path.iterdir()) == []
    result.save(tmp_path / "ft.onnx")  # re-checked on the written file
    assert [t.name for t in onnx.load(tmp_path / "ft.onnx").graph.initializer] == \
        [t.name for t in tiny_cnn().graph.initializer]


@pytest.mark.parametrize("kwargs,param,flag", [
    ({"epochs": 0}, "epochs=0", ["--epochs", "0"]),
    ({"val_split": 1.5}, "val_split=1.5", ["--val-split", "1.5"]),
    ({"threads": 0}, "threads=0", ["--threads", "0"]),
])
def test_bad_training_values_are_usage_errors(files, capsys, kwargs, param, flag):
    with pytest.raises(UsageError, match=param):
        finetune(str(files / "tiny.onnx"), data=str(files / "train.npz"), labels="labels", **kwargs,
                 output=str(files / "bad.onnx"))
    code = main(["finetune", str(files / "tiny.onnx"), "--data", str(files / "train.npz"), "--labels", "labels",
                 *flag, "-o", str(files / "bad.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and f"invalid {' '.join(flag)}" in err, err
    assert not (files / "bad.onnx").exists()


def test_bad_sparse_training_values_are_usage_errors(files, capsys):
    with pytest.raises(UsageError, match="target_ratio=1.5"):
        train_sparse(str(files / "tiny.onnx"), data=str(files / "train.npz"), labels="labels", target_ratio=1.5)
    code = main(["train-sparse", str(files / "tiny.onnx"), "--data", str(files / "train.npz"), "--labels", "labels",
                 "--target-ratio", "0.5", "--warmup", "0.8", "-o", str(files / "bad.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "invalid --warmup 0.8, --window 0.5" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(files, capsys):
    code = main(["finetune", str(files / "tiny.onnx"), "--data", str(files / "train.npz"), "--labels", "labels",
                 "--device", "cuda", "-o", str(files / "x.onnx")])
    assert code == 1 and "no CUDA GPU" in capsys.readouterr().err


# -- group-sparse training -----------------------------------------------------------------------

def test_train_sparse_zeroes_whole_channels_and_prune_zeros_is_exact(files, capsys, data):
    sparse = files / "sparse.onnx"
    doc = _cli_json(capsys, "train-sparse", files / "tiny.onnx", "--data", files / "train.npz", "--labels", "labels",
                    "--target-ratio", "0.5", "--epochs", "6", "--lr", "0.01", "--save-plan", files / "plan.json",
                    "-o", sparse)
    analysis = spa.analyze(spa.load(sparse))
    plan = json.loads((files / "plan.json").read_text())
    from spa.training.train import zero_plan

    assert zero_plan(analysis) == plan["groups"]  # exactly the channels the schedule zeroed
    assert doc["train_sparse"]["zero_channels"] == 4 + 6  # half of 8 and of 12
    assert doc["history"][-1]["zero_channels"] == 10
    pruned = files / "pruned.onnx"
    res = _cli_json(capsys, "prune", sparse, "--zeros", "-o", pruned)
    assert res["channels_removed"] == 10 and res["zeros"]
    assert res["check"]["max_rel_err"] <= 1e-5
    a = ort_backend.run(str(sparse), {"x": data["x_test"]})["logits"]
    b = ort_backend.run(str(pruned), {"x": data["x_test"]})["logits"]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    assert res["after"]["params"] == _cli_json(capsys, "prune", files / "tiny.onnx", "--ratio", "0.5", "-o",
                                               files / "uniform.onnx")["after"]["params"]


def test_prune_zeros_on_a_dense_model_removes_nothing(files, capsys):
    res = _cli_json(capsys, "prune", files / "tiny.onnx", "--zeros", "-o", files / "same.onnx")
    assert res["channels_removed"] == 0 and res["after"]["params"] == res["before"]["params"]


# -- precision and devices -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_half_precision_runs_the_float32_graph(data, dtype, tol):
    proto = tiny_cnn()
    module = to_torch(proto).to(getattr(torch, dtype))
    with torch.no_grad():
        out = module.run({"x": data["x_test"]})["logits"]
    assert out.dtype == getattr(torch, dtype)
    ref = ort_backend.run(proto, {"x": data["x_test"]})["logits"]
    assert np.linalg.norm(out.float().numpy() - ref) / np.linalg.norm(ref) < tol
    # written back in the graph's own dtype
    back = write_back(proto, module)
    assert all(t.data_type == TensorProto.FLOAT for t in back.graph.initializer)


def test_sensitivity_ranks_with_a_gradient_criterion(data):
    from spa.planning import sensitivity

    analysis = spa.analyze(api.reinfer(tiny_cnn(dead=3)))
    doc = sensitivity.sensitivity(analysis, {"x": data["x_test"][:64]}, [0.5], criterion="snip")
    assert doc["criterion"] == "snip" and {g["id"] for g in doc["groups"]} == {"w1:0", "w2:0"}
    assert all(g["channels_dropped"] == [g["size"] // 2] and 0 <= g["loss"][0] < 1 for g in doc["groups"])


def test_python_api_sparse_training_then_exact_removal(data):
    """The same path as the CLI, from Python: HessoSchedule + fit, zero_plan, prune."""
    from spa.training.train import FitConfig, HessoSchedule, fit, zero_plan

    analysis = spa.analyze(api.reinfer(tiny_cnn(seed=3)))
    schedule = HessoSchedule(analysis, 0.25, periods=2, warmup=0.25, window=0.5)
    result = fit(analysis.model.proto, {"x": data["x_train"][:512]}, data["y_train"][:512],
                 cfg=FitConfig(epochs=4, lr=0.01), schedule=schedule)
    assert result.best_epoch >= 3  # only epochs after the pruning window count
    trained = spa.analyze(api.reinfer(result.proto))
    plan = zero_plan(trained)
    assert plan == schedule.plan() and sum(map(len, plan.values())) == 2 + 3  # a quarter of 8 and of 12
    pruned = api.prune(trained, plan)
    a = ort_backend.run(result.proto, {"x": data["x_test"]})["logits"]
    b = ort_backend.run(pruned, {"x": data["x_test"]})["logits"]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_finetune_keep_sparsity_keeps_a_2_4_pattern(files, capsys):
    from spa.passes import sparsify as sp

    _cli_json(capsys, "sparsify", files / "tiny.onnx", "--min-size", "4", "-o", files / "s.onnx")
    _cli_json(capsys, "finetune", files / "s.onnx", "--data", files / "train.npz", "--labels", "labels",
              "--epochs", "2", "--keep-sparsity", "-o", files / "sft.onnx")
    _cli_json(capsys, "finetune", files / "s.onnx", "--data", files / "train.npz", "--labels", "labels",
              "--epochs", "2", "-o", files / "dense_again.onnx")
    held = [x.holds for x in sp.layers(onnx.load(files / "sft.onnx"), 2, 4, min_size=4) if x.eligible]
    lost = [x.holds for x in sp.layers(onnx.load(files / "dense_again.onnx"), 2, 4, min_size=4) if x.eligible]
    assert held and all(held) and not any(lost)  # without the flag, training refills the zeros
