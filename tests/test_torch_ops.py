"""spa.torch op functions against ONNX Runtime, one small graph per attribute variant.

Every case builds a single-node (or few-node) model with onnx.helper, runs it in ORT (CPU) and
in `spa.torch.OnnxModule`, and asserts rel. err <= 1e-5 on float outputs and equality on the
others. Cases ORT cannot run (LSTM/GRU/RNN layout=1) use the ONNX reference implementation.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import spa.torch as st
from spa.core.errors import SpaError

TOL = 1e-5
MS = "com.microsoft"
ML = "ai.onnx.ml"
NP_TO_ONNX = {np.dtype(np.float32): T.FLOAT, np.dtype(np.int64): T.INT64, np.dtype(np.int32): T.INT32,
              np.dtype(np.bool_): T.BOOL, np.dtype(np.float64): T.DOUBLE, np.dtype(np.uint8): T.UINT8}


def rng(seed=0):
    return np.random.default_rng(seed)


def randn(*shape, seed=0, scale=1.0):
    return (rng(seed).standard_normal(shape) * scale).astype(np.float32)


def make_model(nodes, feeds: dict, outputs, inits: dict | None = None, opset: int = 17, extra=None):
    """A model over `nodes`; graph inputs from the feeds, outputs as names or value infos."""
    inputs = [helper.make_tensor_value_info(k, NP_TO_ONNX[v.dtype], list(v.shape)) for k, v in feeds.items()]
    outs = [o if isinstance(o, onnx.ValueInfoProto) else helper.make_empty_tensor_value_info(o) for o in outputs]
    initializer = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(nodes, "g", inputs, outs, initializer)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra or {}).items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10 if opset >= 21 else 8 if opset < 18 else 9)


def run_ort(model, feeds):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def run_reference(model, feeds):
    from onnx.reference import ReferenceEvaluator

    names = [o.name for o in model.graph.output]
    return dict(zip(names, ReferenceEvaluator(model).run(None, feeds)))


def run_torch(model, feeds, grad=False):
    module = st.OnnxModule(model)
    if grad:
        return module, module.run(feeds)
    with torch.no_grad():
        return module.run(feeds)


def rel_err(ref, got) -> float:
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(ref64 - got64) / max(np.linalg.norm(ref64), 1e-12))


def check(model, feeds, reference=run_ort, tol=TOL):
    """Outputs of the torch module equal the reference's (shapes, dtypes, values)."""
    ref = reference(model, feeds)
    got = run_torch(model, feeds)
    for name, r in ref.items():
        g = got[name]
        if isinstance(r, list):  # sequence of maps (ZipMap)
            assert len(g) == len(r)
            for a, b in zip(r, g):
                assert list(a) == list(b)
                np.testing.assert_allclose([b[k] for k in a], [a[k] for k in a], rtol=1e-6)
            continue
        g = g.detach().numpy()
        assert g.shape == r.shape, (name, r.shape, g.shape)
        if r.dtype.kind == "f":
            assert g.dtype == r.dtype, (name, r.dtype, g.dtype)
            err = rel_err(r, g)
            assert err <= tol, (name, err)
        else:
            np.testing.assert_array_equal(g, r, err_msg=name)
    return ref, got


def single(op_type, feeds, inits=None, n_out=1, opset=17, domain="", extra=None, inputs=None, **attrs):
    """A one-node model: inputs are the feeds then the initializers (or `inputs`)."""
    names = inputs if inputs is not None else list(feeds) + list(inits or {})
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op_type, names, outs, domain=domain or None, **attrs)
    return make_model([node], feeds, outs, inits, opset, extra)


# ---------------------------------------------------------------------------------------------
# Resize / Upsample
# ---------------------------------------------------------------------------------------------

X4 = randn(2, 3, 5, 7)
CTMS = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "tf_crop_and_resize"]
SCALES = [[1, 1, 2.0, 3.0], [1, 1, 1.7, 0.6], [1, 1, 0.5, 0.4], [1, 1, 3.3, 1.0]]


def _resize(opset, feeds, roi=None, scales=None, sizes=None, **attrs):
    inits = {"roi": np.asarray(roi if roi is not None else [], np.float32),
             "scales": np.asarray(scales if scales is not None else [], np.float32)}
    names = ["x", "roi", "scales"]
    if sizes is not None:
        inits["sizes"] = np.asarray(sizes, np.int64)
        names.append("sizes")
    return single("Resize", feeds, inits, opset=opset, inputs=names, **attrs)


def _roi(ctm):
    return [0, 0, 0.2, 0.1, 1, 1, 0.9, 1.2] if ctm == "tf_crop_and_resize" else None


@pytest.mark.parametrize("nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
@pytest.mark.parametrize("ctm", CTMS + ["tf_half_pixel_for_nn"])
@pytest.mark.parametrize("scales", SCALES)
def test_resize_nearest(ctm, nearest_mode, scales):
    opset = 11 if ctm == "tf_half_pixel_for_nn" else 13
    model = _resize(opset, {"x": X4}, _roi(ctm), scales, mode="nearest", coordinate_transformation_mode=ctm,
                    nearest_mode=nearest_mode, extrapolation_value=-3.0)
    check(model, {"x": X4})


@pytest.mark.parametrize("ctm", CTMS)
@pytest.mark.parametrize("scales", SCALES)
def test_resize_linear(ctm, scales):
    model = _resize(13, {"x": X4}, _roi(ctm), scales, mode="linear", coordinate_transformation_mode=ctm)
    check(model, {"x": X4})


@pytest.mark.parametrize("exclude_outside", [0, 1])
@pytest.mark.parametrize("ctm", CTMS)
@pytest.mark.parametrize("scales", SCALES[:3])
def test_resize_cubic(ctm, scales, exclude_outside):
    model = _resize(13, {"x": X4}, _roi(ctm), scales, mode="cubic", coordinate_transformation_mode=ctm,
                    exclude_outside=exclude_outside, cubic_coeff_a=-0.5 if exclude_outside else -0.75)
    check(model, {"x": X4})


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("sizes", [[2, 3, 9, 4], [2, 3, 1, 13], [2, 3, 5, 7]])
def test_resize_sizes(mode, sizes):
    for ctm in ("half_pixel", "align_corners", "pytorch_half_pixel"):
        check(_resize(13, {"x": X4}, sizes=sizes, mode=mode, coordinate_transformation_mode=ctm), {"x": X4})


@pytest.mark.parametrize("policy", ["stretch", "not_larger", "not_smaller"])
def test_resize_axes_and_keep_aspect_ratio_opset18(policy):
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y0"], mode="linear", axes=[2, 3],
                            keep_aspect_ratio_policy=policy)
    check(make_model([node], {"x": X4}, ["y0"], {"sizes": np.array([9, 4], np.int64)}, opset=18), {"x": X4})
    node = helper.make_node("Resize", ["x", "", "scales"], ["y0"], mode="nearest", axes=[3, 2])
    check(make_model([node], {"x": X4}, ["y0"], {"scales": np.array([1.5, 0.8], np.float32)}, opset=18), {"x": X4})


def test_resize_half_pixel_symmetric_opset19():
    node = helper.make_node("Resize", ["x", "", "scales"], ["y0"], mode="linear",
                            coordinate_transformation_mode="half_pixel_symmetric")
    model = make_model([node], {"x": X4}, ["y0"], {"scales": np.array([1, 1, 1.7, 0.6], np.float32)}, opset=19)
    check(model, {"x": X4})


@pytest.mark.parametrize("exclude_outside", [0, 1])
@pytest.mark.parametrize("ctm", ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_resize_antialias_opset18(mode, ctm, exclude_outside):
    x = randn(2, 3, 11, 13)
    for scales in ([1, 1, 1.7, 2.5], [1, 1, 0.5, 0.4], [1, 1, 0.3, 1.0]):
        node = helper.make_node("Resize", ["x", "", "scales"], ["y0"], mode=mode, antialias=1,
                                exclude_outside=exclude_outside, coordinate_transformation_mode=ctm)
        check(make_model([node], {"x": x}, ["y0"], {"scales": np.array(scales, np.float32)}, opset=18), {"x": x})


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1, 1, 2, 2], [1, 1, 1.5, 2.5], [1, 1, 0.5, 0.7]])
def test_resize_opset10(mode, scales):
    model = single("Resize", {"x": X4}, {"scales": np.array(scales, np.float32)}, opset=10, mode=mode)
    check(model, {"x": X4})


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_upsample_opset7_and_9(mode):
    check(single("Upsample", {"x": X4}, opset=7, mode=mode, scales=[1.0, 1.0, 2.0, 1.5]), {"x": X4})
    model = single("Upsample", {"x": X4}, {"scales": np.array([1, 1, 1.5, 3], np.float32)}, opset=9, mode=mode)
    check(model, {"x": X4})


def test_resize_nearest_uint8():
    x = rng().integers(0, 255, (1, 2, 4, 5)).astype(np.uint8)
    check(_resize(13, {"x": x}, scales=[1, 1, 2.5, 1.5], mode="nearest"), {"x": x})


def test_resize_linear_is_differentiable():
    w = randn(1, 2, 4, 4)
    nodes = [helper.make_node("Resize", ["w", "", "scales"], ["r"], mode="linear"),
             helper.make_node("Mul", ["r", "x"], ["y"])]
    x = randn(1, 2, 6, 10, seed=1)
    model = make_model(nodes, {"x": x}, ["y"], {"w": w, "scales": np.array([1, 1, 1.5, 2.5], np.float32)}, opset=13)
    module, out = run_torch(model, {"x": x}, grad=True)
    out["y"].sum().backward()
    grad = module.tensor("w").grad
    assert grad is not None and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# recurrent layers
# ---------------------------------------------------------------------------------------------

SEQ, BATCH, IN, HID = 5, 3, 4, 6
LENS = np.array([5, 2, 4], np.int32)


def _rnn_case(op_type, gates, direction, bias, lens, init, peephole=False, layout=0, **attrs):
    dirs = 2 if direction == "bidirectional" else 1
    x = randn(BATCH, SEQ, IN) if layout else randn(SEQ, BATCH, IN)
    feeds = {"x": x}
    inits = {"w": randn(dirs, gates * HID, IN, seed=1, scale=0.5), "r": randn(dirs, gates * HID, HID, seed=2, scale=0.5)}
    names = ["x", "w", "r", "", "", "", "", ""][:8 if op_type == "LSTM" else 6]
    names[1:3] = ["w", "r"]
    if bias:
        inits["b"] = randn(dirs, 2 * gates * HID, seed=3)
        names[3] = "b"
    if lens:
        feeds["lens"] = LENS
        names[4] = "lens"
    state = [BATCH, dirs, HID] if layout else [dirs, BATCH, HID]
    if init:
        feeds["h0"] = randn(*state, seed=4)
        names[5] = "h0"
        if op_type == "LSTM":
            feeds["c0"] = randn(*state, seed=5)
            names[6] = "c0"
    if peephole:
        inits["p"] = randn(dirs, 3 * HID, seed=6)
        names[7] = "p"
    while names and names[-1] == "":
        names.pop()
    n_out = 3 if op_type == "LSTM" else 2
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op_type, names, outs, hidden_size=HID, direction=direction, layout=layout, **attrs)
    return make_model([node], feeds, outs, inits, opset=14), feeds


DIRECTIONS = ["forward", "reverse", "bidirectional"]
VARIANTS = [{"bias": False, "lens": False, "init": False}, {"bias": True, "lens": False, "init": True},
            {"bias": True, "lens": True, "init": True}, {"bias": True, "lens": True, "init": False}]


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_lstm(direction, variant):
    check(*_rnn_case("LSTM", 4, direction, **VARIANTS[variant]))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("attrs", [{"peephole": True}, {"clip": 0.7}, {"input_forget": 1, "peephole": True},
                                   {"activations": ["HardSigmoid", "LeakyRelu", "ScaledTanh"],
                                        "activation_alpha": [0.3, 0.05, 1.2], "activation_beta": [0.4, 0.7]}])
def test_lstm_options(direction, attrs):
    attrs = dict(attrs)
    if "activations" in attrs and direction == "bidirectional":
        attrs["activations"] = attrs["activations"] * 2
        attrs["activation_alpha"] = attrs["activation_alpha"] * 2
        attrs["activation_beta"] = attrs["activation_beta"] * 2
    check(*_rnn_case("LSTM", 4, direction, bias=True, lens=True, init=True, **attrs))


@pytest.mark.parametrize("op_type,gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_recurrent_layout1_against_reference(op_type, gates):
    # ORT's CPU kernels reject layout=1; the ONNX reference implementation is the oracle
    extra = {"peephole": False} if op_type == "LSTM" else {}
    model, feeds = _rnn_case(op_type, gates, "forward", bias=True, lens=False, init=True, layout=1, **extra)
    check(model, feeds, reference=run_reference)


@pytest.mark.parametrize("linear_before_reset", [0, 1])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gru(direction, variant, linear_before_reset):
    check(*_rnn_case("GRU", 3, direction, linear_before_reset=linear_before_reset, **VARIANTS[variant]))


def test_gru_clip_and_activations():
    check(*_rnn_case("GRU", 3, "forward", bias=True, lens=True, init=True, clip=0.5,
                     activations=["HardSigmoid", "Softsign"], activation_alpha=[0.25], activation_beta=[0.45]))


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_rnn(direction, variant):
    check(*_rnn_case("RNN", 1, direction, **VARIANTS[variant]))
    check(*_rnn_case("RNN", 1, direction, activations=["Relu"] * (2 if direction == "bidirectional" else 1),
                     **VARIANTS[variant]))


def test_lstm_is_differentiable():
    model, feeds = _rnn_case("LSTM", 4, "bidirectional", bias=True, lens=True, init=True, peephole=True)
    module, out = run_torch(model, feeds, grad=True)
    (out["y0"].sum() + out["y2"].sum()).backward()
    for name in ("w", "r", "b", "p"):
        grad = module.tensor(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# control flow
# ---------------------------------------------------------------------------------------------

def _branch(name, op_type, inputs, const):
    k = numpy_helper.from_array(np.array(const, np.float32), f"{name}_k")
    node = helper.make_node(op_type, inputs + [f"{name}_k"], [f"{name}_out"])
    return helper.make_graph([node], name, [], [helper.make_empty_tensor_value_info(f"{name}_out")], [k])


@pytest.mark.parametrize("cond", [True, False])
def test_if(cond):
    x = randn(2, 3)
    node = helper.make_node("If", ["c"], ["y0"], then_branch=_branch("then", "Add", ["x"], 2.0),
                            else_branch=_branch("else", "Mul", ["x"], -3.0))
    feeds = {"c": np.array(cond), "x": x}
    model = make_model([node], feeds, [helper.make_tensor_value_info("y0", T.FLOAT, [2, 3])], opset=16)
    check(model, feeds)


def test_loop_with_carried_and_scan_outputs():
    # body: (i, cond, acc) -> (acc + x * i < 20, acc + x * i, acc * 2)
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["fi"], to=T.FLOAT),
         helper.make_node("Mul", ["x", "fi"], ["xi"]),
         helper.make_node("Add", ["acc", "xi"], ["acc_out"]),
         helper.make_node("ReduceSum", ["acc_out"], ["total"], keepdims=0),
         helper.make_node("Less", ["total", "limit"], ["cond_out"]),
         helper.make_node("Mul", ["acc", "two"], ["scan_out"])],
        "body",
        [helper.make_tensor_value_info("i", T.INT64, []), helper.make_tensor_value_info("cond", T.BOOL, []),
         helper.make_tensor_value_info("acc", T.FLOAT, [3])],
        [helper.make_tensor_value_info("cond_out", T.BOOL, []), helper.make_tensor_value_info("acc_out", T.FLOAT, [3]),
         helper.make_tensor_value_info("scan_out", T.FLOAT, [3])],
        [numpy_helper.from_array(np.array(20.0, np.float32), "limit"),
         numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    x = np.abs(randn(3)) + 0.5
    for trips in (4, 50):
        feeds = {"x": x, "m": np.array(trips, np.int64), "c": np.array(True), "a0": np.zeros(3, np.float32)}
        node = helper.make_node("Loop", ["m", "c", "a0"], ["y0", "y1"], body=body)
        check(make_model([node], feeds, ["y0", "y1"], opset=13), feeds)


def test_scan_with_reverse_input_and_axes():
    body = helper.make_graph(
        [helper.make_node("Add", ["s", "xt"], ["s_out"]), helper.make_node("Mul", ["s_out", "xt"], ["y_out"])],
        "body", [helper.make_tensor_value_info("s", T.FLOAT, [4]), helper.make_tensor_value_info("xt", T.FLOAT, [4])],
        [helper.make_tensor_value_info("s_out", T.FLOAT, [4]), helper.make_tensor_value_info("y_out", T.FLOAT, [4])])
    feeds = {"s0": randn(4), "x": randn(4, 5, seed=1)}
    node = helper.make_node("Scan", ["s0", "x"], ["y0", "y1"], body=body, num_scan_inputs=1,
                            scan_input_axes=[1], scan_input_directions=[1], scan_output_axes=[1],
                            scan_output_directions=[1])
    check(make_model([node], feeds, ["y0", "y1"], opset=16), feeds)


# ---------------------------------------------------------------------------------------------
# legacy winml ops and ai.onnx.ml
# ---------------------------------------------------------------------------------------------

def test_image_scaler_affine():
    x = randn(2, 3, 4, 5)
    check(single("ImageScaler", {"x": x}, opset=7, scale=1.5, bias=[0.1, -2.0, 3.0]), {"x": x})
    check(single("Affine", {"x": x}, opset=7, alpha=150.0, beta=-0.5), {"x": x})


@pytest.mark.parametrize("attrs", [{"border": [2, 1, 3, 2]}, {"border": [1, 2, 0, 0], "scale": [3, 2]}])
def test_crop(attrs):
    x = randn(2, 3, 7, 8)
    check(single("Crop", {"x": x}, opset=7, **attrs), {"x": x})


@pytest.mark.parametrize("shape", [(10,), (2, 10), (2, 3, 10)])
def test_array_feature_extractor(shape):
    x = randn(*shape)
    idx = np.array([[3], [7]], np.int64)
    check(single("ArrayFeatureExtractor", {"x": x, "i": idx}, domain=ML, extra={ML: 1}), {"x": x, "i": idx})
    labels = np.arange(10, dtype=np.int64) * 3
    check(single("ArrayFeatureExtractor", {"x": labels, "i": idx}, domain=ML, extra={ML: 1}), {"x": labels, "i": idx})


@pytest.mark.parametrize("labels", [{"classlabels_int64s": [3, 1, 4, 5]}, {"classlabels_strings": list("abcd")}])
def test_zipmap(labels):
    x = randn(3, 4)
    key = T.INT64 if "classlabels_int64s" in labels else T.STRING
    out = helper.make_value_info("y0", helper.make_sequence_type_proto(
        helper.make_map_type_proto(key, helper.make_tensor_type_proto(T.FLOAT, []))))
    node = helper.make_node("ZipMap", ["x"], ["y0"], domain=ML, **labels)
    _, got = check(make_model([node], {"x": x}, [out], opset=13, extra={ML: 1}), {"x": x})
    assert isinstance(got["y0"], list) and len(got["y0"]) == 3 and isinstance(got["y0"][0], dict)


# ---------------------------------------------------------------------------------------------
# com.microsoft contrib ops
# ---------------------------------------------------------------------------------------------

B, S, P, NH, HD = 2, 4, 3, 2, 4
HIDDEN = NH * HD


def _attention(mask=None, past=False, bias=True, qkv=None, attention_bias=False, outputs=1, **attrs):
    sizes = qkv or [HIDDEN] * 3
    feeds = {"x": randn(B, S, HIDDEN)}
    inits = {"w": randn(HIDDEN, sum(sizes), seed=1, scale=0.5)}
    names = ["x", "w", "", "", "", ""]
    if bias:
        inits["b"] = randn(sum(sizes), seed=2)
        names[2] = "b"
    if mask is not None:
        feeds["m"] = mask
        names[3] = "m"
    if past:
        feeds["past"] = randn(2, B, NH, P, sizes[0] // NH, seed=3)
        names[4] = "past"
    if attention_bias:
        feeds["ab"] = randn(B, NH, S, S + (P if past else 0), seed=4)
        names[5] = "ab"
    while names[-1] == "":
        names.pop()
    outs = ["y0", "y1"][:outputs]
    if qkv:
        attrs["qkv_hidden_sizes"] = qkv
    node = helper.make_node("Attention", names, outs, domain=MS, num_heads=NH, **attrs)
    return make_model([node], feeds, outs, inits, opset=17, extra={MS: 1}), feeds


TOTAL = S + P
ATTENTION_MASKS = {
    "none": None,
    "1d_end": np.array([3, 2], np.int32),
    "1d_end_start": np.array([4, 3, 1, 0], np.int32),
    "2d_raw": np.array([[1, 1, 0, 1], [1, 0, 1, 1]], np.int32),
    "2d_dummy": np.array([[1], [1]], np.int32),
    "3d": (rng(5).integers(0, 2, (B, S, S)) | np.eye(S, dtype=np.int64)[None]).astype(np.int32),
}


@pytest.mark.parametrize("unidirectional", [0, 1])
@pytest.mark.parametrize("mask", list(ATTENTION_MASKS))
def test_attention_masks(mask, unidirectional):
    check(*_attention(ATTENTION_MASKS[mask], unidirectional=unidirectional))


@pytest.mark.parametrize("unidirectional", [0, 1])
@pytest.mark.parametrize("mask", [None, "raw", "end"])
def test_attention_past_present(mask, unidirectional):
    m = {None: None, "raw": (rng(6).integers(0, 2, (B, TOTAL)) | 1).astype(np.int32),
         "end": np.array([TOTAL, 5], np.int32)}[mask]
    check(*_attention(m, past=True, outputs=2, unidirectional=unidirectional))


def test_attention_options():
    check(*_attention(ATTENTION_MASKS["2d_raw"], qkv=[8, 8, 12]))
    check(*_attention(ATTENTION_MASKS["2d_raw"], mask_filter_value=-3.4028234663852886e38, unidirectional=1))
    check(*_attention(None, bias=True, scale=0.3))
    check(*_attention(None, attention_bias=True))
    check(*_attention(ATTENTION_MASKS["1d_end"], past=True, outputs=2, unidirectional=1,
                      mask_filter_value=-3.4028234663852886e38))
    for value in (-10000.0, -3.4028234663852886e38):  # rows whose every key is masked
        check(*_attention(np.array([[0, 1, 1, 1], [1, 0, 0, 1]], np.int32), unidirectional=1, mask_filter_value=value))


@pytest.mark.parametrize("segment,mask,positions", [(True, True, None), (False, False, "batch"),
                                                    (True, False, "shared"), (False, True, None)])
def test_embed_layer_normalization(segment, mask, positions):
    ids = rng(1).integers(0, 10, (B, S)).astype(np.int32)
    feeds = {"ids": ids}
    inits = {"word": randn(10, HIDDEN, seed=1), "pos": randn(8, HIDDEN, seed=2), "gamma": randn(HIDDEN, seed=3),
             "beta": randn(HIDDEN, seed=4)}
    names = ["ids", "", "word", "pos", "", "gamma", "beta", "", ""]
    if segment:
        feeds["seg"] = rng(2).integers(0, 2, (B, S)).astype(np.int32)
        inits["segemb"] = randn(2, HIDDEN, seed=5)
        names[1], names[4] = "seg", "segemb"
    if mask:
        feeds["mask"] = np.array([[1, 1, 1, 0], [1, 2, 0, 1]], np.int32)  # ORT's mask_index counts the ones
        names[7] = "mask"
    if positions:
        shape = (B, S) if positions == "batch" else (1, S)
        feeds["posids"] = rng(3).integers(0, 8, shape).astype(np.int32)
        names[8] = "posids"
    while names[-1] == "":
        names.pop()
    node = helper.make_node("EmbedLayerNormalization", names, ["y0", "y1", "y2"], domain=MS, epsilon=1e-5)
    check(make_model([node], feeds, ["y0", "y1", "y2"], inits, extra={MS: 1}), feeds)


@pytest.mark.parametrize("beta,bias", [(True, True), (False, False), (True, False)])
def test_skip_layer_normalization(beta, bias):
    feeds = {"x": randn(B, S, HIDDEN), "skip": randn(B, S, HIDDEN, seed=1)}
    inits = {"gamma": randn(HIDDEN, seed=2)}
    names = ["x", "skip", "gamma", "", ""]
    if beta:
        inits["beta"] = randn(HIDDEN, seed=3)
        names[3] = "beta"
    if bias:
        inits["bias"] = randn(HIDDEN, seed=4)
        names[4] = "bias"
    while names[-1] == "":
        names.pop()
    outs = ["y0", "y1", "y2", "y3"]  # output, mean, inv_std_var, input_skip_bias_sum
    node = helper.make_node("SkipLayerNormalization", names, outs, domain=MS, epsilon=1e-5)
    check(make_model([node], feeds, outs, inits, extra={MS: 1}), feeds)


@pytest.mark.parametrize("bias", [True, False])
def test_skip_simplified_layer_normalization(bias):
    feeds = {"x": randn(B, S, HIDDEN), "skip": randn(B, S, HIDDEN, seed=1)}
    inits = {"gamma": randn(HIDDEN, seed=2)}
    if bias:
        inits["bias"] = randn(HIDDEN, seed=4)
    node = helper.make_node("SkipSimplifiedLayerNormalization", list(feeds) + list(inits), ["y0", "", "", "y3"],
                            domain=MS, epsilon=1e-5)
    check(make_model([node], feeds, ["y0", "y3"], inits, extra={MS: 1}), feeds)


@pytest.mark.parametrize("axis", [-1, 1])
def test_simplified_layer_normalization(axis):
    x = randn(B, S, HIDDEN)
    gamma = randn(*([HIDDEN] if axis == -1 else [S, HIDDEN]), seed=1)
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y0", "y1"], axis=axis, epsilon=1e-5)
    check(make_model([node], {"x": x}, ["y0", "y1"], {"g": gamma}, opset=17), {"x": x})


def test_gelu_family():
    x, b = randn(B, S, HIDDEN, scale=3), randn(HIDDEN, seed=1)
    check(single("FastGelu", {"x": x}, {"b": b}, domain=MS, extra={MS: 1}), {"x": x})
    check(single("FastGelu", {"x": x}, domain=MS, extra={MS: 1}), {"x": x})
    check(single("Gelu", {"x": x}, domain=MS, extra={MS: 1}), {"x": x})
    check(single("BiasGelu", {"x": x}, {"b": b}, domain=MS, extra={MS: 1}), {"x": x})
    check(single("QuickGelu", {"x": x}, domain=MS, extra={MS: 1}, alpha=1.5), {"x": x})


@pytest.mark.parametrize("attrs", [{}, {"transA": 1}, {"transB": 1, "alpha": 0.5}, {"transA": 1, "transB": 1},
                                   {"transBatchA": 1}, {"transBatchB": 1, "transB": 1}])
def test_fused_matmul(attrs):
    a_shape = (4, 2, 3) if attrs.get("transBatchA") else (2, 3, 4) if attrs.get("transA") else (2, 4, 3)
    b_shape = (3, 2, 5) if attrs.get("transBatchB") and not attrs.get("transB") else \
        (5, 2, 3) if attrs.get("transBatchB") else (2, 5, 3) if attrs.get("transB") else (2, 3, 5)
    feeds = {"a": randn(*a_shape), "b": randn(*b_shape, seed=1)}
    check(single("FusedMatMul", feeds, domain=MS, extra={MS: 1}, **attrs), feeds)


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("layout", ["bsd", "bnsh"])
@pytest.mark.parametrize("positions", ["full", "offset"])
def test_rotary_embedding(interleaved, layout, positions):
    x = randn(B, S, HIDDEN) if layout == "bsd" else randn(B, NH, S, HD)
    pos = rng(1).integers(0, 8, (B, S)).astype(np.int64) if positions == "full" else np.array([2], np.int64)
    angles = np.arange(16)[:, None] * (1.0 / 10000 ** (np.arange(0, HD, 2) / HD))[None, :]
    inits = {"cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}
    attrs = {"interleaved": interleaved}
    if layout == "bsd":
        attrs["num_heads"] = NH
    model = single("RotaryEmbedding", {"x": x, "pos": pos}, inits, domain=MS, extra={MS: 1}, **attrs)
    check(model, {"x": x, "pos": pos})


# ---------------------------------------------------------------------------------------------
# a sample of spa.torch.ops (the base registry)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attrs", [{"pads": [0, 1, 2, 1]}, {"pads": [1, 0, 0, 2], "strides": [2, 2]},
                                   {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
                                   {"auto_pad": "SAME_LOWER", "strides": [2, 3]}, {"auto_pad": "VALID"},
                                   {"pads": [1, 1, 1, 1], "dilations": [2, 1], "group": 3}])
def test_conv(attrs):
    x = randn(2, 6, 9, 8)
    w = randn(6, 6 // attrs.get("group", 1), 3, 3, seed=1)
    check(single("Conv", {"x": x}, {"w": w, "b": randn(6, seed=2)}, opset=13, **attrs), {"x": x})


# ConvTranspose output_shape: the spec and ORT put the larger half of an odd total padding first
# unless auto_pad is SAME_UPPER, and pad the tail (with the bias) when output_shape exceeds the
# natural size
@pytest.mark.parametrize("attrs", [{"strides": [2, 2], "output_padding": [1, 0]},
                                   {"strides": [3, 2], "output_padding": [2, 1], "pads": [1, 0, 0, 1]},
                                   {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
                                   {"strides": [3, 2], "auto_pad": "SAME_LOWER", "output_padding": [1, 1]},
                                   {"strides": [2, 2], "auto_pad": "SAME_UPPER", "output_shape": [9, 8]},
                                   {"strides": [2, 2], "output_shape": [10, 9]},
                                   {"strides": [2, 2], "output_shape": [12, 10]},
                                   {"strides": [2, 2], "group": 2, "dilations": [2, 1]}])
def test_conv_transpose(attrs):
    x = randn(2, 4, 5, 4)
    w = randn(4, 6 // attrs.get("group", 1), 3, 3, seed=1)
    check(single("ConvTranspose", {"x": x}, {"w": w, "b": randn(6, seed=2)}, opset=13, **attrs), {"x": x})


@pytest.mark.parametrize("attrs", [{"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
                                   {"kernel_shape": [2, 3], "strides": [2, 2], "pads": [0, 1, 1, 1], "ceil_mode": 1},
                                   {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}])
def test_max_pool(attrs):
    x = randn(2, 3, 9, 8)
    check(single("MaxPool", {"x": x}, opset=13, **attrs), {"x": x})


@pytest.mark.parametrize("include", [0, 1])
@pytest.mark.parametrize("attrs", [{"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
                                   {"kernel_shape": [3, 2], "pads": [1, 0, 0, 1], "strides": [2, 1]},
                                   {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}])
def test_average_pool(attrs, include):
    x = randn(2, 3, 9, 8)
    check(single("AveragePool", {"x": x}, opset=13, count_include_pad=include, **attrs), {"x": x})


@pytest.mark.parametrize("starts,ends,axes,steps", [([-1, 5], [-100, 0], [1, 2], [-1, -2]),
                                                    ([4], [1], [2], [-1]), ([0, -2], [100, -8], [0, 2], [1, -3]),
                                                    ([1], [7], [-1], [2])])
def test_slice(starts, ends, axes, steps):
    x = randn(2, 5, 7)
    inits = {k: np.array(v, np.int64) for k, v in {"s": starts, "e": ends, "a": axes, "t": steps}.items()}
    check(single("Slice", {"x": x}, inits, opset=13), {"x": x})


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
def test_pad(mode):
    x = randn(2, 3, 5, 6)
    inits = {"p": np.array([0, 1, 2, 0, 0, 0, 1, 3], np.int64)}
    if mode == "constant":
        inits["v"] = np.array(1.5, np.float32)
    check(single("Pad", {"x": x}, inits, opset=13, mode=mode), {"x": x})


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("op_type", ["Softmax", "LogSoftmax"])
def test_softmax_axis_semantics(op_type, opset):
    x = randn(2, 3, 4)
    for axis in (0, 1, -1):
        check(single(op_type, {"x": x}, opset=opset, axis=axis), {"x": x})
    check(single(op_type, {"x": x}, opset=opset), {"x": x})


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split(opset):
    x = randn(2, 7, 3)
    if opset >= 18:
        check(single("Split", {"x": x}, n_out=3, opset=opset, axis=1, num_outputs=3), {"x": x})
    if opset >= 13:
        check(single("Split", {"x": x}, {"s": np.array([2, 4, 1], np.int64)}, n_out=3, opset=opset, axis=1), {"x": x})
    else:
        check(single("Split", {"x": x}, n_out=3, opset=opset, axis=1, split=[2, 4, 1]), {"x": x})
        check(single("Split", {"x": randn(2, 6)}, n_out=3, opset=opset, axis=1), {"x": randn(2, 6)})


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_unknown_op_raises_unsupported_op():
    x = randn(2, 3)
    model = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("FrobnicateTensor", ["r"], ["y"], domain="com.example")],
                       {"x": x}, ["y"], extra={"com.example": 1})
    with pytest.raises(st.UnsupportedOp, match="FrobnicateTensor"):
        st.OnnxModule(model)


def test_unsupported_variant_names_the_node():
    node = helper.make_node("Attention", ["x", "w", "", "m"], ["y0"], domain=MS, num_heads=NH, name="att0")
    feeds = {"x": randn(B, S, HIDDEN), "m": np.zeros((B, 1, 8, 8), np.int32)}
    model = make_model([node], feeds, ["y0"], {"w": randn(HIDDEN, 3 * HIDDEN)}, extra={MS: 1})
    with pytest.raises(SpaError, match="att0.*Megatron"):
        run_torch(model, feeds)
